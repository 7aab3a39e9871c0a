"""Every checkpoint layout `stds` has written resumes: one version number, one upgrade function
(`stds.run.files.checkpoint.upgrade`), a fixture of each old layout made from a checkpoint of today's."""

from __future__ import annotations

import json

import pytest
import torch

from stds.errors import CheckpointError
from stds.run.files import checkpoint as ckpt
from stds.run.life.trainer import train
from tests.conftest import kill_after_steps

STEPS = (1797 - 360) // 64  # optimizer steps per epoch of the tiny digits run


def _old_buffer_names(model: dict) -> dict:
    return {(k[: -len(".0.d")] + ".0.flat_width" if k.endswith(".0.d") and ".parametrizations." in k else k): v
            for k, v in model.items()}


def layout_1_first(state: dict) -> dict:
    """Format 1 as first written: no schedule state, positional sums, the whole history, amp a bool."""
    old = {k: v for k, v in state.items() if k not in ("schedule", "last_record", "epoch_sums", "best_sparsity", "pending_eval")}
    sums = state["epoch_sums"]
    old.update(format_version=1, model=_old_buffer_names(state["model"]),
               epoch_sums=[sums["loss"], sums["correct"], float(sums["samples"])],
               history=[{"epoch": 0, "step": 0}, state["last_record"]],
               config={**state["config"], "amp": state["config"]["amp"] != "false"})
    return old


def layout_1_second(state: dict) -> dict:
    """Format 1 later (same number): the schedule's state under ``threshold``, buffers ``flat_width``."""
    old = {k: v for k, v in state.items() if k not in ("schedule", "best_sparsity", "pending_eval")}
    old.update(format_version=1, model=_old_buffer_names(state["model"]), threshold=state["schedule"])
    return old


LAYOUTS = {"1-first": layout_1_first, "1-second": layout_1_second}


def _state() -> dict:
    """A format-2 checkpoint by hand: one pruned layer at d = 0.25, mid-epoch."""
    return {
        "format_version": 2,
        "model": {"fc.parametrizations.weight.original": torch.tensor([[0.5, -0.1]]),
                  "fc.parametrizations.weight.0.d": torch.tensor(0.25), "fc.bias": torch.zeros(1)},
        "schedule": {"d": 0.25}, "epoch": 1, "step": 7,
        "epoch_sums": {"loss": 3.5, "correct": 2.0, "samples": 4},
        "last_record": {"epoch": 1, "step": 5, "test_acc1": 0.5}, "best_sparsity": 0.0, "pending_eval": None,
        "config": {"amp": "false", "lr": 0.1},
    }


@pytest.mark.parametrize("layout", LAYOUTS)
def test_upgrade_gives_todays_layout(layout):
    upgraded = ckpt.upgrade(LAYOUTS[layout](_state()), "x.pt")
    today = _state()
    assert set(upgraded) - {"history"} == set(today)
    assert set(upgraded["model"]) == set(today["model"])
    for key, value in today["model"].items():
        assert torch.equal(upgraded["model"][key], value)
    for key in ("schedule", "epoch_sums", "last_record", "config", "format_version", "best_sparsity", "pending_eval"):
        assert upgraded[key] == today[key], key


def test_upgrade_refuses_a_newer_or_foreign_file():
    with pytest.raises(CheckpointError, match="of format 3, newer than this stds reads"):
        ckpt.upgrade({"format_version": 3}, "x.pt")
    with pytest.raises(CheckpointError, match="x.pt is not a stds checkpoint"):
        ckpt.upgrade({"weights": 1}, "x.pt")


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_checkpoint_of_each_old_layout_resumes_as_todays(tiny_cfg, tmp_path, monkeypatch, layout):
    """Stopped mid-way through epoch 2, rewritten in an old layout, resumed: the same end as
    resuming today's checkpoint (bit for bit: the run is deterministic)."""
    args = ("epochs=2", "flat_width=0.2", "scheduler=linear")
    kill_after_steps(monkeypatch, STEPS + 5)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(*args, "checkpoint_every_steps=1"), tmp_path / "old")
    monkeypatch.undo()
    path = tmp_path / "old" / "checkpoints" / "last.pt"
    today = ckpt.load(path)
    (tmp_path / "new" / "checkpoints").mkdir(parents=True)
    ckpt.save_atomic(today, tmp_path / "new" / "checkpoints" / "last.pt")
    torch.save(LAYOUTS[layout](today), path)  # as the old version wrote it
    train(tiny_cfg(*args, "checkpoint_every_steps=1"), tmp_path / "old")
    train(tiny_cfg(*args, "checkpoint_every_steps=1"), tmp_path / "new")
    old, new = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("old", "new"))
    assert old["epoch"] == 2 and old["d"] == pytest.approx(0.2)
    assert {k: old[k] for k in ("test_acc1", "sparsity", "d", "step")} == {k: new[k] for k in ("test_acc1", "sparsity", "d", "step")}
    old_w, new_w = (ckpt.load(tmp_path / d / "checkpoints" / "last.pt")["model"] for d in ("old", "new"))
    assert old_w.keys() == new_w.keys() and all(torch.equal(old_w[k], new_w[k]) for k in old_w)
