"""Hugging Face Llama in and out: `LlamaForCausalLM` folders <-> a GPT with Llama's options (rope, rmsnorm,
swiglu; grouped-query attention, biases or none).

    config.json             LlamaConfig: LlamaForCausalLM
    generation_config.json  the tokenizer's end-of-text token as bos and eos
    model.safetensors       model.layers.N.self_attn.q_proj.weight, ...; a tied head is stored once (embed_tokens)
    tokenizer.json, tokenizer_config.json   the tokenizer, as a Hugging Face fast tokenizer
    llmtrain.json           in llmtrain's exports: what only llmtrain reads (folders.py)

In: a folder in `save_pretrained` layout (shards too; usually with its `tokenizer.json`, which becomes the model's
tokenizer), read with safetensors alone: transformers is not needed. SmolLM is downloaded by Hub name. Out:
`export_llama` writes such a folder, so that `transformers.AutoModelForCausalLM.from_pretrained(out)` loads it.

Names: q_proj, k_proj and v_proj are the row blocks of our one `attn.qkv`; o_proj is `attn.out_proj`; gate_proj,
up_proj and down_proj are `mlp.gate`, `mlp.fc1`, `mlp.fc2`. q and k rows stay in transformers' layout: our RoPE pairs
dimension i with i + head_dim/2 ("rotate_half"), as its does, so no permutation is needed either way.
No Lightning or Hydra.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from llmtrain.data.tokenizer import TOKENIZER_FILE, build_tokenizer
from llmtrain.data.tokenizer_json import tokenizer_json
from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import ModelInfo, check_tensors
from llmtrain.interop.folders import (
    CONFIG,
    GENERATION,
    LLMTRAIN_JSON,
    WEIGHTS,
    read_config_json,
    read_record,
    read_safetensors,
    record_text,
    write_export,
)
from llmtrain.interop.lora import plain_gpt
from llmtrain.model.gpt import GPT, GPTConfig

# Hub names accepted by name (downloaded), with the conf/model preset of the same shapes
LLAMA_NAMES = {"HuggingFaceTB/SmolLM-135M": "smollm_135m", "HuggingFaceTB/SmolLM-135M-Instruct": "smollm_135m"}
# per-layer tensors: ours -> Hugging Face's (weights and, where the config has them, biases)
LAYER_NAMES = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "attn.out_proj": "self_attn.o_proj",
               "mlp.gate": "mlp.gate_proj", "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj"}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # the row blocks of attn.qkv, in order
TOP_NAMES = {"tok_emb.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
LLAMA_OPTIONS = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
# every GPTConfig field is stated by config.json, but drop_rate (llmtrain.json alone)
STATED = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "drop_rate"]


# --- in ---------------------------------------------------------------------------------------------------------


def read_llama_info(path: Path, what: str) -> ModelInfo:
    """The ModelInfo of a Hugging Face Llama folder, from its config.json (and llmtrain.json, if beside); its
    tokenizer is the tokenizer.json beside it (None when there is none: data.tokenizer must then name one)."""
    hf = read_config_json(path, what)
    tokenizer = path / TOKENIZER_FILE
    info = ModelInfo(kind="hf", path=str(path), model_config=config_from_llama(hf, what),
                     tokenizer=str(tokenizer.resolve()) if tokenizer.is_file() else None)
    return read_record(info, path, what, STATED, "Llama")


def load_llama(path: Path, what: str) -> tuple[GPT, ModelInfo]:
    """A Hugging Face Llama folder -> (GPT with its weights, in eval mode on the CPU; ModelInfo)."""
    info = read_llama_info(path, what)
    model = GPT(info.model_config)
    tensors = {k: v for k, v in read_safetensors(path, what).items()
               if not k.endswith("rotary_emb.inv_freq")}  # older transformers saved RoPE's frequencies
    if not any(k.startswith("model.") for k in tensors):  # a bare LlamaModel: no "model." and no head
        tensors = {f"model.{k}": v for k, v in tensors.items()}
    if model.tied:
        tensors.pop("lm_head.weight", None)  # the head is the embedding
    check_tensors(tensors, llama_state_dict(model), what, "config.json", "tensors", "safetensors weights")
    model.load_state_dict(state_dict_from_llama(tensors, info.model_config), strict=True)  # casts to float32
    return model.eval(), info


def config_from_llama(hf: dict, what: str) -> GPTConfig:
    """Llama's config.json -> GPTConfig (transformers' defaults for absent keys); options whose computation our GPT
    does not implement are refused, all in one line."""
    heads, width = hf.get("num_attention_heads"), hf.get("hidden_size")
    rope = hf.get("rope_parameters") or {}  # transformers 5 writes rope_theta here; 4.x at the top level
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (ours is silu)")
    if rope_type != "default" or hf.get("rope_scaling"):
        problems.append(f"RoPE scaling {hf.get('rope_scaling') or rope_type!r} (ours is plain RoPE)")
    if isinstance(heads, int) and isinstance(width, int) and heads and hf.get("head_dim") not in (None, width // heads):
        problems.append(f"head_dim={hf['head_dim']} (ours is hidden_size / num_attention_heads = {width // heads})")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        problems.append(f"attention_bias={hf.get('attention_bias')} with mlp_bias={hf.get('mlp_bias')} (ours has "
                        "both or neither)")
    if problems:
        raise UserError(f"{what}: config.json sets {', '.join(problems)}, which llmtrain's GPT does not implement")
    bias = bool(hf.get("attention_bias", False))
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048),
                         emb_dim=width, n_heads=heads, n_layers=hf["num_hidden_layers"],
                         n_kv_heads=hf.get("num_key_value_heads") or heads, drop_rate=0.0, qkv_bias=bias, bias=bias,
                         tie_weights=bool(hf.get("tie_word_embeddings", False)), pos_emb="rope",
                         rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), norm="rmsnorm",
                         norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu",
                         mlp_hidden=hf["intermediate_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{what}: config.json lacks or mis-sets a Llama size ({e!r}): it needs vocab_size, "
                        "hidden_size, intermediate_size, num_attention_heads and num_hidden_layers") from e


# --- names, both ways -------------------------------------------------------------------------------------------


def _name_pairs(n_layers: int) -> list[tuple[str, str]]:
    """(our name, Llama's name) of every tensor except the q, k, v blocks; weights and biases both."""
    pairs = list(TOP_NAMES.items())
    for i in range(n_layers):
        pairs += [(f"blocks.{i}.{ours}.{leaf}", f"model.layers.{i}.{hf}.{leaf}")
                  for ours, hf in LAYER_NAMES.items() for leaf in ("weight", "bias")]
    return pairs


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The GPT's weights under Llama's names, attn.qkv split into q, k, v (views; a tied head is left out)."""
    c, own = model.config, model.state_dict()
    out = {hf: own[ours] for ours, hf in _name_pairs(c.n_layers) if ours in own}
    if model.tied:
        out.pop("lm_head.weight")
    sizes = [c.emb_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim]
    for i in range(c.n_layers):
        for leaf in ("weight", "bias"):
            if (key := f"blocks.{i}.attn.qkv.{leaf}") in own:
                out |= {f"model.layers.{i}.{hf}.{leaf}": part for hf, part in zip(QKV, own[key].split(sizes))}
    return out


def state_dict_from_llama(tensors: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Llama's names -> ours (the inverse of llama_state_dict): q, k, v concatenated into attn.qkv."""
    out = {ours: tensors[hf] for ours, hf in _name_pairs(config.n_layers) if hf in tensors}
    if config.tie_weights:
        out["head.weight"] = out["tok_emb.weight"]
    for i in range(config.n_layers):
        for leaf in ("weight", "bias"):
            parts = [tensors.get(f"model.layers.{i}.{hf}.{leaf}") for hf in QKV]
            if all(p is not None for p in parts):
                out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(parts)
    return out


# --- out --------------------------------------------------------------------------------------------------------


def llama_mismatches(gpt: GPT) -> list[str]:
    """What keeps a GPT from the LlamaForCausalLM layout (empty: export_llama can write it)."""
    c = gpt.config
    differ = [f"model.{k}={getattr(c, k)}" for k, v in LLAMA_OPTIONS.items() if getattr(c, k) != v]
    if c.qkv_bias != c.bias:
        differ.append(f"model.qkv_bias={c.qkv_bias} with model.bias={c.bias}")
    differ += [f"model.{k}={getattr(c, k)}" for k in ("qk_norm", "rope_scaling") if getattr(c, k)]
    if c.head_dim * c.n_heads != c.emb_dim:
        differ.append(f"model.head_dim={c.head_dim}")
    if gpt.head.bias is not None or gpt.head.out_features != c.vocab_size:
        differ.append("a classification head")
    return differ


def export_llama(model: nn.Module, tokenizer: str, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write model (a GPT with Llama's options, or a peft model around one, merged into a copy) as a Hugging Face
    LlamaForCausalLM folder: config.json, model.safetensors, generation_config.json, tokenizer.json and
    tokenizer_config.json (`tokenizer` is a name build_tokenizer takes), and with a run's `meta` llmtrain.json
    (what only llmtrain reads: the exact GPTConfig and the run's record). Written atomically; an existing out_dir
    is replaced only if it holds nothing but such files. Returns out_dir."""
    gpt = plain_gpt(model)
    c = gpt.config
    differ = llama_mismatches(gpt)
    if differ:
        raise UserError(f"the model cannot be written as a LlamaForCausalLM: it has {', '.join(differ)} (Llama: "
                        f"{', '.join(f'{k}={v}' for k, v in LLAMA_OPTIONS.items())}, one bias setting, an LM head)")
    tok = build_tokenizer(tokenizer)
    eot = tok.eot_token
    eot_text = tok.decode([eot])
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.emb_dim, "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.context_length, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": c.bias, "mlp_bias": c.bias, "tie_word_embeddings": c.tie_weights,
        "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": str(next(gpt.parameters()).dtype).removeprefix(
            "torch."), "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
    }
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot_text, "eos_token": eot_text,
                        "model_max_length": c.context_length, "add_bos_token": False, "add_eos_token": False}
    texts = {CONFIG: json.dumps(config, indent=2) + "\n",
             GENERATION: json.dumps({"bos_token_id": eot, "eos_token_id": eot}) + "\n",
             TOKENIZER_FILE: tokenizer_json(tokenizer),
             "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n"}
    if meta is not None:
        texts[LLMTRAIN_JSON] = record_text(gpt, meta, tokenizer, None)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in llama_state_dict(gpt).items()}
    ours = {WEIGHTS, *texts, LLMTRAIN_JSON}
    return write_export(Path(out_dir), tensors, texts, lambda p: {f.name for f in p.iterdir()} <= ours,
                        "a Llama export (it holds other files)")
