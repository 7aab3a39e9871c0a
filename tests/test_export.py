"""Export of the pruned network (`stds.results.pruned`, ``launch/export.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from spikingjelly.activation_based import functional
from torch import nn

from tests.conftest import HANG_S, REPO, at_once, compose_train
from stds.run.files.checkpoint import FORMAT_VERSION
from stds.run.setup.config import to_plain
from stds.errors import StdsError
from stds.results.pruned import export_finished, export_run, storage, weight_storage
from stds.results.collect import read_run
from stds.method.sparse import set_threshold, sparsify, sparsity


def test_weight_storage_by_hand():
    w = torch.tensor([[0.0, 1, 0, 2], [0, 0, 0, 0], [3, 4, 5, 0]])  # 3 x 4 float32, 5 non-zero
    info = weight_storage(w)
    assert (info["numel"], info["nonzero"], info["shape"]) == (12, 5, [3, 4])
    assert info["dense_bytes"] == 12 * 4
    assert info["csr_bytes"] == 5 * 4 + 5 * 4 + (3 + 1) * 4  # values, column indices, row pointers
    assert info["bitmask_bytes"] == 2 + 5 * 4  # ceil(12 / 8) bytes of mask, then the values
    conv = torch.zeros(2, 3, 3, 3, dtype=torch.float16)  # [out, in x k x k]: 2 rows of 27
    conv[0, 0, 0, 0] = 1
    info = weight_storage(conv)
    assert (info["dense_bytes"], info["csr_bytes"], info["bitmask_bytes"]) == (
        54 * 2, 1 * (2 + 4) + 3 * 4, 7 + 1 * 2)


def test_storage_totals_and_other_tensors():
    state = {"fc.weight": torch.tensor([[0.0, 1], [2, 0]]), "fc.bias": torch.zeros(2),
             "bn.running_mean": torch.zeros(3)}
    info = storage(state, ["fc"])
    assert list(info["layers"]) == ["fc"]
    assert info["pruned"] == {"numel": 4, "nonzero": 2, "dense_bytes": 16,
                              "csr_bytes": 2 * 8 + 3 * 4, "bitmask_bytes": 1 + 2 * 4}
    assert info["other_bytes"] == (2 + 3) * 4


def _config():
    return compose_train("model=digits_net", "model.channels=[4,4,4]", "T=2", "sparse=stmod")


def _trained_like(cfg, flat_width: float) -> nn.Module:
    """The model as the training loop builds it, with a threshold that zeros some weights."""
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    with torch.no_grad():  # larger weights, so that spikes reach the output
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_(8)
    sparsify(model, "stmod", d=0.0)
    set_threshold(model, flat_width)
    for module in model.modules():  # BatchNorm state other than the defaults; strong enough to spike
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.fill_(4.0)
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _run_dir(tmp_path: Path, cfg, models: dict[str, nn.Module], config_in_ckpt: bool = True) -> Path:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run / "checkpoints").mkdir()
    for name, model in models.items():
        state = {"format_version": FORMAT_VERSION, "model": model.state_dict(), "epoch": 3,
                 "step": 30, "best_acc1": 0.5}
        if config_in_ckpt:
            state["config"] = to_plain(cfg)
        torch.save(state, run / "checkpoints" / f"{name}.pt")
    return run


def _outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(images)
    functional.reset_net(model)
    return out


@pytest.mark.parametrize("config_in_ckpt", [True, False])
def test_exported_network_loads_into_the_plain_model_with_identical_outputs(
    tmp_path, capsys, config_in_ckpt
):
    cfg = _config()
    model = _trained_like(cfg, 0.8)
    sp = sparsity(model)
    assert 0.1 < sp["total"] < 0.9  # the threshold zeros some weights, not all
    run = _run_dir(tmp_path, cfg, {"last": model}, config_in_ckpt)
    path = export_run(run)
    assert path == run / "pruned.pt"

    blob = torch.load(path, weights_only=True)
    plain = instantiate(OmegaConf.create(blob["config"]["model"])).eval()
    assert list(blob["state_dict"]) == list(plain.state_dict())  # no reparameterization keys
    plain.load_state_dict(blob["state_dict"])
    images = 3 * torch.randn(6, 1, 8, 8)
    expected = _outputs(model, images)
    assert expected.std(dim=0).max() > 0  # the inputs reach the output
    assert torch.equal(_outputs(plain, images), expected)

    zeros = sum(int((blob["state_dict"][f"{n}.weight"] == 0).sum()) for n in sp["layers"])
    assert zeros == sp["zeros"] and blob["sparsity"]["total"] == sp["total"]
    assert blob["storage"]["pruned"]["nonzero"] == sp["numel"] - sp["zeros"]
    assert blob["source"] == {"checkpoint": "last.pt", "epoch": 3, "step": 30}
    for name in sp["layers"]:  # float32 weights viewed as [out, fan-in], int32 indices
        w = blob["state_dict"][f"{name}.weight"]
        nnz, rows = int((w != 0).sum()), w.shape[0]
        layer = blob["storage"]["layers"][name]
        assert layer["dense_bytes"] == 4 * w.numel()
        assert layer["csr_bytes"] == nnz * (4 + 4) + (rows + 1) * 4
        assert layer["bitmask_bytes"] == -(-w.numel() // 8) + 4 * nnz
    printed = capsys.readouterr().out
    for name, fraction in sp["layers"].items():
        assert name in printed and f"{100 * fraction:.2f}%" in printed
    assert "pruned layers" in printed and "with CSR weights" in printed


def test_which_best_and_out(tmp_path):
    cfg = _config()
    last, best = _trained_like(cfg, 0.4), _trained_like(cfg, 1.6)
    run = _run_dir(tmp_path, cfg, {"last": last, "best": best})
    path = export_run(run, which="best", out=tmp_path / "x" / "best_pruned.pt", verbose=False)
    blob = torch.load(path, weights_only=True)
    assert blob["sparsity"]["total"] == sparsity(best)["total"] != sparsity(last)["total"]
    with pytest.raises(StdsError, match="which='first'"):
        export_run(run, which="first")


def test_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises(StdsError, match="has not saved a checkpoint"):
        export_run(tmp_path)


def test_export_finished_runs_once(tmp_path):
    cfg = _config()
    run = _run_dir(tmp_path, cfg, {"last": _trained_like(cfg, 0.8)})
    record = read_run(run)
    assert record.status == "running" and export_finished([record]) == []
    (run / "metrics.json").write_text("{}")
    record = read_run(run)
    assert export_finished([record]) == [run / "pruned.pt"]
    assert export_finished([record]) == []  # up to date
    last = run / "checkpoints" / "last.pt"
    newer = (run / "pruned.pt").stat().st_mtime + 10
    os.utime(last, (newer, newer))
    assert export_finished([record]) == [run / "pruned.pt"]


def test_entrypoint(tmp_path):
    cfg = _config()
    run = _run_dir(tmp_path, cfg, {"last": _trained_like(cfg, 0.8)})
    export = [sys.executable, str(REPO / "launch" / "export.py")]
    done, missing = at_once([*export, str(run)], [*export, str(tmp_path / "missing")])
    assert done.returncode == 0, done.stderr
    assert "features.1" in done.stdout and (run / "pruned.pt").exists()
    assert missing.returncode == 1
    assert missing.stderr.startswith("Error: ") and missing.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_report_exports_finished_runs_only_when_asked(tmp_path):
    cfg = _config()
    run = _run_dir(tmp_path, cfg, {"last": _trained_like(cfg, 0.8)})
    (run / "metrics.json").write_text("{}")
    report = [sys.executable, str(REPO / "launch" / "report.py"), str(run)]
    done = subprocess.run(report, capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    assert (run / "report.csv").exists() and not (run / "pruned.pt").exists()
    done = subprocess.run([*report, "--export"], capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    assert (run / "pruned.pt").exists() and "weights kept" in done.stdout
