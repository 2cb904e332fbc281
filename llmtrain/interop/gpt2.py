"""Hugging Face GPT-2 checkpoints in: names, Conv1D transposes, config translation.

A folder in `save_pretrained` layout (`config.json` + `model.safetensors`, or shards named by
`model.safetensors.index.json`) is read directly with safetensors; transformers is not needed. The released
sizes are downloaded by Hub name (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`). A `GPT2ForSequenceClassification`
folder is read as a classifier (its `score` is our bias-free head, its `id2label` the label names). llmtrain's own
Hugging Face export (hf_export.py) carries `llmtrain.json` beside: the exact GPTConfig (e.g. no qkv bias, whose
zeros the folder holds) and the record checkpoints carry (tokenizer, task, stage, labels, prompt template), so that
reading it back gives the very model that was exported. No Lightning or Hydra.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file

from llmtrain.data.tokenizer import find_tokenizer
from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import ModelInfo, few
from llmtrain.model.gpt import GPT, GPTConfig

# Hub name -> our model config (conf/model/<name>.yaml) with the same shapes
GPT2_NAMES = {"gpt2": "gpt124m", "gpt2-medium": "gpt355m", "gpt2-large": "gpt774m", "gpt2-xl": "gpt1558m"}
# GPT-2 stores these as Conv1D, (in, out); our nn.Linear wants (out, in)
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# per-layer GPT-2 name -> ours
LAYER_NAMES = {
    "ln_1": "ln1", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.out_proj", "ln_2": "ln2",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
TOP_NAMES = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "ln_f.weight": "ln_f.weight",
             "ln_f.bias": "ln_f.bias"}
HEAD_NAMES = ("lm_head.weight", "score.weight")  # the LM head (absent when tied to wte); a classifier's head
CLASSIFIER = "GPT2ForSequenceClassification"
LLMTRAIN_JSON = "llmtrain.json"  # beside llmtrain's Hugging Face export: what only llmtrain reads
# GPTConfig fields that config.json also states; qkv_bias and drop_rate come from llmtrain.json alone
SHAPE_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "tie_weights")


def hub_name(name: str) -> str | None:
    """The GPT-2 Hub name that `name` means (`gpt2`, `openai-community/gpt2`, ...), or None."""
    bare = name.removeprefix("openai-community/")
    return bare if bare in GPT2_NAMES else None


def download(repo_id: str, what: str) -> Path:
    """The local snapshot of a Hub repository's config and safetensors weights."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.json"]))
    except Exception as e:  # offline, no huggingface_hub, a proxy, ...
        raise UserError(
            f"{what}: the weights could not be downloaded from the Hugging Face Hub ({type(e).__name__}); "
            "a local directory in save_pretrained layout (config.json + model.safetensors) also works"
        ) from e


def read_config_json(path: Path, what: str) -> dict:
    """A Hugging Face folder's config.json as a dict ({} if it holds no JSON object)."""
    hf = _read_json(path / "config.json", what)
    return hf if isinstance(hf, dict) else {}


def read_hf_info(path: Path, what: str, hint: str = "") -> ModelInfo:
    """The ModelInfo of a Hugging Face GPT-2 folder, from its config.json (and llmtrain.json, if beside) alone."""
    hf = read_config_json(path, what)
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{what}: config.json has model_type={hf.get('model_type')!r}, but only GPT-2 ('gpt2') and "
                        f"Llama ('llama') map onto llmtrain's GPT{hint}")
    config = config_from_hf(hf, what)
    labels = None
    if CLASSIFIER in (hf.get("architectures") or []):  # id2label: {"0": "ham", "1": "spam"}
        id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))}
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    info = ModelInfo(kind="hf", path=str(path), model_config=config, tokenizer="gpt2",
                     label_names=labels,
                     num_classes=len(labels) if labels else None)
    if not (path / LLMTRAIN_JSON).is_file():
        return info
    ours = ModelInfo.from_meta("hf", path, _read_json(path / LLMTRAIN_JSON, what), f"{what}: {LLMTRAIN_JSON}")
    differ = [f"{k} {getattr(ours.model_config, k)} vs {getattr(config, k)}" for k in SHAPE_FIELDS
              if getattr(ours.model_config, k) != getattr(config, k)]
    if differ or ours.num_classes != info.num_classes:
        differ += [] if ours.num_classes == info.num_classes else [f"classes {ours.num_classes} vs {info.num_classes}"]
        raise UserError(f"{what}: {LLMTRAIN_JSON} and config.json disagree ({', '.join(differ)}): restore the files "
                        f"that were exported together, or delete {LLMTRAIN_JSON} to read the folder as plain GPT-2")
    return replace(ours, tokenizer=find_tokenizer(ours.tokenizer, path))  # a tokenizer.json travels with the folder


def load_hf(path: Path, what: str, hint: str = "") -> tuple[GPT, ModelInfo]:
    """A Hugging Face GPT-2 folder -> (GPT with its weights, in eval mode on the CPU; ModelInfo)."""
    info = read_hf_info(path, what, hint)
    model = GPT(info.model_config)
    if info.num_classes:  # GPT2ForSequenceClassification: `score` is the head
        model.replace_head(info.num_classes)
    copy_hf_weights(model, read_safetensors(path, what), what)
    return model.eval(), info


def _read_json(file: Path, what: str):
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: {file} is not readable JSON ({e})") from e


def config_from_hf(hf: dict, what: str) -> GPTConfig:
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


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard that model.safetensors.index.json names."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8])
        raise UserError(f"{what}: no model.safetensors (or model.safetensors.index.json) next to "
                        f"config.json (found: {found}); save with save_pretrained(dir, safe_serialization=True)")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (path / shard).is_file():
            raise UserError(f"{what}: the shard {shard} named in {index.name} is missing")
        tensors |= load_file(path / shard, device="cpu")
    return tensors


def copy_hf_weights(model: GPT, hf_sd: dict[str, torch.Tensor], what: str) -> None:
    """Rename GPT-2's tensors to ours, transpose its Conv1D weights, check every shape and copy.

    The head is `lm_head` (skipped when the model ties it to wte) or a classifier's `score`. A model without a qkv
    bias takes the zeros that GPT-2's layout holds in its place (anything else is refused). Messages name the
    tensors as the safetensors files do (without `transformer.`).
    """
    tied = model.tied
    renamed: dict[str, tuple[str, torch.Tensor]] = {}  # our key -> (GPT-2 key, tensor in our layout)
    unexpected = []
    for key, value in hf_sd.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        if key == "lm_head.weight" and tied:
            continue  # the head is wte
        if key.endswith("attn.c_attn.bias") and not model.config.qkv_bias:
            if value.any():
                raise UserError(f"{what}: {key} is not zero, but {LLMTRAIN_JSON} says qkv_bias=false: delete "
                                f"{LLMTRAIN_JSON} to read the folder as plain GPT-2 (with its qkv bias)")
            continue
        if key.endswith(TRANSPOSED):
            value = value.t()
        ours = "head.weight" if key in HEAD_NAMES else _ours(key)
        if ours is None:
            unexpected.append(key)
        else:
            renamed[ours] = (key, value)
    own = model.state_dict()  # tensors that share storage with the parameters
    if tied:
        own.pop("head.weight")  # the same tensor as tok_emb.weight
    unexpected += [hf_key for k, (hf_key, _) in renamed.items() if k not in own]  # e.g. h.5 with n_layer=4
    missing = [k for k in own if k not in renamed]
    wrong = [f"{renamed[k][0]} {_hf_shape(renamed[k])} but config.json implies {_hf_shape((renamed[k][0], t))}"
             for k, t in own.items() if k in renamed and renamed[k][1].shape != t.shape]
    problems = ([f"missing tensors for {few(missing)}"] if missing else []) + (
        [f"unexpected tensors {few(unexpected)}"] if unexpected else []) + (
        [f"shapes disagree: {few(wrong)}"] if wrong else [])
    if problems:
        raise UserError(f"{what}: the safetensors weights do not match config.json: {'; '.join(problems)}")
    with torch.no_grad():
        for k, param in own.items():
            param.copy_(renamed[k][1])  # casts fp16/bf16 checkpoints to the model's fp32


def _hf_shape(entry: tuple[str, torch.Tensor]) -> tuple[int, ...]:
    """A tensor's shape as GPT-2 stores it (Conv1D weights transposed back)."""
    key, t = entry
    return tuple(t.t().shape if key.endswith(TRANSPOSED) else t.shape)


def _ours(key: str) -> str | None:
    """'h.3.attn.c_attn.weight' -> 'blocks.3.attn.qkv.weight'; None for a name GPT-2 does not have."""
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    parts = key.split(".")
    if len(parts) < 4 or parts[0] != "h" or not parts[1].isdigit():
        return None
    module, leaf = ".".join(parts[2:-1]), parts[-1]
    if module not in LAYER_NAMES or leaf not in ("weight", "bias"):
        return None
    return f"blocks.{parts[1]}.{LAYER_NAMES[module]}.{leaf}"
