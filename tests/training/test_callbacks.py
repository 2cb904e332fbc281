"""Our callbacks and checkpoint IO: safe loading, throughput counted in real tokens, MFU from the FLOPs done."""

import pickle
from types import SimpleNamespace

import pytest
import torch

from llmtrain.training.callbacks import AtomicCheckpointIO, LastCheckpoint
from llmtrain.training.preemption import PreemptionSignals


class Payload:
    """An object a pickled checkpoint could carry (and run code while unpickling)."""


def test_lightning_loads_every_checkpoint_with_weights_only(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, tmp_path / "plain.ckpt")
    assert io.load_checkpoint(tmp_path / "plain.ckpt")["global_step"] == 4
    torch.save({"state_dict": {}, "extra": Payload()}, tmp_path / "object.ckpt")
    for asked in (None, False):  # what Lightning passes when weights_only is not set, and an explicit False
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            io.load_checkpoint(tmp_path / "object.ckpt", weights_only=asked)


def test_throughput_counts_tokens_that_are_not_padding_and_the_flops_they_cost(monkeypatch):
    """Two padded batches per optimizer step (real lengths 3 + 5 and 2 + 2 of 6 positions), a log every 2 steps: the
    rate counts 12 tokens a step, not 24; the FLOPs add per-position attention at the padded length 6."""
    import llmtrain.training.callbacks as callbacks
    from llmtrain.training.flops import TrainingFlops

    clock = iter(range(100))
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: float(next(clock)))  # 1 s between readings
    logged = {}
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda name, value, **kw: logged.setdefault(name, value))
    trainer = SimpleNamespace(global_step=0, world_size=2, log_every_n_steps=2,
                              strategy=SimpleNamespace(reduce=lambda t, reduce_op: 2 * t))  # 2 ranks, the same counts
    cb = callbacks.Throughput(flops=TrainingFlops(per_token=100.0, per_position=10.0), peak_flops=1e4)
    cb.on_train_start(trainer, module)  # clock 0
    batches = [{"input_ids": torch.zeros(2, 6, dtype=torch.long), "lengths": torch.tensor(n)} for n in ([3, 5], [2, 2])]
    for step in (1, 2):
        for i, batch in enumerate(batches):
            trainer.global_step = step if i else step - 1  # the second micro-batch ends the step
            cb.on_train_batch_end(trainer, module, None, batch, 0)  # the clock ticks once per step
    # 2 steps x 12 tokens x 2 ranks in 2 s; FLOPs: 48 x 100 + 48 x 6 x 10
    assert logged["train/tokens_per_sec"] == pytest.approx(48 / 2)
    assert logged["train/mfu"] == pytest.approx((48 * 100 + 48 * 6 * 10) / 2 / (1e4 * 2))
    windows = {"input_ids": torch.zeros(4, 8, dtype=torch.long)}  # pretraining: every position is a token
    counts = callbacks.TokenCounts()
    counts.add(windows)
    counts.add(batches[0])
    assert counts.total(torch.device("cpu")).tolist() == [32 + 8, 32 * 8 + 8 * 6]


def test_throughput_counts_attention_at_the_heads_width():
    """A model whose heads are wider than emb_dim / n_heads (Qwen3's): the FLOPs per position are attention's over
    heads x head_dim, not over emb_dim."""
    import llmtrain.training.callbacks as callbacks
    from llmtrain.model.gpt import GPT, GPTConfig
    from llmtrain.training.flops import training_flops

    gpt = GPT(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, head_dim=12, n_layers=2,
                        pos_emb="rope"))
    cb = callbacks.Throughput(peak_flops=1e4)
    cb.on_fit_start(SimpleNamespace(), SimpleNamespace(gpt=gpt, model=gpt))
    assert cb.flops == training_flops(gpt, 2, 48) and cb.flops.per_position == 12 * 2 * 48


def test_a_save_removes_what_a_killed_save_left_and_leaves_only_the_checkpoint(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has ended
    (tmp_path / ".last.ckpt.tmp4242").write_bytes(b"half a checkpoint")  # a save killed mid-write
    (tmp_path / f".best-step12.ckpt.tmp{dead}").write_bytes(b"a killed best save")  # another name, its step's
    (tmp_path / f".other.ckpt.tmp{os.getppid()}").write_bytes(b"another file's")  # a live process's: left
    AtomicCheckpointIO().save_checkpoint({"global_step": 7}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.ckpt.tmp{os.getppid()}", "last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt")["global_step"] == 7


def test_a_full_disk_while_saving_is_one_line_naming_the_file_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    import errno
    import os

    import llmtrain.training.callbacks as callbacks
    from llmtrain.errors import UserError

    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 7}, tmp_path / "last.ckpt")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(callbacks.os, "fsync", full_disk)  # the new file is written, then cannot be synced
    with pytest.raises(UserError) as e:
        io.save_checkpoint({"global_step": 8}, tmp_path / "last.ckpt")
    assert str(e.value) == (f"could not write {tmp_path / 'last.ckpt'}: No space left on device; the previous file "
                            "(if any) is left as it was: free space there (or point the run at another disk), then "
                            "run again")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt")["global_step"] == 7


class StubTrainer(SimpleNamespace):
    """What LastCheckpoint reads of a Trainer, on one of two ranks (the other never receives a signal); it records
    the saves as (path, step)."""

    def __init__(self, max_steps: int) -> None:
        super().__init__(global_step=0, max_steps=max_steps, ckpt_path=None, saved=[], is_global_zero=False)
        self._signal_connector = PreemptionSignals(self)
        other_rank = False
        self.strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: (
            (decision and other_rank) if all else (decision or other_rank)))

    @property
    def received_sigterm(self) -> bool:
        return self._signal_connector.received_sigterm

    def save_checkpoint(self, path, weights_only: bool) -> None:
        self.saved.append((path, self.global_step))

    def step(self, cb: LastCheckpoint, to: int) -> None:
        """Batches that end optimizer steps up to step `to`."""
        while self.global_step < to:
            self.global_step += 1
            cb.on_train_batch_end(self, None, None, None, 0)


def test_a_sigterm_on_one_rank_saves_and_stops_every_rank(tmp_path):
    """SIGTERM may reach one rank only (a scheduler signals a node): the decision to stop is any rank's."""
    trainer, cb = StubTrainer(max_steps=100), LastCheckpoint(str(tmp_path), every_n_steps=50)
    cb.on_train_start(trainer, None)
    trainer.step(cb, 3)
    trainer._signal_connector.received = "SIGTERM"  # arrives here only, as the handler notes it
    trainer.step(cb, 4)
    assert trainer.saved == [(tmp_path / "last.ckpt", 4)] and trainer.received_sigterm  # Lightning stops now


def test_a_signal_inside_an_accumulation_window_waits_for_the_window_to_end(tmp_path):
    trainer, cb = StubTrainer(max_steps=100), LastCheckpoint(str(tmp_path), every_n_steps=50)
    cb.on_train_start(trainer, None)
    trainer._signal_connector.received = "SIGTERM"
    cb.on_train_batch_end(trainer, None, None, None, 0)  # a micro-batch that ends no window: no step
    assert trainer.saved == [] and not trainer.received_sigterm
    trainer.step(cb, 1)
    assert trainer.saved == [(tmp_path / "last.ckpt", 1)] and trainer.received_sigterm


def test_last_ckpt_is_saved_every_n_steps_and_at_the_final_steps_batch_end(tmp_path):
    """At the end of the final step's batch, as every other save: a checkpoint saved later, at train end, would
    hold the loops' state after the epoch ended rather than the data position in the form a resume reads."""
    trainer, cb = StubTrainer(max_steps=7), LastCheckpoint(str(tmp_path), every_n_steps=3)
    cb.on_train_start(trainer, None)
    trainer.step(cb, 7)
    assert [step for _, step in trainer.saved] == [3, 6, 7]
    cb.on_train_end(trainer, None)  # nothing left to save
    assert len(trainer.saved) == 3


def test_peak_memory_on_a_cpu_is_the_resident_set_linux_gives_in_kib(monkeypatch):
    import llmtrain.training.callbacks as callbacks

    monkeypatch.setattr(callbacks.resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=3 * 2**20))
    assert callbacks.peak_memory_gib(torch.device("cpu")) == 3.0
