"""What a checkpoint needs besides weights and optimizer so that a resumed run continues bit for bit.

Lightning already saves the model, the optimizer, the LR schedule and its loop counters. On top of that:

- the place in the epoch: `ResumableLoader` is a DataLoader with `state_dict`/`load_state_dict`, which
  Lightning stores in every checkpoint and hands back before the resumed epoch starts. Its `EpochSampler`
  draws the epoch's order from (seed, epoch) alone, so the order itself need not be stored, only how many
  samples of it were already trained on;
- every random number generator: Python's, NumPy's, torch's (CPU and CUDA), one set per rank
  (`rng_states`/`set_rng_states`, called from the LightningModule's checkpoint hooks);
- the DataLoader workers: their seeds follow from (seed, epoch) through the loader's own generator,
  so that creating an iterator (a training epoch, a validation pass) never draws from the global generator.
  A dataset that needs randomness should derive it from the sample index and epoch: the workers restart at
  the resumed position, not in the middle of their random streams.

Exact means: same seed, same number of devices and batch size, deterministic kernels (fp32 on CPU is;
some CUDA kernels are not unless trainer.deterministic=true).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from llmtrain.errors import UserError


def world() -> tuple[int, int]:
    """(world size, rank) of the process group, or (1, 0) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """This rank's share of an order that depends only on (seed, epoch); the next pass may start part-way in.

    A DistributedSampler (also with one process), so Lightning leaves it in place under DDP rather than
    wrapping it, and calls `set_epoch` on it before each epoch.
    """

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int) -> None:
        num_replicas, rank = world()
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.resume_at: tuple[int, int] | None = None  # (epoch, samples of this rank's share to pass over)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.resume_at is not None:
            epoch, start = self.resume_at
            self.resume_at = None  # only the first pass after a resume starts part-way
            if epoch == self.epoch:
                indices = indices[start:]
        return iter(indices)


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch travels in checkpoints.

    `batches_done()` says how many batches of the current epoch the training loop has finished (not how many
    were fetched: workers and Lightning fetch ahead); the data modules read it from the trainer.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int,
                 batches_done: Callable[[], int] = lambda: 0, **kwargs) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=EpochSampler(dataset, shuffle, seed),
                         generator=torch.Generator().manual_seed(seed), **kwargs)
        self.batches_done = batches_done

    def __iter__(self):
        self.generator.manual_seed(self.sampler.seed + self.sampler.epoch)  # worker seeds follow (seed, epoch)
        return super().__iter__()

    def state_dict(self) -> dict:
        sampler = self.sampler
        return {"epoch": sampler.epoch, "seed": sampler.seed, "batch_size": self.batch_size,
                "num_replicas": sampler.num_replicas,
                "samples_done": self.batches_done() * self.batch_size * sampler.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        sampler = self.sampler
        saved = (state["seed"], state["batch_size"], state["num_replicas"])
        now = (sampler.seed, self.batch_size, sampler.num_replicas)
        if saved != now:
            warnings.warn(f"resuming with (seed, batch size, ranks) = {now} where the checkpoint had {saved}: the "
                          f"data continues near, not exactly at, its position", stacklevel=2)
        # set the epoch here rather than rely on Lightning's set_epoch reaching the sampler before its first pass
        start = state["samples_done"] // sampler.num_replicas
        if start < min(sampler.num_samples, len(self) * self.batch_size):  # len(self): this rank's batches
            sampler.set_epoch(state["epoch"])
            sampler.resume_at = (state["epoch"], start)
        else:  # the saved epoch had ended
            sampler.set_epoch(state["epoch"] + 1)


def trainer_batches_done(trainer) -> int:
    """Training batches the trainer has finished in the current epoch (0 without a trainer)."""
    return 0 if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed


class EvalSampler(DistributedSampler):
    """This rank's share of an evaluation set, each sample on exactly one rank: rank r takes samples r, r + W, ...

    Lightning would give evaluation loaders a DistributedSampler that pads the last ranks' shares with repeated
    samples, so that sums over ranks count those twice; this one is a DistributedSampler too, so Lightning leaves
    it in place. The shares may differ by one sample (and so in batches): evaluation steps run no collective, and
    the module reduces its sums once at the end of the pass.
    """

    def __init__(self, dataset: Dataset) -> None:
        num_replicas, rank = world()
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


def eval_loader(dataset: Dataset, batch_size: int, seed: int, **kwargs) -> DataLoader:
    """An unshuffled loader of this rank's share (EvalSampler) with its own generator: a validation pass leaves the
    global RNG alone."""
    sampler = EvalSampler(dataset)
    if sampler.num_replicas > len(dataset):  # a rank without a batch would skip the pass and its final reduction
        raise UserError(f"an evaluation split of {len(dataset)} samples cannot give each of the {sampler.num_replicas} "
                        f"ranks one: raise data.val_fraction (or data.test_fraction), or use fewer trainer.devices")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      generator=torch.Generator().manual_seed(seed), **kwargs)

