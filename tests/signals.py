"""A callback the robustness tests add to a real run: it sends the run SIGTERM at a chosen batch."""

import os
import signal

import lightning as L


class SigtermAt(L.Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)
