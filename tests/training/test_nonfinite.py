"""The NaN guard at the optimizer step, and a training step that never waits for the device between logging steps."""

import sys
from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TINY, compose, lm_stage
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader

from llmtrain.errors import UserError
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.run.train import train
from llmtrain.training.module import LanguageModel
from llmtrain.training.nonfinite import NonFiniteGuard

# ---- no host sync, no collective, between logging steps ----

HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__")
COLLECTIVES = ("reduce", "all_gather", "broadcast", "barrier", "reduce_boolean_decision")


class SyncCounter(L.Callback):
    """Attributes every host sync and collective made by llmtrain's or Lightning's code to the training batch in
    flight: from the start of batch k to the start of batch k + 1 (its logging, LR step and bookkeeping included)."""

    current = None

    def __init__(self) -> None:
        self.batch: int | None = None
        self.calls: dict[int, list[str]] = {}
        SyncCounter.current = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch_idx

    def on_train_end(self, trainer, pl_module) -> None:
        self.batch = None


def counted(name: str, original):
    def wrapper(*args, **kwargs):
        caller = sys._getframe(1)
        where = caller.f_code.co_filename
        counter = SyncCounter.current
        if counter is not None and counter.batch is not None and ("/llmtrain/" in where or "/lightning/" in where):
            counter.calls.setdefault(counter.batch, []).append(f"{name} at {where}:{caller.f_lineno}")
        return original(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("stage", ["pretrain", "classify"])
def test_no_host_sync_or_collective_between_logging_steps(tmp_path, monkeypatch, stage):
    """7 optimizer steps of 2 micro-batches, logged every 3rd step (steps 2 and 5, batches 4-5 and 10-11): the
    micro-batches of the other steps (batch 0, start-up, and 13, the end, aside) copy nothing to the host and call no
    collective, the optimizer-step ends (NaN guard, gradient norm, token count) included."""
    for name in HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in COLLECTIVES:
        monkeypatch.setattr(SingleDeviceStrategy, name, counted(name, getattr(SingleDeviceStrategy, name)))
    args = [*TINY, "trainer.accumulate_grad_batches=2", "trainer.log_every_n_steps=3", "trainer.max_steps=7",
            "trainer.val_check_interval=1000", "trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
            "callbacks.last_checkpoint=null",
            "+callbacks.syncs._target_=test_nonfinite.SyncCounter"]
    if stage == "classify":  # a classifier from scratch: padded batches of texts
        args = [a for a in args if not a.startswith(("data.max_documents", "finetune.sample_tokens"))] + [
            "finetune=classify", "model=gpt_tiny", "data.max_length=32"]
    train(compose(args, tmp_path))
    calls = SyncCounter.current.calls
    logging = {4, 5, 10, 11}
    quiet = {b: calls.get(b, []) for b in range(1, 13) if b not in logging}
    assert not any(quiet.values()), {b: c for b, c in quiet.items() if c}
    assert any("nonfinite.py" in c for b in logging for c in calls.get(b, []))  # the guard looks on logging steps
    assert any("/lightning/" in c for b in logging for c in calls.get(b, []))  # and Lightning writes the logs


# ---- what the guard decides ----


def fake_module(step: int = 0, world_size: int = 1, scaler=None):
    trainer = SimpleNamespace(global_step=step, world_size=world_size, callbacks=[], checkpoint_callbacks=[],
                              precision_plugin=SimpleNamespace(scaler=scaler))
    return SimpleNamespace(trainer=trainer, log=lambda *a, **k: None)


def run_steps(guard: NonFiniteGuard, losses: list[float], norms: list[float], sync_every: int = 100) -> list[bool]:
    skipped = []
    for step, (loss, norm) in enumerate(zip(losses, norms, strict=True)):
        guard.add(torch.tensor(loss))
        skipped.append(guard.skip_step(fake_module(step), torch.tensor(norm), sync=(step + 1) % sync_every == 0))
    return skipped


def test_a_nan_is_reported_at_its_step_when_the_run_next_synchronises():
    guard = NonFiniteGuard(max_skipped=0)
    assert run_steps(guard, [2.0, 2.0, float("nan"), float("nan")], [1.0, 1.0, float("nan"), 1.0]) == [False] * 4
    with pytest.raises(UserError, match=r"^the training loss is nan at step 2; last good checkpoint: none yet\. .*"
                                        r"max_nonfinite_steps=K \(skipped so far: 0\)$"):
        guard.check(fake_module(4))
    guard = NonFiniteGuard(max_skipped=0)
    with pytest.raises(UserError, match=r"^the gradient norm is inf at step 1 \(training loss 2\)"):
        run_steps(guard, [2.0, 2.0], [1.0, float("inf")], sync_every=2)  # a logging step looks at once
    guard = NonFiniteGuard(max_skipped=0)
    run_steps(guard, [2.0, 2.5], [1.0, 3.0])
    guard.check(fake_module(2))  # all finite: nothing to say


def test_across_ranks_the_first_bad_step_is_reported_and_at_one_step_the_bad_loss():
    """Each rank remembers its own first bad step (step, loss, norm; step -1: none); the check reports the earliest
    over the ranks, and of two at the same step the rank whose loss was not finite (the cause of the others' NaN
    gradient norm after the all-reduce)."""
    def reported(other_rank: list[float]) -> str:
        guard = NonFiniteGuard(max_skipped=0)
        run_steps(guard, [2.0, 2.0, 2.0, float("nan")], [1.0, 1.0, 1.0, float("nan")])  # this rank: step 3
        module = fake_module(4, world_size=2)
        module.trainer.strategy = SimpleNamespace(all_gather=lambda t: torch.stack([torch.tensor(other_rank), t]))
        with pytest.raises(UserError) as error:
            guard.check(module)
        return str(error.value).split(";")[0]

    assert reported([1.0, 2.0, float("inf")]) == "the gradient norm is inf at step 1 (training loss 2)"
    assert reported([-1.0, 0.0, 0.0]) == "the training loss is nan at step 3"
    assert reported([3.0, 2.0, float("nan")]) == "the training loss is nan at step 3"


def test_up_to_k_bad_steps_are_skipped_then_the_run_stops():
    guard = NonFiniteGuard(max_skipped=2)
    with pytest.warns(UserWarning, match=r"skipped an optimizer step: the training loss is inf at step 1 \(1 of "):
        assert run_steps(guard, [2.0, float("inf"), 2.0], [1.0, 1.0, 1.0]) == [False, True, False]
    with pytest.warns(UserWarning, match=r"\(2 of max_nonfinite_steps=2\)"):
        run_steps(guard, [float("nan")], [float("nan")])
    with pytest.raises(UserError, match=r"at step 0; .*\(skipped so far: 2\)"):
        run_steps(guard, [float("nan")], [1.0])


def test_under_a_grad_scaler_an_infinite_gradient_is_the_scalers_business():
    guard = NonFiniteGuard(max_skipped=0)
    guard.add(torch.tensor(2.0))
    assert not guard.skip_step(fake_module(scaler=object()), torch.tensor(float("inf")), sync=True)


class PoisonedGPT(GPT):
    """Gives NaN logits for a batch whose first token is 0."""

    def forward(self, idx, cache=None):
        logits = super().forward(idx, cache)
        return logits * float("nan") if bool(idx[0, 0] == 0) else logits


class Snapshot(L.Callback):
    def __init__(self, batch: int) -> None:
        self.batch, self.states = batch, []

    def _take(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0].state_dict()["state"]
        self.states.append(([p.detach().clone() for p in pl_module.parameters()],
                            {k: {n: t.clone() for n, t in v.items()} for k, v in opt.items()}))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            self._take(trainer, pl_module)


def test_a_skipped_step_leaves_weights_and_optimizer_state_as_they_were():
    torch.manual_seed(0)
    model = PoisonedGPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    x = torch.randint(1, 50, (4, 2, 9))
    x[2] = 0  # the third batch is poisoned
    batches = [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in x]
    module = LanguageModel(model, lm_stage(), partial(torch.optim.AdamW, lr=1e-2), 0, 4, 1.0, max_nonfinite_steps=1)
    snapshot = Snapshot(batch=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[snapshot])
    with pytest.warns(UserWarning, match="skipped an optimizer step: the training loss is nan at step 2"):
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    (before, opt_before), (after, opt_after) = snapshot.states
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.equal(opt_before[k][n], opt_after[k][n]) for k in opt_before for n in opt_before[k])
    assert all(torch.isfinite(p).all() for p in module.parameters()) and trainer.global_step == 4
