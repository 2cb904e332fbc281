"""Hugging Face GPT-2 in and out: `GPT2LMHeadModel` and `GPT2ForSequenceClassification` folders <-> a GPT with
GPT-2's options (llmtrain's defaults).

    config.json             GPT2Config: GPT2LMHeadModel, or GPT2ForSequenceClassification with id2label
    generation_config.json  <|endoftext|> as bos and eos (language models)
    model.safetensors       transformer.h.N.attn.c_attn.weight, ...: GPT-2's names and Conv1D (in, out) orientation;
                            a tied head is stored once, as transformer.wte.weight; a classifier's head is `score`
    vocab.json, merges.txt, tokenizer_config.json   the tokenizer (a tokenizer.json for a tokenizer that is one)
    llmtrain.json           in llmtrain's exports: what only llmtrain reads (folders.py)

In: a folder in `save_pretrained` layout (shards too), read with safetensors alone: transformers is not needed. The
released sizes are downloaded by Hub name (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`). Out: `export_gpt2`
writes such a folder, which transformers loads offline. Our GPT is GPT-2's architecture, so the translation is names
and transposes only, one table read both ways (`gpt2_names`): a model without a qkv bias is written with zeros in
its place (llmtrain.json says so, and reading takes them back out), and a classifier's head is bias-free like
GPT-2's `score`. No Lightning or Hydra.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.data.tokenizer_json import tokenizer_files
from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import ModelInfo, check_tensors, empty_gpt
from llmtrain.interop.folders import (
    CONFIG,
    GENERATION,
    LLMTRAIN_JSON,
    read_config_json,
    read_labels,
    read_record,
    read_safetensors,
    record_text,
    stop_ids,
    write_export,
)
from llmtrain.interop.lora import plain_gpt
from llmtrain.model.gpt import GPT, GPTConfig

# Hub name -> our model config (conf/model/<name>.yaml) with the same shapes
GPT2_NAMES = {"gpt2": "gpt124m", "gpt2-medium": "gpt355m", "gpt2-large": "gpt774m", "gpt2-xl": "gpt1558m"}
GPT2_OPTIONS = {"pos_emb": "learned", "norm": "layernorm", "norm_eps": 1e-5, "mlp": "gelu", "bias": True}
# GPT-2 stores these as Conv1D, (in, out); our nn.Linear has (out, in)
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# per-layer modules: ours -> GPT-2's (a bare name is qualified: GPT-2 has two c_proj, attention's and the MLP's)
LAYER_NAMES = {"ln1": "ln_1", "attn.qkv": "attn.c_attn", "attn.out_proj": "attn.c_proj", "ln2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "head": "lm_head"}
LEAF_NAMES = {ours.split(".")[-1]: hf for ours, hf in LAYER_NAMES.items()}  # qkv -> attn.c_attn, fc2 -> mlp.c_proj
TOP_NAMES = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight", "ln_f.weight": "ln_f.weight",
             "ln_f.bias": "ln_f.bias"}
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers that older transformers saved: not weights
CLASSIFIER = "GPT2ForSequenceClassification"
# GPTConfig fields that config.json also states; qkv_bias and drop_rate come from llmtrain.json alone
STATED = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "tie_weights")


def hub_name(name: str) -> str | None:
    """The GPT-2 Hub name that `name` means (`gpt2`, `openai-community/gpt2`, ...), or None."""
    bare = name.removeprefix("openai-community/")
    return bare if bare in GPT2_NAMES else None


# --- in ---------------------------------------------------------------------------------------------------------


def read_gpt2_info(path: Path, what: str) -> ModelInfo:
    """The ModelInfo of a Hugging Face GPT-2 folder, from its config.json (and llmtrain.json, if beside) alone."""
    hf = read_config_json(path, what)
    labels = None
    if CLASSIFIER in (hf.get("architectures") or []):
        labels = read_labels(hf, what)
    info = ModelInfo(kind="hf", path=str(path), model_config=config_from_gpt2(hf, what), tokenizer="gpt2",
                     label_names=labels, num_classes=len(labels) if labels else None)
    return read_record(info, path, what, STATED, "GPT-2")


def load_gpt2(path: Path, what: str, dtype: torch.dtype = torch.float32) -> tuple[GPT, ModelInfo]:
    """A Hugging Face GPT-2 folder -> (GPT with its weights in dtype, in eval mode on the CPU; ModelInfo)."""
    info = read_gpt2_info(path, what)
    model = empty_gpt(info.model_config, dtype)
    classifier = info.num_classes is not None
    if classifier:  # GPT2ForSequenceClassification: `score` is the head
        model.replace_head(info.num_classes)
    copy_gpt2_weights(model, read_safetensors(path, what), what, classifier)
    return model.eval(), info


def config_from_gpt2(hf: dict, what: str) -> GPTConfig:
    """GPT-2's config.json -> GPTConfig; reject the options whose computation our GPT does not implement."""
    problems = []
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={hf['activation_function']!r} (ours is GELU, tanh approximation)")
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        problems.append(f"layer_norm_epsilon={hf['layer_norm_epsilon']} (ours is 1e-5)")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        problems.append(f"n_inner={hf['n_inner']} (ours is 4 * n_embd)")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            problems.append(f"{flag}=true")
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=false")
    if problems:
        raise UserError(f"{what}: config.json sets {', '.join(problems)}, which llmtrain's GPT does not implement")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", hf.get("n_ctx")),
                         emb_dim=hf["n_embd"], n_heads=hf["n_head"], n_layers=hf["n_layer"], drop_rate=0.0,
                         qkv_bias=True, tie_weights=hf.get("tie_word_embeddings", True))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{what}: config.json lacks or mis-sets a GPT-2 size ({e!r}): it needs "
                        "vocab_size, n_positions, n_embd, n_head and n_layer") from e


def copy_gpt2_weights(model: GPT, tensors: dict[str, torch.Tensor], what: str, classifier: bool = False) -> None:
    """Copy GPT-2's tensors (with or without `transformer.`) into the model: every name and shape checked, Conv1D
    weights transposed, fp16/bf16 cast to the model's dtype. A model without a qkv bias takes the zeros that GPT-2's
    layout holds in its place (anything else is refused). Messages name the tensors without `transformer.`."""
    found = {k.removeprefix("transformer."): v for k, v in tensors.items() if not k.endswith(BUFFERS)}
    if model.tied:
        found.pop("lm_head.weight", None)  # the head is wte
    expected = {k.removeprefix("transformer."): v for k, v in gpt2_state_dict(model, classifier).items()}
    check_tensors(found, expected, what, "config.json", "tensors", "safetensors weights")
    if not model.config.qkv_bias:
        for key in [k for k in found if k.endswith("attn.c_attn.bias")]:
            if found.pop(key).any():
                raise UserError(f"{what}: {key} is not zero, but {LLMTRAIN_JSON} says qkv_bias=false: delete "
                                f"{LLMTRAIN_JSON} to read the folder as plain GPT-2 (with its qkv bias)")
    names = {ours: hf.removeprefix("transformer.") for ours, hf in gpt2_names(model, classifier).items()}
    own = model.state_dict()  # tensors that share storage with the parameters
    with torch.no_grad():
        for ours, hf in names.items():
            own[ours].copy_(found[hf].t() if hf.endswith(TRANSPOSED) else found[hf])


# --- out --------------------------------------------------------------------------------------------------------


def gpt2_mismatches(gpt: GPT) -> list[str]:
    """What keeps a GPT from GPT-2's layout (empty: export_gpt2 writes it as GPT2LMHeadModel or a classifier)."""
    c = gpt.config
    differ = [f"model.{k}={getattr(c, k)}" for k, v in GPT2_OPTIONS.items() if getattr(c, k) != v]
    if c.n_kv_heads != c.n_heads:
        differ.append(f"model.n_kv_heads={c.n_kv_heads}")
    if c.mlp_hidden != 4 * c.emb_dim:
        differ.append(f"model.mlp_hidden={c.mlp_hidden}")
    if c.head_dim * c.n_heads != c.emb_dim:
        differ.append(f"model.head_dim={c.head_dim}")
    if c.qk_norm:
        differ.append("model.qk_norm=True")
    return differ


def export_gpt2(model: nn.Module, out_dir: str | Path, meta: dict, overwrite: bool = False) -> Path:
    """Write model (a GPT with GPT-2's options, or a peft model around one, merged into a copy) to out_dir in
    GPT-2's layout (see the top of this file).

    meta is the run's record (tokenizer, stage, num_classes, label_names, prompt_template, init_from, step): it goes
    to llmtrain.json, and decides the tokenizer files and, with num_classes, the classifier layout. In an existing
    out_dir only the export's files are written (folders.write_folder). Returns out_dir."""
    gpt = plain_gpt(model)
    differ = gpt2_mismatches(gpt)
    if differ:
        raise UserError(f"the model cannot be written as GPT-2: it has {', '.join(differ)}")
    classifier = meta.get("num_classes") is not None
    labels = _labels(gpt, classifier, meta.get("label_names"))
    tokenizer = meta.get("tokenizer") or "gpt2"
    eot = build_tokenizer(tokenizer).eot_token
    files = {CONFIG: gpt2_config(gpt, eot, labels)}
    if not classifier:
        files[GENERATION] = {"bos_token_id": eot, "eos_token_id": stop_ids(meta, eot)}
    texts = {name: json.dumps(value, indent=1) + "\n" for name, value in files.items()}  # fails before any file
    texts[LLMTRAIN_JSON] = record_text(gpt, meta, tokenizer, len(labels) if labels else None)
    texts |= tokenizer_files(tokenizer, gpt.config.context_length, pad=classifier,
                             chat_template=meta.get("chat_template"))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in gpt2_state_dict(gpt, classifier).items()}
    return write_export(Path(out_dir), tensors, texts, overwrite)


def gpt2_config(gpt: GPT, eot: int, label_names: list[str] | None = None) -> dict:
    """GPT2Config's fields for the GPT; with label_names, those of GPT2ForSequenceClassification (padded with
    <|endoftext|>, as llmtrain's batches are: the classifier reads the last token that is not padding)."""
    c = gpt.config
    config = {
        "architectures": [CLASSIFIER if label_names else "GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.context_length, "n_embd": c.emb_dim, "n_head": c.n_heads,
        "n_layer": c.n_layers, "n_inner": None, "activation_function": "gelu_new",  # GELU, tanh approximation
        "resid_pdrop": c.drop_rate, "embd_pdrop": c.drop_rate, "attn_pdrop": c.drop_rate,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": c.tie_weights,
        "torch_dtype": str(gpt.tok_emb.weight.dtype).removeprefix("torch."),
    }
    if label_names:
        config |= {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)},
                   "pad_token_id": eot}
    return config


def _labels(gpt: GPT, classifier: bool, label_names: list[str] | None) -> list[str] | None:
    """A classifier's label names, one per row of its head (HF's LABEL_i where none are known); None for an LM."""
    rows = gpt.head.out_features
    if not classifier:
        if rows != gpt.config.vocab_size:
            raise ValueError(f"the head has {rows} rows, not one per token ({gpt.config.vocab_size}): a classifier "
                             "is exported with meta num_classes")
        return None
    labels = [str(n) for n in label_names] if label_names else [f"LABEL_{i}" for i in range(rows)]
    if len(labels) != rows:
        raise ValueError(f"{len(labels)} label names for a head of {rows} classes")
    return labels


# --- names, both ways -------------------------------------------------------------------------------------------


def gpt2_module_name(name: str, classifier: bool = False) -> str:
    """One of our module names (or a peft target suffix) in GPT-2's naming: `blocks.3.attn.qkv` ->
    `transformer.h.3.attn.c_attn`, `attn.out_proj` -> `attn.c_proj`, `fc2` -> `mlp.c_proj`, `head` -> `lm_head`
    (a classifier's: `score`)."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 2:
        return f"transformer.h.{parts[1]}.{gpt2_module_name('.'.join(parts[2:]))}"
    if name == "head" and classifier:
        return "score"
    return LAYER_NAMES.get(name) or LEAF_NAMES.get(name) or name


def gpt2_names(gpt: GPT, classifier: bool = False) -> dict[str, str]:
    """Our state-dict keys -> GPT-2's tensor names (`blocks.0.attn.qkv.weight` -> `transformer.h.0.attn.c_attn.weight`,
    `tok_emb.weight` -> `transformer.wte.weight`). A tied head has none: transformers ties lm_head to wte."""
    names = {}
    for key in gpt.state_dict():
        if key == "head.weight":
            if not gpt.tied:
                names[key] = "score.weight" if classifier else "lm_head.weight"
            continue
        module, _, leaf = key.rpartition(".")
        names[key] = f"transformer.{TOP_NAMES[key]}" if key in TOP_NAMES else f"{gpt2_module_name(module)}.{leaf}"
    return names


def gpt2_state_dict(gpt: GPT, classifier: bool = False) -> dict[str, torch.Tensor]:
    """The GPT's weights under GPT-2's names, Conv1D weights as (in, out) (views: nothing is copied). Zeros stand in
    for an absent qkv bias (GPT-2 always has one)."""
    own = gpt.state_dict()
    out = {hf: own[ours].t() if hf.endswith(TRANSPOSED) else own[ours]
           for ours, hf in gpt2_names(gpt, classifier).items()}
    if not gpt.config.qkv_bias:
        dtype = gpt.tok_emb.weight.dtype
        out |= {f"transformer.h.{i}.attn.c_attn.bias": torch.zeros(3 * gpt.config.emb_dim, dtype=dtype)
                for i in range(gpt.config.n_layers)}
    return out
