"""Data loaders whose order depends only on (seed, epoch), in one process or many.

Training uses `torch.utils.data.DistributedSampler` (also with one process), reshuffled by
``set_epoch``, and drops the last incomplete batch. Evaluation shards the test set across ranks
without padding, so every test sample is counted exactly once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


@dataclass(frozen=True)
class LoaderOptions:
    """Loader settings from the ``loader`` config node."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False


class EpochSampler(DistributedSampler):
    """`DistributedSampler` that can start an epoch part-way, after ``skip`` of its samples.

    Resuming from a checkpoint written in the middle of an epoch replays the same order and
    skips the batches already trained on.
    """

    skip: int = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:  # noqa: D102
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: an unpadded split of a dataset."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def ignore_interrupts(worker_id: int) -> None:
    """Loader workers ignore Ctrl-C: the training process saves and stops on it (`stds.run.life.signals`),
    which needs its workers alive until then (the terminal sends SIGINT to the whole group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_options(options: LoaderOptions) -> dict:
    workers = options.num_workers
    return {
        "num_workers": workers,
        "worker_init_fn": ignore_interrupts if workers > 0 else None,
        "pin_memory": options.pin_memory,
        "persistent_workers": options.persistent_workers and workers > 0,
    }


def train_loader(
    dataset: Dataset,
    batch_size: int,
    options: LoaderOptions,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A shuffling, ``drop_last`` loader; call ``loader.sampler.set_epoch(epoch)`` every epoch."""
    sampler = EpochSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        generator=generator,
        **_worker_options(options),
    )


def eval_loader(
    dataset: Dataset, batch_size: int, options: LoaderOptions, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """An in-order loader over this rank's shard of the test set."""
    sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **_worker_options(options))


def start_epoch(loader: DataLoader, epoch: int, seed: int, skip_batches: int = 0) -> None:
    """Make the epoch's order and the workers' seeds a function of (seed, epoch) alone.

    ``skip_batches`` batches of the epoch's order are left out (resuming mid-epoch).
    """
    loader.sampler.set_epoch(epoch, skip=skip_batches * loader.batch_size)
    loader.generator.manual_seed(seed * 100_003 + epoch)


def batches_per_epoch(loader: DataLoader) -> int:
    """Optimizer steps in a full epoch (the last incomplete batch is dropped)."""
    return loader.sampler.num_samples // loader.batch_size
