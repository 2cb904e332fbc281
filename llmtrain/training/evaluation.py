"""Benchmark tasks during training (conf/eval/): lm_eval tasks scored on the model being trained, logged as
`eval/<task>/<metric>` to every tracker, at each validation or every N optimizer steps.

The model is scored through the same lm_eval model class as `python -m llmtrain.evaluate` (interop/harness.py), in
eval mode and without gradients, under the run's precision, then put back in training mode. Under DDP each rank
scores its share of the documents and the sums are added (interop/harness_sums.py): 2 ranks give the numbers of 1.
Only a run with eval.tasks imports lm_eval.
"""

from __future__ import annotations

import logging
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from llmtrain.errors import UserError


class TaskEvaluation(Callback):
    """Scores `tasks` (lm_eval names: llmtrain's shipped ones, tasks_dir's, lm_eval's own) on the first `limit`
    documents of each; every_n_steps None: at each validation, else every N optimizer steps, and always at the
    final validation (what metrics.json records)."""

    def __init__(self, tasks: list[str], tokenizer: str, every_n_steps: int | None = None,
                 limit: int | float | None = None, batch_size: int = 16, tasks_dir: str | None = None) -> None:
        self.tasks, self.tokenizer_name, self.every_n_steps = list(tasks), tokenizer, every_n_steps
        self.limit, self.batch_size, self.tasks_dir = limit, batch_size, tasks_dir
        self.evaluated_at = -1  # global step of the last evaluation
        self.seconds: list[float] = []  # the wall time of each evaluation

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """The tasks and their data loaded once, before training starts: a name that does not load stops the run
        here, not at the first validation."""
        from llmtrain.data.tokenizer import build_tokenizer
        from llmtrain.interop.harness_sums import aggregations_of, chance_levels, unreducible
        from llmtrain.interop.harness_tasks import load_tasks

        if hasattr(self, "_tasks"):
            return
        logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its lines per task and evaluation: ours is one
        items, _ = load_tasks(self.tasks, self.tasks_dir, key="eval.tasks")
        problems = unreducible(items)
        if problems:
            raise UserError("; ".join(problems))
        self._tasks, self._aggregations = items, aggregations_of(items)
        self.chance = chance_levels(items, self.limit)  # multiple-choice task -> a uniform guess's accuracy
        self._tokenizer = build_tokenizer(self.tokenizer_name)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """`eval/<task>/<metric>` of the model as it is now, equal on every rank."""
        from llmtrain.interop.harness import GPTHarnessLM
        from llmtrain.interop.harness_sums import metrics_of, shard_sums

        start = time.perf_counter()
        lm = GPTHarnessLM(pl_module.gpt, self._tokenizer, batch_size=self.batch_size)  # eval mode, then back
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            sums = shard_sums(lm, self._tasks, self.limit, trainer.global_rank, trainer.world_size)
        keys = sorted(sums)
        local = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=pl_module.device)  # (metrics, 2)
        totals = trainer.strategy.reduce(local, reduce_op="sum").tolist()
        metrics = metrics_of(dict(zip(keys, map(tuple, totals))), self._aggregations)
        self.evaluated_at = trainer.global_step
        self.seconds.append(time.perf_counter() - start)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        rank_zero_info(f"eval at step {trainer.global_step}: {shown} ({self.seconds[-1]:.1f} s per evaluation)")
        return {f"eval/{k}": v for k, v in metrics.items()}

    def summary(self, final: dict[str, float]) -> str:
        """The final line's part for the multiple-choice tasks: each accuracy against the chance level."""
        shown = [f"{task} acc {final[f'eval/{task}/acc']:.4f} (chance {level:.2f})"
                 for task, level in self.chance.items() if f"eval/{task}/acc" in final]
        return ", ".join(shown)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        final = trainer.global_step >= trainer.max_steps or trainer.state.fn == "validate"
        if trainer.sanity_checking or self.evaluated_at == trainer.global_step:
            return
        if self.every_n_steps is None or final:
            pl_module.log_dict(self.evaluate(trainer, pl_module), sync_dist=True)  # equal on every rank already

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or not step or step % self.every_n_steps or step == self.evaluated_at or \
                step >= trainer.max_steps:  # the last step's evaluation comes with its validation
            return
        metrics = self.evaluate(trainer, pl_module)
        # straight to the loggers, not through pl_module.log: Lightning sends a step's values only every N steps
        for logger in trainer.loggers if trainer.is_global_zero else []:
            logger.log_metrics(metrics, step=step)
