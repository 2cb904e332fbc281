"""Hugging Face's Llama-shaped families in and out: Llama (1, 2, 3.x; SmolLM and SmolLM2 are Llamas), Mistral
without a sliding window, Qwen2 (Qwen2.5) and Qwen3 folders <-> a GPT with Llama's options (rope, rmsnorm, swiglu)
and the family's own (RoPE scaling, q/k/v biases, QK-norm, a head width of its own).

    config.json             the family's config: LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM
    generation_config.json  the tokenizer's begin- and end-of-text tokens
    model.safetensors       model.layers.N.self_attn.q_proj.weight, ...; a tied head is stored once (embed_tokens)
    tokenizer.json, tokenizer_config.json   the tokenizer, as a Hugging Face fast tokenizer
    llmtrain.json           in llmtrain's exports: what only llmtrain reads (folders.py)

The families share one layout and differ in what their config.json fixes (FAMILIES): biases, QK-norm, sliding
windows (refused: our attention sees every earlier position), defaults of absent keys. In: a `save_pretrained` folder
(shards too; its `tokenizer.json` becomes the model's tokenizer), read with safetensors alone (hf.py downloads
the Hub names it knows). Out: `export_llama` writes the family that computes the model (Qwen3 for QK-norm, Qwen2
for q/k/v biases alone, else Llama), which `transformers.AutoModelForCausalLM.from_pretrained(out)` loads.

Names: q_proj, k_proj and v_proj are the row blocks of our one `attn.qkv`; o_proj is `attn.out_proj`; q_norm and
k_norm are `attn.q_norm` and `attn.k_norm`; gate_proj, up_proj and down_proj are `mlp.gate`, `mlp.fc1`, `mlp.fc2`.
q and k rows stay in transformers' layout: our RoPE pairs dimension i with i + head_dim/2 ("rotate_half"), as its
does, so no permutation is needed either way. No Lightning or Hydra.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from llmtrain.data.tokenizer import TOKENIZER_FILE, build_tokenizer
from llmtrain.data.tokenizer_json import tokenizer_json
from llmtrain.errors import UserError
from llmtrain.interop.checkpoints import ModelInfo, check_tensors, empty_gpt
from llmtrain.interop.folders import (
    CONFIG,
    GENERATION,
    LLMTRAIN_JSON,
    read_config_json,
    read_record,
    read_safetensors,
    record_text,
    stop_ids,
    write_export,
)
from llmtrain.interop.lora import plain_gpt
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.model.layers import ROPE_SCALING


@dataclass(frozen=True)
class Family:
    """What a Llama-shaped family of transformers fixes, and what its config.json may set."""

    architecture: str  # its causal LM class
    biases: str  # "attention_bias": Llama's attention_bias (q, k, v, o) and mlp_bias; "qkv": Qwen2's, always; "none"
    qk_norm: bool = False  # Qwen3's RMSNorm of each head's query and key
    sliding: str | None = None  # the key whose true value turns sliding-window attention on
    # transformers' values of the keys a config.json may leave out, where they are not LlamaConfig's
    defaults: dict = field(default_factory=dict)


FAMILIES = {
    "llama": Family("LlamaForCausalLM", "attention_bias"),
    "mistral": Family("MistralForCausalLM", "none", sliding="sliding_window",
                      defaults={"sliding_window": 4096, "max_position_embeddings": 131072, "num_key_value_heads": 8}),
    "qwen2": Family("Qwen2ForCausalLM", "qkv", sliding="use_sliding_window",
                    defaults={"max_position_embeddings": 32768, "num_key_value_heads": 32}),
    "qwen3": Family("Qwen3ForCausalLM", "none", qk_norm=True, sliding="use_sliding_window",
                    defaults={"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128}),
}
# per-layer tensors: ours -> Hugging Face's (weights and, where the config has them, biases)
LAYER_NAMES = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "attn.out_proj": "self_attn.o_proj",
               "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm", "mlp.gate": "mlp.gate_proj",
               "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj"}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # the row blocks of attn.qkv, in order
TOP_NAMES = {"tok_emb.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
LLAMA_OPTIONS = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
# every GPTConfig field is stated by config.json, but drop_rate (llmtrain.json alone)
STATED = [f.name for f in fields(GPTConfig) if f.name != "drop_rate"]


# --- in ---------------------------------------------------------------------------------------------------------


def read_llama_info(path: Path, what: str) -> ModelInfo:
    """The ModelInfo of a Llama-shaped family's folder, from its config.json (and llmtrain.json, if beside); its
    tokenizer is the tokenizer.json beside it (None when there is none: data.tokenizer must then name one)."""
    hf = read_config_json(path, what)
    tokenizer = path / TOKENIZER_FILE
    info = ModelInfo(kind="hf", path=str(path), model_config=config_from_llama(hf, what),
                     tokenizer=str(tokenizer.resolve()) if tokenizer.is_file() else None)
    return read_record(info, path, what, STATED, FAMILIES[hf["model_type"]].architecture)


def load_llama(path: Path, what: str, dtype: torch.dtype = torch.float32) -> tuple[GPT, ModelInfo]:
    """A Hugging Face folder of a Llama-shaped family -> (GPT with its weights in dtype, in eval mode on the CPU;
    ModelInfo)."""
    info = read_llama_info(path, what)
    model = empty_gpt(info.model_config, dtype)
    tensors = {k: v for k, v in read_safetensors(path, what).items()
               if not k.endswith("rotary_emb.inv_freq")}  # older transformers saved RoPE's frequencies
    if not any(k.startswith("model.") for k in tensors):  # a bare LlamaModel: no "model." and no head
        tensors = {f"model.{k}": v for k, v in tensors.items()}
    if model.tied:
        tensors.pop("lm_head.weight", None)  # the head is the embedding
    check_tensors(tensors, llama_state_dict(model), what, "config.json", "tensors", "safetensors weights")
    model.load_state_dict(state_dict_from_llama(tensors, info.model_config), strict=True)  # casts to dtype
    return model.eval(), info


def config_from_llama(hf: dict, what: str) -> GPTConfig:
    """A Llama-shaped family's config.json -> GPTConfig (transformers' defaults for absent keys); options whose
    computation our GPT does not implement are refused, all in one line, each by its key."""
    family = FAMILIES[hf.get("model_type")]
    hf = {"num_key_value_heads": hf.get("num_attention_heads")} | family.defaults | hf
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (ours is silu)")
    scaling = rope_scaling_from(hf, problems)
    if family.sliding and hf.get(family.sliding):
        problems.append(f"{family.sliding}={hf[family.sliding]} (a sliding window; ours sees the whole context)")
    if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
        problems.append(f"layer_types={sorted(set(hf['layer_types']))} (ours is full_attention in every layer)")
    qkv_bias, bias = biases_from(hf, family, problems)
    if problems:
        raise UserError(f"{what}: config.json sets {', '.join(problems)}, which llmtrain's GPT does not implement")
    rope = hf.get("rope_parameters") or {}  # transformers 5 writes rope_theta here; 4.x at the top level
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048),
                         emb_dim=hf["hidden_size"], n_heads=hf["num_attention_heads"], n_layers=hf["num_hidden_layers"],
                         n_kv_heads=hf["num_key_value_heads"] or hf["num_attention_heads"],
                         head_dim=hf.get("head_dim"), drop_rate=0.0, qkv_bias=qkv_bias, bias=bias,
                         tie_weights=bool(hf.get("tie_word_embeddings", False)), pos_emb="rope",
                         rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                         rope_scaling=scaling, norm="rmsnorm", qk_norm=family.qk_norm,
                         norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu",
                         mlp_hidden=hf["intermediate_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{what}: config.json lacks or mis-sets a size ({e!r}): it needs vocab_size, hidden_size, "
                        "intermediate_size, num_attention_heads and num_hidden_layers") from e


def rope_scaling_from(hf: dict, problems: list[str]) -> dict | None:
    """GPTConfig's rope_scaling from rope_parameters (transformers 5) or rope_scaling (4.x), by rope_type (or type);
    one that our RoPE does not compute is a problem naming the key."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(key) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"{key}.partial_rotary_factor={rope['partial_rotary_factor']} (ours turns the whole head)")
    if kind == "default":
        return None
    if kind not in ROPE_SCALING:
        problems.append(f"{key}.rope_type={kind!r} (ours is plain RoPE or {' or '.join(ROPE_SCALING)} scaling)")
        return None
    values = {"original_max_position_embeddings": hf.get("max_position_embeddings")} | rope  # transformers' fallback
    missing = [k for k in ROPE_SCALING[kind] if values.get(k) is None]
    if missing:
        problems.append(f"{key} of rope_type {kind!r} without {', '.join(missing)}")
    return {"type": kind, **{k: values.get(k) for k in ROPE_SCALING[kind]}}


def biases_from(hf: dict, family: Family, problems: list[str]) -> tuple[bool, bool]:
    """(qkv_bias, bias) of a config.json: Qwen2's q, k, v always; Llama's attention_bias (q, k, v, o) with mlp_bias
    alike (our bias is the output projection's and the MLP's together); none otherwise."""
    if family.biases == "qkv":
        return True, False
    attention, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if family.biases == "attention_bias" and attention != mlp:
        problems.append(f"attention_bias={attention} with mlp_bias={mlp} (ours has both or neither)")
    elif family.biases == "none" and attention:
        problems.append("attention_bias=true (biases on q, k, v and o without the MLP's: ours has the output "
                        "projection's only with the MLP's)")
    return attention, attention


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
    sizes = [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim]
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


def export_family(config: GPTConfig) -> str:
    """The model_type that computes a GPT of Llama's options: qwen3 with QK-norm, qwen2 with q/k/v biases alone,
    else llama (llama_mismatches says whether it really does)."""
    if config.qk_norm:
        return "qwen3"
    return "qwen2" if config.qkv_bias and not config.bias else "llama"


def llama_mismatches(gpt: GPT) -> list[str]:
    """What keeps a GPT from the layout of every Llama-shaped family (empty: export_llama can write it)."""
    c = gpt.config
    differ = [f"model.{k}={getattr(c, k)}" for k, v in LLAMA_OPTIONS.items() if getattr(c, k) != v]
    if c.qk_norm and (c.qkv_bias or c.bias):  # Qwen3 (as written: attention_bias false)
        differ.append(f"model.qk_norm=True with biases (model.qkv_bias={c.qkv_bias}, model.bias={c.bias})")
    elif c.bias and not c.qkv_bias:  # Llama: both or neither; Qwen2: q/k/v alone
        differ.append(f"model.qkv_bias={c.qkv_bias} with model.bias={c.bias}")
    if gpt.head.bias is not None or gpt.head.out_features != c.vocab_size:
        differ.append("a classification head")
    return differ


def export_llama(model: nn.Module, tokenizer: str, out_dir: str | Path, meta: dict | None = None,
                 overwrite: bool = False) -> Path:
    """Write model (a GPT with Llama's options, or a peft model around one, merged into a copy) as a Hugging Face
    folder of the family that computes it (export_family), the files at the top of this module (`tokenizer`: a name
    build_tokenizer takes; llmtrain.json with a run's `meta`). Written as folders.write_folder writes: the export's
    own files, the rest of an existing out_dir left as it is. Returns out_dir."""
    gpt = plain_gpt(model)
    differ = llama_mismatches(gpt)
    if differ:
        raise UserError(f"the model cannot be written as a LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM: it "
                        f"has {', '.join(differ)} (these: {', '.join(f'{k}={v}' for k, v in LLAMA_OPTIONS.items())}, "
                        f"biases on q, k, v (Qwen2), on every layer or none, an LM head)")
    c = gpt.config
    tok = build_tokenizer(tokenizer)
    eot = tok.eot_token
    bos = eot if getattr(tok, "bos_token", None) is None else tok.bos_token
    config = {**llama_config(c, export_family(c)), "bos_token_id": bos, "eos_token_id": eot,
              "torch_dtype": str(next(gpt.parameters()).dtype).removeprefix("torch.")}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.decode([bos]),
                        "eos_token": tok.decode([eot]), "model_max_length": c.context_length,
                        "add_bos_token": bool(getattr(tok, "add_bos", False)),
                        "add_eos_token": False} | ({"chat_template": meta["chat_template"]}
                                                   if meta and meta.get("chat_template") else {})
    texts = {CONFIG: json.dumps(config, indent=2) + "\n",
             GENERATION: json.dumps({"bos_token_id": bos, "eos_token_id": stop_ids(meta or {}, eot)}) + "\n",
             TOKENIZER_FILE: tokenizer_json(tokenizer),
             "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n"}
    if meta is not None:
        texts[LLMTRAIN_JSON] = record_text(gpt, meta, tokenizer, None)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in llama_state_dict(gpt).items()}
    return write_export(Path(out_dir), tensors, texts, overwrite)


def llama_config(c: GPTConfig, model_type: str) -> dict:
    """config.json's architecture keys for a GPT of Llama's options, in the family model_type."""
    family = FAMILIES[model_type]
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling:
        rope = {"rope_type": c.rope_scaling["type"], "rope_theta": c.rope_theta,
                **{k: v for k, v in c.rope_scaling.items() if k != "type"}}
    config = {
        "architectures": [family.architecture], "model_type": model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.emb_dim, "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.context_length, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
        "rope_theta": c.rope_theta, "rope_parameters": rope, "tie_word_embeddings": c.tie_weights,
        "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
    }
    if c.rope_scaling:  # where transformers 4.x reads it
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if family.biases != "qkv":  # Qwen3's attention_bias: false (llama_mismatches)
        config |= {"attention_bias": c.bias} | ({"mlp_bias": c.bias} if family.biases == "attention_bias" else {})
    if family.sliding == "use_sliding_window":
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": c.n_layers}
    return config
