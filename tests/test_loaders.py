"""Epoch-seeded order, mid-epoch skipping, unpadded evaluation shards."""

import torch
from torch.utils.data import TensorDataset

from stds.data import loaders

OPTS = loaders.LoaderOptions()


def _dataset(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n))


def _labels(loader) -> list[int]:
    return [int(v) for _, labels in loader for v in labels]


def test_order_depends_on_seed_and_epoch_only():
    a = loaders.train_loader(_dataset(20), 4, OPTS, seed=1)
    b = loaders.train_loader(_dataset(20), 4, OPTS, seed=1)
    loaders.start_epoch(a, 3, 1)
    loaders.start_epoch(b, 3, 1)
    first = _labels(a)
    assert first == _labels(b)
    assert sorted(first) == list(range(20))
    loaders.start_epoch(b, 4, 1)
    assert _labels(b) != first


def test_drop_last_and_steps_per_epoch():
    loader = loaders.train_loader(_dataset(10), 4, OPTS, seed=0)
    loaders.start_epoch(loader, 0, 0)
    assert loaders.batches_per_epoch(loader) == 2
    assert len(_labels(loader)) == 8


def test_skipping_batches_resumes_the_same_order():
    loader = loaders.train_loader(_dataset(20), 4, OPTS, seed=2)
    loaders.start_epoch(loader, 1, 2)
    full = _labels(loader)
    loaders.start_epoch(loader, 1, 2, skip_batches=3)
    assert _labels(loader) == full[12:]


def test_two_ranks_split_the_training_set():
    seen = []
    for rank in (0, 1):
        loader = loaders.train_loader(_dataset(16), 2, OPTS, seed=0, rank=rank, world_size=2)
        loaders.start_epoch(loader, 0, 0)
        seen.append(set(_labels(loader)))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(16))


def test_eval_shards_cover_every_sample_once_without_padding():
    labels = []
    for rank in range(3):
        labels += _labels(loaders.eval_loader(_dataset(10), 4, OPTS, rank=rank, world_size=3))
    assert sorted(labels) == list(range(10))


def test_loader_workers_ignore_ctrl_c_so_the_run_can_save_first():
    import signal

    from stds.data.loaders import LoaderOptions, ignore_interrupts, train_loader

    data = torch.utils.data.TensorDataset(torch.arange(8.0))
    assert train_loader(data, 2, LoaderOptions(num_workers=1), seed=0).worker_init_fn is ignore_interrupts
    assert train_loader(data, 2, LoaderOptions(num_workers=0), seed=0).worker_init_fn is None
    previous = signal.getsignal(signal.SIGINT)
    try:
        ignore_interrupts(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
