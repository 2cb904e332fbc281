"""The LightningModule: one training loop for every stage, around a plain nn.Module.

It never reads the Hydra config and never asks which stage it runs: train.py hands it the model, the stage (which
turns a batch into a loss and evaluation sums into metrics: llmtrain/stages), an optimizer factory (a partial of
the optimizer class) and the schedule's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from torch import nn

from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.errors import UserError
from llmtrain.model.gpt import GPT
from llmtrain.stages.base import Stage, inner_gpt
from llmtrain.stages.text import generate_text
from llmtrain.training.hardware import is_sharded
from llmtrain.training.nonfinite import NonFiniteGuard
from llmtrain.training.optim import lr_factor, param_groups
from llmtrain.training.resume import gather_rng_states, set_rng_states
from llmtrain.training.sharded import skip_sharded


class LanguageModel(L.LightningModule):
    """Trains `model` as `stage` says, with the loss averaged over every unit (token, pair, sequence) of the whole
    optimizer step: all micro-batches of gradient accumulation and all ranks (so a short answer weighs less than a
    long one, and the result does not depend on how a step is split). See `on_before_optimizer_step`."""

    LOSS_SCALE = 1024.0  # keeps the summed losses that backward sees at a familiar magnitude before the exact rescale

    def __init__(
        self,
        model: nn.Module,
        stage: Stage,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int,
        max_steps: int,
        min_lr_ratio: float,
        cooldown_fraction: float | None = None,
        tokenizer: str = "gpt2",
        checkpoint_info: dict | None = None,
        max_nonfinite_steps: int = 0,
        new_optimizer_settings: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.stage = model, stage
        self.optimizer_factory = optimizer
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        self.cooldown_fraction = cooldown_fraction
        self.tokenizer_name = tokenizer
        self.checkpoint_info = checkpoint_info or {}
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self.new_optimizer_settings = new_optimizer_settings  # a resume takes this run's lr, betas, weight decay...
        self._step_units = torch.zeros(())
        self._eval: dict[str, torch.Tensor] = {}
        self.validated_at_step = -1  # global step of the last finished validation

    @property
    def gpt(self) -> GPT:
        """The GPT inside any wrapper (peft's PeftModel keeps it at base_model.model)."""
        return inner_gpt(self.model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    # ---- training: the loss averaged over the units of the whole optimizer step ----

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # No host sync and no collective here (a progress-bar metric would be read back every batch): the NaN
        # guard looks at the step as a whole in on_before_optimizer_step.
        loss_sum, units, logs = self.stage.loss(self.model, batch)
        self._step_units = self._step_units.to(units.device) + units
        mean = loss_sum / units.clamp(min=1)
        self.guard.add(mean)
        bs = batch["input_ids"].size(0)
        self.log("train/loss", mean, batch_size=bs)
        for name, value in logs.items():
            self.log(f"train/{name}", value, batch_size=bs)
        return loss_sum / self.LOSS_SCALE

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The token-averaged loss, in one place. Each micro-batch m of each rank r returned L[m,r] / S, its summed
        loss over S = LOSS_SCALE. Lightning divided that by A = accumulate_grad_batches before backward and DDP
        averaged the gradients over the W ranks, so the gradients hold  grad( sum L[m,r] ) / (S * A * W).  The step's
        loss is the mean over its N units,  sum L[m,r] / N,  with N counted over every micro-batch and rank. So the
        gradients are multiplied by  S * A * W / N.  N takes one all-reduce of one number per step where ranks count
        different units (padded records, pairs); a stage whose micro-batches all hold the same number (pretraining's
        full windows) has N = W x this rank's count without it."""
        params = [p for p in self.parameters() if p.grad is not None]
        units, world = self._step_units.float(), self.trainer.world_size
        units = self.trainer.strategy.reduce(units, reduce_op="sum") if self.stage.counts_vary else units * world
        factor = self.LOSS_SCALE * self.trainer.accumulate_grad_batches * world / units.clamp(min=1)
        for p in params:
            p.grad.mul_(factor.to(p.grad.dtype))
        self._step_units = torch.zeros((), device=self._step_units.device)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # before clipping; on the device
        logging = (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0  # as Lightning decides
        if self.guard.skip_step(self, norm, sync=logging):
            for p in params:  # the optimizer leaves parameters without a gradient (and their state) alone
                p.grad = None
        elif params and logging:
            if is_sharded(self.trainer.strategy):  # each rank holds a shard of the gradients
                norm = self.trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
            self.log("train/grad_norm", norm)

    # ---- evaluation (validation and test share it): sums over the split, reduced once at the end ----

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        for name, value in self.stage.eval_sums(self.model, batch).items():
            self._eval[name] = self._eval[name] + value if name in self._eval else value

    def _eval_end(self, prefix: str) -> None:
        """Exact metrics over the whole split: every rank's sums added (each sample is on exactly one rank), then
        the stage's metrics of the totals."""
        totals = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sorted(self._eval.items())}
        self._eval = {}
        for name, value in self.stage.eval_metrics(totals).items():
            self.log(f"{prefix}/{name}", value, prog_bar=prefix == "val" and name == self.stage.progress_metric)

    def on_validation_epoch_start(self) -> None:
        self.guard.check(self)  # a validation inside fit is a sync point: never validate weights after a NaN
        self._eval = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.global_step
            self._log_samples()

    def on_test_epoch_start(self) -> None:
        self._eval = {}

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def _log_samples(self) -> None:
        """Write continuations of the stage's sample prompts to the trackers that show text (a logger's
        `log_samples`: TensorBoard's text tab, MLflow artifacts, a W&B table), rank zero only; none under FSDP,
        where rank zero alone cannot run the sharded model."""
        writers = [logger for logger in self.loggers if hasattr(logger, "log_samples")]
        if not self.stage.sample_prompts or not self.stage.sample_tokens or not writers:
            return
        if is_sharded(self.trainer.strategy):
            skip_sharded("text samples")
            return
        if self.global_rank != 0:
            return
        tok = build_tokenizer(self.tokenizer_name)
        samples = {}
        for i, prompt in enumerate(self.stage.sample_prompts):
            new = generate_text(self.gpt, tok, prompt, self.stage.sample_tokens, temperature=0.8, top_k=50, seed=i)
            samples[f"samples/{i}"] = f"{prompt}**{new}**"
        for logger in writers:
            logger.log_samples(samples, self.global_step)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm=None) -> None:
        """As Lightning clips, except in two cases where Lightning refuses what the defaults ask for:
        - under FSDP, the norm is over every rank's shards: FSDP's own clip_grad_norm_ (a collective) computes it;
        - bf16-mixed with a fused optimizer: Lightning refuses any mixed precision with one, since fp16's scaler
          would leave the gradients scaled until the fused step, but bf16 has no scaler. (On GPUs, bf16-mixed and
          a fused AdamW are both the defaults.)"""
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
        plugin, strategy = self.trainer.precision_plugin, self.trainer.strategy
        if gradient_clip_val and algorithm == GradClipAlgorithmType.NORM and isinstance(strategy, FSDPStrategy):
            strategy.model.clip_grad_norm_(gradient_clip_val)
        elif gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)  # the unchecked base clip
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(param_groups(self.model))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.warmup_steps, self.max_steps, self.min_lr_ratio,
                                             self.cooldown_fraction)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.guard.check(self)  # a checkpoint never holds the weights of a step after a NaN
        # checkpoints describe themselves: the model config, tokenizer and stage travel with the weights
        checkpoint["llmtrain"] = {"tokenizer": self.tokenizer_name, **self.checkpoint_info, **self.stage.record(),
                                  "model_config": asdict(self.gpt.config), "step": self.global_step}
        # and what an exact resume needs beyond Lightning's own state: every rank's generators
        checkpoint["llmtrain_resume"] = {"rng": gather_rng_states(), "nonfinite_steps": self.guard.skipped}
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("stage.")]:
            del state[key]  # what the stage holds (DPO's frozen reference) is init_from's weights: loaded, not saved

    def _take_new_optimizer_settings(self, checkpoint: dict) -> None:
        """resume.apply named optimizer settings: the resumed optimizer keeps its moments and step counts, and takes
        this run's hyperparameters; the schedule goes on from its step with the new peak lr."""
        fresh = self.optimizer_factory(param_groups(self.model)).state_dict()["param_groups"]  # allocates no state
        saved = checkpoint["optimizer_states"][0]["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in fresh]:
            raise UserError("resume.apply: the checkpoint's optimizer groups its parameters otherwise than this "
                            "run's: resume with the checkpoint's optimizer settings")
        for old, new in zip(saved, fresh):
            peak = old.get("initial_lr", old["lr"])
            old.update({k: v for k, v in new.items() if k not in ("params", "lr", "initial_lr")})
            old["lr"] = old["lr"] * new["lr"] / peak  # the schedule's factor at this step, on the new peak
            old["initial_lr"] = new["lr"]
        for schedule in checkpoint.get("lr_schedulers", []):
            schedule["base_lrs"] = [g["initial_lr"] for g in saved]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stage_state = self.stage.state_dict()  # the stage's own weights as the recipe built them, for the strict load
        if stage_state:
            checkpoint["state_dict"] |= {f"stage.{k}": v for k, v in stage_state.items()}
        if self.new_optimizer_settings and checkpoint.get("optimizer_states"):
            self._take_new_optimizer_settings(checkpoint)
        resume = checkpoint.get("llmtrain_resume")
        if resume:
            self.guard.skipped = resume["nonfinite_steps"]
            self._rng_to_restore = resume["rng"]

    def on_train_end(self) -> None:
        self.guard.check(self)

    def on_train_start(self) -> None:
        # restored as late as possible: nothing between here and the first batch draws a random number
        states = getattr(self, "_rng_to_restore", None)
        if states:
            if len(states) == self.trainer.world_size:
                set_rng_states(states[self.global_rank])
            else:
                rank_zero_warn(f"the checkpoint holds random states of {len(states)} ranks, this run has "
                               f"{self.trainer.world_size}: they are not restored (the resume is not exact)")
            self._rng_to_restore = None
