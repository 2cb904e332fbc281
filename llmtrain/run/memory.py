"""The memory pre-flight: before any process starts training, the peak memory one process will need, against what
it has. A run that cannot fit stops with one line: the estimate, the limit, and the settings that lower it.

The estimate, per process, from the resolved run. The model is the one the stage will train, built by the stage's
own code on the meta device (no memory, no time): its head, its trainable part, its LoRA adapters, and what else
the stage holds (DPO's frozen reference).
- weights, gradients (trainable parameters only) and optimizer state (AdamW: 2 values per trainable parameter;
  Muon: 1 per matrix it takes, AdamW's 2 for the rest), at the precision's width (fp32 under mixed precision,
  which adds a 16-bit copy of the trainable ones); FSDP divides all three by the number of ranks (plus one
  unsharded block at a time);
- activations kept for the backward pass, per token of the micro-batch and per block that a gradient passes
  through: for GPT-2's shape 17 values of width emb_dim in fp32 (attention through fused SDPA kernels, which keep
  no T x T scores), 38 bytes x emb_dim under mixed precision; other shapes in proportion to what their blocks keep
  (block_values: heads of their own width, fewer key/value heads, RoPE, QK-norm, a gated MLP); one block's input
  with activation checkpointing; plus one block's worth for the gradients of the block being differentiated;
- the LM head's logits: 12 bytes (fp32) or 14 bytes (16-bit) per token and vocabulary entry at the peak of the
  loss (logits, log-softmax, their gradients), or with `perf.loss_chunk` one chunk's worth and the gradients
  that the chunked loss keeps;
- the runtime: Python, torch, Lightning and the data on a CPU (0.5 GiB), the CUDA context and the caching
  allocator's slack on a GPU (1 GiB).
The limit: each GPU's memory; on a CPU the available RAM (the container's limit when there is one) shared by
the `trainer.devices` processes; `perf.memory_gb` replaces either. Unknown accelerators are not checked.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from llmtrain.errors import UserError
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.run.distributed import is_launch_rank
from llmtrain.run.resolve import ResolvedRun
from llmtrain.stages.base import Stage, inner_gpt
from llmtrain.training.flops import layers_with_backward
from llmtrain.training.hardware import is_sharded, on_cuda
from llmtrain.training.optim import param_groups

GIB = 2**30
# per precision kind: (bytes per weight, gradient or optimizer value; activation bytes per token, block and unit of
# emb_dim of a block of GPT-2's shape, which keeps GPT2_BLOCK_VALUES; bytes per token and vocabulary entry at the
# loss's peak)
BYTES = {"mixed": (4, 38, 14), "16": (2, 34, 16), "32": (4, 68, 12), "64": (8, 136, 24)}
GPT2_BLOCK_VALUES = 17  # block_values of GPT-2's shape, per unit of emb_dim
RUNTIME = {"cpu": 0.5 * GIB, "cuda": 1.0 * GIB}
OPTIMIZER_STATES = {"AdamW": 2, "Adam": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Muon": 1, "Adagrad": 1,
                    "RMSprop": 1}  # values kept per trainable parameter; SGD: 1 with momentum, else 0
MUON_WITH_ADAMW = "MuonAdamW"  # Muon's 1 value (momentum) for the blocks' matrices, AdamW's 2 for the rest


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of one training process, by kind."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    runtime: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.runtime

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GIB:.2f}" for k in
                          ("weights", "gradients", "optimizer", "activations", "logits", "runtime"))
        return f"{self.total / GIB:.1f} GiB per process ({parts})"


def estimate(cfg: DictConfig, run: ResolvedRun) -> Estimate:
    """The peak memory of one training process of this run (see the module docstring)."""
    model, stage = meta_model(run)
    trained = {id(p): p for p in model.parameters()}
    n_all = sum(p.numel() for p in {**trained, **{id(p): p for p in stage.parameters()}}.values())
    n_train = sum(p.numel() for p in trained.values() if p.requires_grad)
    shards = ranks(cfg) if is_sharded(cfg.trainer.strategy) else 1
    kind = number_kind(run.precision)
    width, act_bytes, logit_bytes = BYTES[kind]
    config = run.model_config
    weights = n_all * width / shards  # the stage's own weights too: DPO's frozen reference
    if shards > 1:
        weights += n_all / config.n_layers * width  # the block being computed, gathered
    elif kind == "mixed":
        weights += 2 * n_train  # autocast caches a 16-bit copy of each trainable weight
    gradients = n_train * width / shards
    optimizer = optimizer_values(cfg, model) * width / shards
    tokens = cfg.data.batch_size * sequence_length(cfg, run) * stage.sequences_per_item
    per_block = act_bytes * block_values(config) / GPT2_BLOCK_VALUES  # GPT-2's: act_bytes * emb_dim
    per_block += 2 * config.emb_dim if config.drop_rate > 0 else 0  # dropout masks
    blocks = layers_with_backward(model, config.n_layers)
    strategy = cfg.trainer.strategy
    if cfg.perf.activation_checkpointing or (is_sharded(strategy) and "activation_checkpointing_policy" in strategy):
        activations = tokens * (blocks * config.emb_dim * width + per_block)  # block inputs, one block recomputed
    else:
        activations = tokens * blocks * per_block
    activations += tokens * per_block if blocks else 0  # the gradients of one block's activations, in its backward
    activations += tokens * 2 * config.emb_dim * width  # the embeddings' sum and the final LayerNorm's input
    logits = logits_bytes(stage, inner_gpt(model), tokens, logit_bytes, width)
    device = "cuda" if on_cuda(cfg.trainer.accelerator) else "cpu"
    return Estimate(weights, gradients, optimizer, activations, logits, RUNTIME[device])


def block_values(c: GPTConfig) -> int:
    """Values one block keeps per token for its backward pass: its two norms' inputs and outputs (4 x emb_dim); q, k
    and v (one tensor: heads x head_dim + 2 x kv heads x head_dim), the attention's output and the copy of it that
    the output projection reads (2 x heads x head_dim), and q and k again once rotated (RoPE) and once normalised
    (QK-norm); the MLP's hidden values: GELU's input and output (2 x mlp_hidden), or SwiGLU's gate, up, SiLU(gate)
    and product (4 x mlp_hidden). GPT-2's shape: 17 x emb_dim."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    attention = 3 * q + 2 * kv + (q + kv) * ((c.pos_emb == "rope") + c.qk_norm)
    return 4 * c.emb_dim + attention + (4 if c.mlp == "swiglu" else 2) * c.mlp_hidden


def logits_bytes(stage: Stage, gpt: GPT, tokens: int, per_value: int, width: int) -> float:
    """The loss's peak: all logits, their log-softmax and gradients at once; or, where the stage's loss runs the
    head a chunk at a time (its loss_chunk, with a plain head), a chunk's fp32 logits and the log-sum-exp's
    temporary (8 bytes a value; 12 when there are several chunks, since the next chunk's logits exist before the
    last one's are freed), plus the head's weight gradient (fp32) and the hidden states' gradient that the chunked
    loss keeps for the backward pass."""
    vocab, dim, chunk = gpt.head.out_features, gpt.config.emb_dim, stage.loss_chunk
    if chunk and type(gpt.head) is nn.Linear and gpt.head.bias is None:  # as the stage's lm_loss decides
        per_chunk = min(chunk, tokens) * vocab * (12 if tokens > chunk else 8)
        return per_chunk + vocab * dim * 4 + tokens * dim * width
    return tokens * vocab * per_value


def number_kind(precision: str | int) -> str:
    """mixed (fp32 weights, 16-bit matmuls), 16 (16-bit weights), 32 or 64, for a Lightning precision."""
    precision = str(precision)
    if "mixed" in precision:
        return "mixed"
    return "16" if precision.startswith(("bf16", "16")) else "64" if precision.startswith("64") else "32"


def meta_model(run: ResolvedRun) -> tuple[nn.Module, Stage]:
    """The model the stage will train and a copy of the stage (holding what else it keeps), built by the stage's own
    code on the meta device (shapes only)."""
    stage = copy.deepcopy(run.stage)
    with torch.device("meta"):
        model = stage.build_model(GPT(run.model_config))
    return model, stage


def optimizer_values(cfg: DictConfig, model: nn.Module) -> int:
    """Values the optimizer keeps for the model's trainable parameters: per parameter by its kind, and for Muon with
    AdamW by the group each parameter goes to (the optimizer's own grouping)."""
    name = str(cfg.optimizer._target_).rsplit(".", 1)[-1]
    groups = param_groups(model)
    if name == MUON_WITH_ADAMW:
        return sum(p.numel() * (OPTIMIZER_STATES["Muon"] if g["name"] == "matrix" else OPTIMIZER_STATES["AdamW"])
                   for g in groups for p in g["params"])
    per_value = (1 if cfg.optimizer.get("momentum") else 0) if name == "SGD" else OPTIMIZER_STATES.get(name, 2)
    return per_value * sum(p.numel() for g in groups for p in g["params"])  # unknown: as many as Adam keeps


def sequence_length(cfg: DictConfig, run: ResolvedRun) -> int:
    """The longest sequence of a micro-batch: the window (pretraining) or the longest record a table allows."""
    if "max_length" in cfg.data and cfg.data.max_length:
        return min(cfg.data.max_length, run.model_config.context_length)
    return run.context_length


def local_ranks(cfg: DictConfig) -> int:
    """Processes of the run on one machine: devices (a number, or all visible GPUs)."""
    devices = cfg.trainer.devices
    if isinstance(devices, int) and devices > 0:
        return devices
    return torch.cuda.device_count() if on_cuda(cfg.trainer.accelerator) else 1


def ranks(cfg: DictConfig) -> int:
    """Processes of the run: devices x nodes."""
    return local_ranks(cfg) * cfg.trainer.num_nodes


def limit(cfg: DictConfig) -> tuple[float, str] | None:
    """(bytes one process may use, how that was found), or None when it is not known (MPS, TPU, ...)."""
    if cfg.perf.memory_gb:
        return cfg.perf.memory_gb * GIB, f"perf.memory_gb={cfg.perf.memory_gb} allows {cfg.perf.memory_gb} GiB"
    if on_cuda(cfg.trainer.accelerator):
        devices = range(min(local_ranks(cfg), torch.cuda.device_count()) or 1)
        total = min(torch.cuda.get_device_properties(i).total_memory for i in devices)
        return total, f"{torch.cuda.get_device_name()} has {total / GIB:.1f} GiB"
    if str(cfg.trainer.accelerator) not in ("cpu", "auto"):
        return None
    available = available_ram()
    if available is None:
        return None
    n = local_ranks(cfg)
    shared = f"the {n} processes of trainer.devices={n} share" if n > 1 else "this process has"
    return available / n, f"{shared} {available / GIB:.1f} GiB of available RAM"


def available_ram() -> float | None:
    """RAM available to new processes: MemAvailable, or less when a container (cgroup) limit leaves less."""
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # no /proc (macOS): the physical RAM
        except (ValueError, OSError):
            return None
    try:
        cgroup = Path("/sys/fs/cgroup")
        cap = (cgroup / "memory.max").read_text().strip()
        if cap != "max":
            available = min(available, int(cap) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available


def preflight(cfg: DictConfig, run: ResolvedRun) -> Estimate:
    """Refuse a run that cannot fit in one line; warn when several CPU processes would share a few cores."""
    est = estimate(cfg, run)
    found = limit(cfg)
    if found is not None and est.total > found[0]:
        raise UserError(f"the run needs about {est} but {found[1]}: {', '.join(levers(cfg, run))}")
    n = local_ranks(cfg)
    if not on_cuda(cfg.trainer.accelerator) and n > 1 and is_launch_rank():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"warning: trainer.devices={n} without a GPU starts {n} processes that share this machine's {cores} CPU "
              f"cores (and its RAM): each gets a share of the cores, so the run is seldom faster than with "
              f"trainer.devices=1", file=sys.stderr)
    return est


def levers(cfg: DictConfig, run: ResolvedRun) -> list[str]:
    """The settings that lower the estimate, for this run."""
    out = ["lower data.batch_size (and raise trainer.accumulate_grad_batches, or set tokens_per_step, to keep the "
           "tokens per step)"]
    if not cfg.perf.activation_checkpointing:
        out.append("set perf.activation_checkpointing=true")
    cuda = on_cuda(cfg.trainer.accelerator)
    if cuda and not is_sharded(cfg.trainer.strategy):
        out.append("shard weights, gradients and optimizer state over the GPUs with trainer=fsdp")
    if not cuda and ranks(cfg) > 1:
        out.append("use fewer trainer.devices")
    if str(run.precision).startswith("32"):
        out.append("use trainer.precision=bf16-mixed")
    return [*out, "or set perf.memory_gb to a higher limit"]


def count_params(config: GPTConfig) -> int:
    """The parameters of GPT(config), from two models of one and two blocks built on the meta device: what a
    config.json describes is counted before anything is allocated, however many blocks it names."""
    with torch.device("meta"):
        one, two = (GPT(replace(config, n_layers=n)).num_params() for n in (1, 2))
    return one + (config.n_layers - 1) * (two - one)


def check_loading(config: GPTConfig, what: str, doing: str, copies: int, context_tokens: int = 0) -> None:
    """Refuse in one line, before any weights are read, a model that could not be loaded here: `copies` fp32 copies
    of its weights (the file's tensors and the model's, plus the export's), and with `context_tokens` what decoding
    keeps (the KV cache and one step's logits over the context, the ids). Checked against the available RAM, where
    loading happens; sizes come from the source's own config (a hostile config.json with a billion layers ends
    here, not in the allocator)."""
    n = count_params(config)
    weights = copies * 4 * n
    tokens = min(context_tokens, config.context_length)
    decoding = 4 * tokens * (2 * config.n_layers * config.n_kv_heads * config.head_dim + config.vocab_size)
    need = weights + decoding + 8 * context_tokens + RUNTIME["cpu"]
    available = available_ram()
    if available is not None and need > available:
        raise UserError(f"{what} describes a model of {n:,} parameters (n_layers={config.n_layers}, emb_dim="
                        f"{config.emb_dim}, vocab_size={config.vocab_size}) that needs about {need / GIB:,.1f} GiB to "
                        f"{doing} (weights {weights / GIB:,.2f}, decoding {decoding / GIB:,.2f}), but this machine has "
                        f"{available / GIB:.1f} GiB of available RAM: check the sizes in its config, or use a machine "
                        "with more memory")
