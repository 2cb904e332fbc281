"""The LightningModule: loss, metrics, optimizer and schedule around a plain nn.Module.

It never reads the Hydra config: train.py hands it the model, an optimizer factory (a partial of the
optimizer class) and the schedule's numbers. The losses themselves live in losses.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from torch import nn

from llmtrain.data.tokenizer import build_tokenizer, continuation_text
from llmtrain.model.gpt import GPT
from llmtrain.model.losses import chunked_lm_loss_sum, last_token_logits, lm_loss_sum
from llmtrain.stages.dpo import PAIR_STATS, DPOLoss
from llmtrain.training.nonfinite import NonFiniteGuard
from llmtrain.training.optim import lr_factor, param_groups
from llmtrain.training.resume import gather_rng_states, set_rng_states
from llmtrain.training.sharded import is_sharded, skip_sharded


class LanguageModel(L.LightningModule):
    """One module for every stage; `task` picks the loss.

    - task "lm" (pretrain, instruct): cross-entropy over every position whose label is not IGNORE_INDEX,
      averaged over all such tokens of the whole optimizer step: all micro-batches of gradient accumulation
      and all DDP ranks (so a short answer weighs less than a long one). Each micro-batch contributes its
      summed loss; `on_before_optimizer_step` divides the accumulated gradient by the global token count.
    - task "classify": the model's head maps to classes; the logits of the last real (non-pad) token of
      each sequence are the prediction; cross-entropy per sequence; accuracy and macro-F1.
    - task "dpo": `preference` (dpo.py) scores the policy against its frozen reference on pairs; the loss is
      averaged over all pairs of the optimizer step as "lm" averages over tokens; rewards and log-probabilities.
    """

    LOSS_SCALE = 1024.0  # keeps summed-token losses at a familiar magnitude before the exact rescale

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int,
        max_steps: int,
        min_lr_ratio: float,
        tokenizer: str = "gpt2",
        task: str = "lm",
        label_names: list[str] | None = None,
        sample_prompts: list[str] | None = None,
        sample_tokens: int = 48,
        checkpoint_info: dict | None = None,
        max_nonfinite_steps: int = 0,
        loss_chunk: int | None = None,
        tokens_vary: bool = True,
        preference: DPOLoss | None = None,
    ) -> None:
        super().__init__()
        if task not in ("lm", "classify", "dpo"):
            raise ValueError(f"task must be 'lm', 'classify' or 'dpo', got {task!r}")
        if (task == "dpo") != (preference is not None):
            raise ValueError("task 'dpo' takes a preference loss (DPOLoss), and only it does")
        self.model, self.preference = model, preference
        self.optimizer_factory = optimizer
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        self.tokenizer_name, self.task, self.label_names = tokenizer, task, label_names
        self.sample_prompts, self.sample_tokens = sample_prompts or [], sample_tokens
        self.checkpoint_info = checkpoint_info or {}
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self.loss_chunk = loss_chunk  # tokens per chunk of the LM head + loss (None: all logits at once)
        self.tokens_vary = tokens_vary  # False: every rank's micro-batches carry the same number of loss tokens
        self._step_tokens = torch.zeros(())
        self._eval: dict[str, torch.Tensor] = {}
        self.validated_at_step = -1  # global step of the last finished validation

    @property
    def gpt(self) -> GPT:
        """The GPT inside any wrapper (peft's PeftModel keeps it at base_model.model)."""
        m = self.model
        while not isinstance(m, GPT) and hasattr(m, "base_model"):
            m = m.base_model.model if hasattr(m.base_model, "model") else m.base_model
        return m

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    # ---- losses ----

    def _lm_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, number of tokens that carry loss). With loss_chunk, the head is applied to the
        final hidden states a chunk of tokens at a time inside the loss (a LoRA-adapted head takes the plain path)."""
        if self.loss_chunk and type(self.gpt.head) is nn.Linear and self.gpt.head.bias is None:
            hidden = self.gpt.hidden(batch["input_ids"])  # (B, T, C)
            return chunked_lm_loss_sum(hidden, self.gpt.head.weight, batch["labels"], self.loss_chunk)
        return lm_loss_sum(self.model(batch["input_ids"]), batch["labels"])

    def _class_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return last_token_logits(self.model(batch["input_ids"]), batch["lengths"])  # (B, C)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # No host sync and no collective here (a progress-bar metric would be read back every batch): the NaN
        # guard looks at the step as a whole in on_before_optimizer_step.
        bs = batch["input_ids"].size(0)
        if self.task == "classify":
            loss = F.cross_entropy(self._class_logits(batch), batch["label"])
            self.guard.add(loss)
            self.log("train/loss", loss, batch_size=bs)
            return loss
        if self.task == "dpo":
            stats = self.preference(self.model, batch)
            loss_sum, n = stats["loss"].sum(), torch.tensor(stats["loss"].numel(), device=self.device)
            for name in PAIR_STATS[1:]:
                self.log(f"train/{name}", stats[name].mean(), batch_size=bs)
        else:
            loss_sum, n = self._lm_loss(batch)
        self._step_tokens = self._step_tokens.to(n.device) + n  # tokens (lm) or pairs (dpo) of this step
        self.guard.add(loss_sum / n.clamp(min=1))
        self.log("train/loss", loss_sum / n.clamp(min=1), batch_size=bs)
        return loss_sum / self.LOSS_SCALE

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for p in self.parameters() if p.grad is not None]
        if self.task in ("lm", "dpo"):
            # Lightning divided each micro-batch loss by accumulate_grad_batches and DDP averaged over ranks:
            # undo both and divide by the tokens (pairs) of the whole step instead (summed over ranks where they differ:
            # one all-reduce of one number per step; pretraining windows carry the same number on every rank)
            tokens = self._step_tokens.float()
            world = self.trainer.world_size
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum") if self.tokens_vary else tokens * world
            factor = self.LOSS_SCALE * self.trainer.accumulate_grad_batches * world / tokens.clamp(min=1)
            for p in params:
                p.grad.mul_(factor.to(p.grad.dtype))
            self._step_tokens = torch.zeros((), device=self._step_tokens.device)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # before clipping; on the device
        logging = (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0  # as Lightning decides
        if self.guard.skip_step(self, norm, sync=logging):
            for p in params:  # the optimizer leaves parameters without a gradient (and their state) alone
                p.grad = None
        elif params and logging:
            if is_sharded(self.trainer.strategy):  # each rank holds a shard of the gradients
                norm = self.trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
            self.log("train/grad_norm", norm)

    # ---- evaluation (validation and test share it) ----

    def _eval_start(self) -> None:
        z = lambda *shape: torch.zeros(shape, device=self.device, dtype=torch.float64)  # noqa: E731
        self._eval = {"loss": z(), "count": z()}
        if self.task == "classify":
            n = len(self.label_names or []) or self.gpt.head.out_features
            self._eval["confusion"] = z(n, n)  # rows: truth, columns: prediction
        if self.task == "dpo":
            self._eval |= {name: z() for name in PAIR_STATS}

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        if self.task == "classify":
            logits = self._class_logits(batch)
            self._eval["loss"] += F.cross_entropy(logits, batch["label"], reduction="sum").double()
            self._eval["count"] += logits.size(0)
            idx = batch["label"] * logits.size(1) + logits.argmax(dim=-1)
            self._eval["confusion"] += torch.bincount(idx, minlength=logits.size(1) ** 2).view(
                logits.size(1), logits.size(1)).double()
        elif self.task == "dpo":
            for name, value in self.preference(self.model, batch).items():
                self._eval[name] += value.sum().double()
            self._eval["count"] += batch["input_ids"].size(0) // 2
        else:
            loss_sum, n = self._lm_loss(batch)
            self._eval["loss"] += loss_sum.double()
            self._eval["count"] += n.double()

    def _eval_end(self, prefix: str) -> None:
        # exact means over the whole split, across all ranks
        totals = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._eval.items()}
        loss = (totals["loss"] / totals["count"].clamp(min=1)).float()
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val")
        if self.task == "lm":
            self.log(f"{prefix}/ppl", torch.exp(loss))
        elif self.task == "dpo":
            for name in PAIR_STATS[1:]:
                self.log(f"{prefix}/{name}", (totals[name] / totals["count"].clamp(min=1)).float(),
                         prog_bar=prefix == "val" and name == "rewards/accuracy")
        else:
            conf = totals["confusion"]
            tp = conf.diag()
            self.log(f"{prefix}/acc", (tp.sum() / conf.sum().clamp(min=1)).float(), prog_bar=prefix == "val")
            f1 = 2 * tp / (conf.sum(0) + conf.sum(1)).clamp(min=1)
            self.log(f"{prefix}/f1", f1.mean().float())

    def on_validation_epoch_start(self) -> None:
        self.guard.check(self)  # a validation inside fit is a sync point: never validate weights after a NaN
        self._eval_start()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.global_step
            self._log_samples()

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def _log_samples(self) -> None:
        """Write continuations of the sample prompts to TensorBoard's text tab (rank zero only; none under FSDP,
        where rank zero alone cannot run the sharded model)."""
        if self.task == "classify" or not self.sample_prompts or self.logger is None:
            return
        if is_sharded(self.trainer.strategy):
            skip_sharded("text samples")
            return
        if self.global_rank != 0:
            return
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        tok = build_tokenizer(self.tokenizer_name)
        was_training = self.model.training
        self.model.eval()
        for i, prompt_text in enumerate(self.sample_prompts):
            prompt = torch.tensor([tok.encode_ordinary(prompt_text)], device=self.device)
            n_new = max(0, min(self.sample_tokens, self.gpt.config.context_length - prompt.size(1)))
            generator = torch.Generator(device=self.device).manual_seed(i)
            out = self.gpt.generate(prompt, n_new, temperature=0.8, top_k=50, eos_id=tok.eot_token,
                                    generator=generator)
            new = continuation_text(tok, out[0, prompt.size(1):].tolist())
            experiment.add_text(f"samples/{i}", f"{prompt_text}**{new}**", self.global_step)
        self.model.train(was_training)

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
            optimizer, lambda step: lr_factor(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.guard.check(self)  # a checkpoint never holds the weights of a step after a NaN
        # checkpoints describe themselves: the model config and tokenizer travel with the weights
        num_classes = self.gpt.head.out_features if self.task == "classify" else None
        checkpoint["llmtrain"] = {"tokenizer": self.tokenizer_name, "task": self.task, "label_names": self.label_names,
                                  **self.checkpoint_info, "model_config": asdict(self.gpt.config),
                                  "num_classes": num_classes, "step": self.global_step}
        # and what an exact resume needs beyond Lightning's own state: every rank's generators
        checkpoint["llmtrain_resume"] = {"rng": gather_rng_states(), "nonfinite_steps": self.guard.skipped}
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("preference.")]:
            del state[key]  # DPO's frozen reference is init_from's weights: loaded, not saved

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.preference is not None:  # the reference as the recipe loaded it, for Lightning's strict load
            checkpoint["state_dict"] |= {f"preference.{k}": v for k, v in self.preference.state_dict().items()}
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
