"""What a run prints: each line once, no advertisements or warnings a user cannot act on, and a model summary
that states the parameters and the training FLOPs per token.

Hydra's job logging owns the console and `<run_dir>/train.log` (conf/config.yaml, hydra.job_logging). Lightning
adds a console handler of its own to the `lightning` logger on import, while its messages also reach Hydra's
handlers: every INFO line was printed twice. `quiet_lightning` removes Lightning's handler where Hydra's are set
up, drops Lightning's "Tip: ... litlogger" advertisement, and silences warnings a user cannot act on: a deprecation
that Lightning's own code raises with this torch, and a "number of training batches is smaller than the logging
interval" that does not hold for runs measured in steps (debug=overfit trains on one batch per epoch).
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities import rank_zero_info

from llmtrain.model.gpt import GPT
from llmtrain.training.flops import attention_width, training_flops

ADVERTS = ("💡 Tip:",)  # Lightning's suggestions to install its cloud services
NOISE = (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # lightning/pytorch/utilities/_pytree.py
         # runs are measured in steps: the loss is logged every log_every_n_steps steps across epochs, however short
         r".*is smaller than the logging interval.*")


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERTS)


def quiet_lightning() -> None:
    """One handler per line: Lightning's own console handler goes when the root logger has handlers (Hydra's, or
    pytest's) to carry its messages; its advertisements and its deprecation noise go always. Idempotent."""
    if logging.getLogger().hasHandlers():
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            log = logging.getLogger(name)
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in log.filters):
            log.addFilter(_DropAdverts())
    for message in NOISE:
        warnings.filterwarnings("ignore", message=message)


def human(n: float) -> str:
    """7233536 -> '7.23 M' (k, M, G, T, P)."""
    for unit in ("", " k", " M", " G", " T"):
        if abs(float(f"{n:.3g}")) < 1000:  # as printed: 999,999 is "1 M", not "1e+03 k"
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g} P"


def describe_model(gpt: GPT, context_length: int) -> str:
    """Three lines: the architecture, the parameters, the training FLOPs per token at this context length."""
    c = gpt.config
    weights = gpt.num_params(exclude_embeddings=True)
    if not gpt.tied:
        weights -= gpt.tok_emb.weight.numel()
    flops = training_flops(gpt, c.n_layers, attention_width(c)).of_batch(1, context_length)
    if all(p.requires_grad for p in gpt.parameters()):
        how = (f"6 x {human(weights)} weights + attention 12 x {c.n_layers} layers x {attention_width(c)} x "
               f"{context_length} tokens")
    else:
        how = "2 per weight forward, backward 4 per trained and 2 per frozen weight that a gradient passes, attention"
    head = "tied to the token embedding" if gpt.tied else f"untied, {gpt.head.out_features:,} outputs"
    return "\n".join([
        f"model: GPT, {c.n_layers} layers, width {c.emb_dim}, {c.n_heads} heads of {c.head_dim}, context "
        f"{c.context_length}, "
        f"vocab {c.vocab_size:,}, head {head}",
        f"  parameters: {gpt.num_params():,} ({human(gpt.num_params())}), {human(weights)} outside lookup tables",
        f"  training FLOPs per token: {human(flops)} ({how}), {human(flops * context_length)} per sequence",
    ])


class ModelSummary(LightningModelSummary):
    """Replaces Lightning's table, whose FLOPs column needs an example input (it reads 0 without one), with
    `describe_model` at the run's sequence length (the data module's context_length; the model's without one)."""

    def __init__(self) -> None:
        super().__init__(max_depth=1)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        context_length = getattr(trainer.datamodule, "context_length", None) or pl_module.gpt.config.context_length
        rank_zero_info(describe_model(pl_module.gpt, context_length))
