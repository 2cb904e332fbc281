"""Build the model for a stage: start from pretrained weights (an llmtrain checkpoint or GPT-2 from Hugging Face).

`load_pretrained(init_from)` accepts
  - an llmtrain Lightning checkpoint (`.ckpt`) or a run directory (its `checkpoints/last.ckpt`, else its export
    `model/`);
  - an llmtrain export directory (`config.json` with "format": "llmtrain" + `model.safetensors`, see export.py);
  - a local directory in Hugging Face `save_pretrained` layout of a GPT-2 (`config.json` + `model.safetensors`,
    possibly sharded), read directly with safetensors: transformers is not needed;
  - a Hub name (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`), downloaded with huggingface_hub.
The model's config always follows the checkpoint; `check_fits` compares it with what the user's `model` group
asks for. No Lightning or Hydra here.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import torch
from torch import nn

from llmtrain.errors import UserError
from llmtrain.model import GPT, GPTConfig

# Hub name -> our model config (conf/model/<name>.yaml) with the same shapes
HF_GPT2_NAMES = {"gpt2": "gpt124m", "gpt2-medium": "gpt355m", "gpt2-large": "gpt774m", "gpt2-xl": "gpt1558m"}
# (emb_dim, n_layers, n_heads) of each released GPT-2, to suggest model=<name> when shapes disagree
GPT2_SHAPES = {"gpt124m": (768, 12, 12), "gpt355m": (1024, 24, 16), "gpt774m": (1280, 36, 20),
               "gpt1558m": (1600, 48, 25)}
# prefixes that wrappers put in front of the GPT's own keys: the LightningModule, torch.compile, peft
WRAPPER_PREFIXES = ("model.", "_orig_mod.", "base_model.model.")
# GPT-2 stores these as Conv1D, (in, out); our nn.Linear wants (out, in)
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# per-layer HF name -> ours
HF_LAYER_NAMES = {
    "ln_1": "ln1", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.out_proj", "ln_2": "ln2",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
HF_TOP_NAMES = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "ln_f.weight": "ln_f.weight",
                "ln_f.bias": "ln_f.bias"}
ACCEPTS = ("an llmtrain .ckpt file, a run directory, an llmtrain export directory, a local Hugging Face GPT-2 "
           f"directory (config.json + model.safetensors) or a Hub name ({', '.join(HF_GPT2_NAMES)})")


def load_pretrained(init_from: str) -> tuple[GPT, dict]:
    """init_from -> (GPT with the checkpoint's config and weights, in eval mode on the CPU; info dict).

    info: {"kind": "llmtrain" | "hf", "tokenizer": name for llmtrain.tokenizer, "path": the file or directory read,
    and for Hub names "hub_name", "model_name" (our conf/model name); an export adds "label_names" and
    "prompt_template"}. A run directory is read from checkpoints/last.ckpt when it has one, else from its export.
    """
    path = Path(init_from).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            from llmtrain.export import peek_config  # imported here: export.py imports this module

            if peek_config(path) is not None:
                return _load_export(path, init_from)
            return _load_hf_dir(path, init_from)
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return _load_llmtrain(candidate, init_from)
        if (path / "model" / "config.json").is_file():
            return _load_export(path / "model", init_from)
        raise UserError(f"init_from={init_from}: the directory holds neither config.json nor checkpoints/last.ckpt "
                        f"nor model/config.json; init_from accepts {ACCEPTS}")
    if path.is_file():
        return _load_llmtrain(path, init_from)
    hub_name = init_from.removeprefix("openai-community/")
    if hub_name in HF_GPT2_NAMES:
        model, info = _load_hf_dir(_download(init_from), init_from)
        return model, info | {"hub_name": init_from, "model_name": HF_GPT2_NAMES[hub_name]}
    raise UserError(f"init_from={init_from}: no such file or directory, nor a known Hub name; init_from accepts "
                    f"{ACCEPTS}")


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the wrapper prefixes (`model.`, `_orig_mod.`, `base_model.model.`, in any nesting) from every key."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def check_fits(model_config: GPTConfig, requested: dict) -> None:
    """Raise a UserError naming every key of the requested `model` group whose shape the checkpoint cannot fill.

    A shorter requested context_length fits (crop the position table with `crop_context`); a longer one does not.
    """
    name = _gpt2_name(model_config)
    fix = f"pick model={name} or drop the model override" if name else "drop the model override"
    problems = []
    for key in ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_weights"):
        want, have = requested.get(key), getattr(model_config, key)
        if want is not None and want != have:
            problems.append(f"model.{key}={want} but the checkpoint has {have}: {fix}")
    ctx = requested.get("context_length")
    if ctx is not None and ctx > model_config.context_length:
        problems.append(f"model.context_length={ctx} but the checkpoint's position table covers "
                        f"{model_config.context_length}: set model.context_length<={model_config.context_length}")
    if problems:
        raise UserError("; ".join(problems))


def crop_context(model: GPT, context_length: int) -> GPT:
    """Keep the first context_length rows of the position table (nanoGPT's crop_block_size); in place."""
    if not 1 <= context_length <= model.config.context_length:
        raise ValueError(f"can only crop to 1..{model.config.context_length} positions, got {context_length}")
    model.config = dataclasses.replace(model.config, context_length=context_length)
    model.pos_emb.weight = nn.Parameter(model.pos_emb.weight[:context_length].detach().clone())
    model.pos_emb.num_embeddings = context_length
    return model


def _gpt2_name(config: GPTConfig) -> str | None:
    shape = (config.emb_dim, config.n_layers, config.n_heads)
    return next((name for name, s in GPT2_SHAPES.items() if s == shape and config.vocab_size == 50257), None)


# --- llmtrain checkpoints --------------------------------------------------------------------------------------


def _load_llmtrain(path: Path, init_from: str) -> tuple[GPT, dict]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # a pickle opcode the safe loader rejects: text, not a checkpoint
            raise UserError(f"init_from={init_from}: {path} is not a PyTorch checkpoint; init_from accepts "
                            f"{ACCEPTS}") from e
        culprit = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        culprit = culprit.split(" was not")[0].removeprefix("WeightsUnpickler error: ")
        raise UserError(
            f"init_from={init_from}: {path} holds Python objects besides tensors ({culprit}), which safe loading "
            "(weights_only=True) refuses: save a checkpoint of plain dicts and tensors, as llmtrain's own are"
        ) from e
    except Exception as e:  # a text file, a truncated zip, ...: torch raises a variety of types
        raise UserError(f"init_from={init_from}: {path} is not a PyTorch checkpoint ({type(e).__name__}); "
                        f"init_from accepts {ACCEPTS}") from e
    if not isinstance(ckpt, dict) or "llmtrain" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"init_from={init_from}: {path} is a PyTorch file but not an llmtrain checkpoint (no "
                        f"'llmtrain' and 'state_dict' entries); init_from accepts {ACCEPTS}")
    meta = ckpt["llmtrain"]
    try:
        config = GPTConfig(**meta["model_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"init_from={init_from}: the checkpoint's model config is unusable ({e})") from e
    model = GPT(config)
    _load_state(model, strip_prefixes(ckpt["state_dict"]), init_from)
    info = {"kind": "llmtrain", "tokenizer": meta.get("tokenizer", "gpt2"), "task": meta.get("task", "lm"),
            "path": str(path)}
    return model.eval(), info


def _load_export(path: Path, init_from: str) -> tuple[GPT, dict]:
    """An export folder (export.py): its messages name the folder; here they also name init_from."""
    from llmtrain.export import load_export

    try:
        return load_export(path)
    except UserError as e:
        raise UserError(f"init_from={init_from}: {e}") from e


def checkpoint_meta(path: str, what: str) -> dict:
    """The llmtrain section of a checkpoint (model config, tokenizer, task), read without unpickling objects."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{what} cannot be read: it is truncated, corrupt or not a checkpoint ({type(e).__name__}); "
                        f"pass another one (ckpt_path=auto hydra.run.dir=<its run dir> takes the newest one that "
                        f"loads)") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{what} is not a Lightning checkpoint (no state_dict): pass a .ckpt written by llmtrain")
    return checkpoint.get("llmtrain") or {}


def _load_state(model: GPT, state_dict: dict[str, torch.Tensor], init_from: str) -> None:
    """Copy every tensor into the model; missing, unexpected and mis-shaped keys are one UserError."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state_dict and state_dict[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        hint = " (LoRA weights: merge them into the base first)" if any("lora_" in k for k in unexpected) else ""
        problems.append(f"unexpected keys {_few(unexpected)}{hint}")
    if wrong:
        problems.append(f"shapes differ from the checkpoint's own model config: {_few(wrong)}")
    if problems:
        raise UserError(f"init_from={init_from}: the weights do not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state_dict)


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# --- Hugging Face GPT-2 ----------------------------------------------------------------------------------------


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.json"]))
    except Exception as e:  # offline, no huggingface_hub, a proxy, ...
        raise UserError(
            f"init_from={repo_id}: the weights could not be downloaded from the Hugging Face Hub ({type(e).__name__}); "
            "a local directory in save_pretrained layout (config.json + model.safetensors) also works"
        ) from e


def _load_hf_dir(path: Path, init_from: str) -> tuple[GPT, dict]:
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"init_from={init_from}: {path / 'config.json'} is not readable JSON ({e})") from e
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        found = hf.get("model_type") if isinstance(hf, dict) else None
        raise UserError(f"init_from={init_from}: config.json has model_type={found!r}, but only GPT-2 (model_type "
                        f"'gpt2') maps onto llmtrain's GPT; init_from accepts {ACCEPTS}")
    config = _config_from_hf(hf, init_from)
    model = GPT(config)
    _copy_hf_weights(model, _read_safetensors(path, init_from), hf.get("tie_word_embeddings", True), init_from)
    return model.eval(), {"kind": "hf", "tokenizer": "gpt2", "path": str(path)}


def _config_from_hf(hf: dict, init_from: str) -> GPTConfig:
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
        raise UserError(f"init_from={init_from}: config.json sets {', '.join(problems)}, which llmtrain's GPT "
                        "does not implement")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", hf.get("n_ctx")),
                         emb_dim=hf["n_embd"], n_heads=hf["n_head"], n_layers=hf["n_layer"], drop_rate=0.0,
                         qkv_bias=True, tie_weights=hf.get("tie_word_embeddings", True))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"init_from={init_from}: config.json lacks or mis-sets a GPT-2 size ({e!r}): it needs "
                        "vocab_size, n_positions, n_embd, n_head and n_layer") from e


def _read_safetensors(path: Path, init_from: str) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard that model.safetensors.index.json names."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8])
        raise UserError(f"init_from={init_from}: no model.safetensors (or model.safetensors.index.json) next to "
                        f"config.json (found: {found}); save with save_pretrained(dir, safe_serialization=True)")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (path / shard).is_file():
            raise UserError(f"init_from={init_from}: the shard {shard} named in {index.name} is missing")
        tensors |= load_file(path / shard, device="cpu")
    return tensors


def _copy_hf_weights(model: GPT, hf_sd: dict[str, torch.Tensor], tied: bool, init_from: str) -> None:
    """Rename GPT-2's tensors to ours, transpose its Conv1D weights, check every shape and copy.

    Messages name the tensors as the safetensors files do (without `transformer.`).
    """
    renamed: dict[str, tuple[str, torch.Tensor]] = {}  # our key -> (GPT-2 key, tensor in our layout)
    unexpected = []
    for key, value in hf_sd.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        if key == "lm_head.weight" and tied:
            continue  # the head is wte
        if key.endswith(HF_TRANSPOSED):
            value = value.t()
        ours = "head.weight" if key == "lm_head.weight" else _hf_to_ours(key)
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
    problems = ([f"missing tensors for {_few(missing)}"] if missing else []) + (
        [f"unexpected tensors {_few(unexpected)}"] if unexpected else []) + (
        [f"shapes disagree: {_few(wrong)}"] if wrong else [])
    if problems:
        raise UserError(f"init_from={init_from}: the safetensors weights do not match config.json: "
                        f"{'; '.join(problems)}")
    with torch.no_grad():
        for k, param in own.items():
            param.copy_(renamed[k][1])  # casts fp16/bf16 checkpoints to the model's fp32


def _hf_shape(entry: tuple[str, torch.Tensor]) -> tuple[int, ...]:
    """A tensor's shape as GPT-2 stores it (Conv1D weights transposed back)."""
    key, t = entry
    return tuple(t.t().shape if key.endswith(HF_TRANSPOSED) else t.shape)


def _hf_to_ours(key: str) -> str | None:
    """'h.3.attn.c_attn.weight' -> 'blocks.3.attn.qkv.weight'; None for a name GPT-2 does not have."""
    if key in HF_TOP_NAMES:
        return HF_TOP_NAMES[key]
    parts = key.split(".")
    if len(parts) < 4 or parts[0] != "h" or not parts[1].isdigit():
        return None
    module, leaf = ".".join(parts[2:-1]), parts[-1]
    if module not in HF_LAYER_NAMES or leaf not in ("weight", "bias"):
        return None
    return f"blocks.{parts[1]}.{HF_LAYER_NAMES[module]}.{leaf}"


# ---- stage surgery: heads and trainable parameters ----

TRAIN_BLOCKS_CHOICES = "all, last, head, none, or N (the last N blocks)"


def replace_head(model: GPT, num_classes: int) -> GPT:
    """A new linear head to `num_classes` (untied from the embedding), initialised like the rest of GPT-2."""
    head = torch.nn.Linear(model.config.emb_dim, num_classes, bias=True)
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    model.head = head.to(model.tok_emb.weight.device)
    return model


def set_trainable(model: GPT, train_blocks: str | int) -> None:
    """Freeze all but: every parameter ("all"); the last N blocks + final LayerNorm + head (N or "last" = 1);
    the head only ("head"); nothing ("none", for LoRA, which unfreezes its own adapters)."""
    if train_blocks == "all":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    if train_blocks == "none":
        return
    if train_blocks == "head":
        n = 0
    elif train_blocks == "last":
        n = 1
    else:
        try:
            n = int(train_blocks)
        except (TypeError, ValueError):
            raise UserError(f"finetune.train_blocks={train_blocks!r} is not one of {TRAIN_BLOCKS_CHOICES}") from None
        if not 0 <= n <= len(model.blocks):
            raise UserError(f"finetune.train_blocks={n} but the model has {len(model.blocks)} blocks: "
                            f"choose 0..{len(model.blocks)} or all")
    for block in list(model.blocks)[len(model.blocks) - n:] if n else []:
        block.requires_grad_(True)
    if n:
        model.ln_f.requires_grad_(True)
    model.head.requires_grad_(True)
    if model.head.weight is model.tok_emb.weight:  # a tied LM head: training it trains the embedding too
        model.tok_emb.requires_grad_(True)
