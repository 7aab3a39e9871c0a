"""Atomic checkpoint writes, corrupt files, full or read-only disks, RNG round trips."""

import errno
import os
import random
import tempfile

import numpy as np
import pytest
import torch

from stds.run.files import checkpoint as ckpt
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


class _FillsUp:
    """A file object whose disk fills up after ``room`` bytes: writes past it raise ENOSPC."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.handle.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


def test_full_disk_part_way_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_atomic(_state(1.0), path)
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FillsUp(real_fdopen(fd, mode), room=300))
    with pytest.raises(CheckpointError) as info:
        ckpt.save_atomic({**_state(2.0), "big": torch.zeros(10_000)}, path)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "No space left on device" in message and "free space" in message
    assert torch.equal(ckpt.load(path)["x"], torch.full((3,), 1.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # the temporary is gone


def test_read_only_file_system_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic(_state(1.0), path)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last\.pt \(Read-only file system\).*"
                                              r"make .* writable, or set hydra\.run\.dir="):
        ckpt.save_atomic(_state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(ckpt.load(path)["x"], torch.full((3,), 1.0))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0o555 directory anyway")
def test_chmod_read_only_directory_is_one_line(tmp_path):
    folder = tmp_path / "checkpoints"
    ckpt.save_atomic(_state(1.0), folder / "last.pt")
    folder.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="Permission denied"):
            ckpt.save_atomic(_state(2.0), folder / "last.pt")
    finally:
        folder.chmod(0o755)
    assert torch.equal(ckpt.load(folder / "last.pt")["x"], torch.full((3,), 1.0))


def test_other_errors_pass_unchanged(tmp_path):
    with pytest.raises(Exception) as info:
        ckpt.save_atomic({"f": lambda: 0}, tmp_path / "last.pt")  # a lambda cannot be pickled
    assert not isinstance(info.value, CheckpointError)
    assert list(tmp_path.iterdir()) == []
