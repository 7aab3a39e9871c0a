"""Atomic checkpoint writes, corrupt files, RNG round trips."""

import random

import numpy as np
import pytest
import torch

from stds import checkpoint as ckpt
from stds.errors import CheckpointError


def _state(value: float) -> dict:
    return {"format_version": ckpt.FORMAT_VERSION, "x": torch.full((3,), value), "epoch": 2,
            "config": {"flat_width": 0.5, "nested": {"a": [1, 2]}}}


def test_save_then_load_with_weights_only(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_atomic(_state(1.5), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 2 and loaded["config"]["nested"]["a"] == [1, 2]
    assert torch.equal(ckpt.load(path)["x"], torch.full((3,), 1.5))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic(_state(1.0), path)

    def dies_half_way(obj, handle):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt  # as a kill during the write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic(_state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(ckpt.load(path)["x"], torch.full((3,), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.save_atomic(_state(1.0), path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=str(path)):
        ckpt.load(path)


def test_foreign_file_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a stds checkpoint"):
        ckpt.load(path)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    state = ckpt.rng_state()
    expected = (torch.rand(3), np.random.rand(2), random.random())
    path = tmp_path / "rng.pt"
    ckpt.save_atomic({"format_version": ckpt.FORMAT_VERSION, "rng": state}, path)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt.set_rng_state(ckpt.load(path)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1])
    assert random.random() == expected[2]
