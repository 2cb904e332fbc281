"""Callbacks the robustness tests add to a real run (`+callbacks.x._target_=signals.X`): signals at chosen moments."""

import io
import os
import signal

import lightning as L
import torch


class SigtermAt(L.Callback):
    """Sends its own process SIGTERM at the start of training batch `batch`."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


class KillDuringSave(L.Callback):
    """SIGKILLs its own process halfway through writing the checkpoint of optimizer step `step`: half of the
    file's bytes reach the disk, then the process is gone, as with a kill or a power cut mid-save."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step != self.step:
            return
        real_save = torch.save

        def half_then_die(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_then_die  # the checkpoint writer calls torch.save(checkpoint, file) next


class SignalAt(L.Callback):
    """Sends `signal_name` to its own process on global rank `rank` only: at the start of training batch `batch`,
    or (validation=true) at the start of the first batch of the first validation inside fit after that batch."""

    def __init__(self, signal_name: str, batch: int, rank: int = 0, validation: bool = False) -> None:
        self.signum, self.batch, self.rank, self.validation = signal.Signals[signal_name], batch, rank, validation

    def _send(self, trainer) -> None:
        if trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)
        self.batch = None  # once

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.validation and trainer.fit_loop.total_batch_idx == self.batch:
            self._send(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if (self.validation and self.batch is not None and not trainer.sanity_checking
                and trainer.fit_loop.total_batch_idx >= self.batch and batch_idx == 0):
            self._send(trainer)


class Phase(L.Callback):
    """Writes what the run is doing into the file `path` as it goes (tests/faults.py reads it after a kill)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._write("starting to train (restoring a checkpoint, the first validation)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._write(f"training: step {trainer.global_step + 1}")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._write(f"validating after step {trainer.global_step}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._write(f"saving the checkpoint of step {trainer.global_step}")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write("after training: the export and the final line")
