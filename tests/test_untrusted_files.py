"""Files from a shared directory are data, never code: planted payloads (each would ``touch`` a
marker file) must not run when a run directory, sweep or checkpoint is reported, exported or used
for ``init_from``, and a planted ``${oc.env:...}`` is never resolved."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, at_once
from stds.errors import CheckpointError
from stds.results.collect import collect_runs
from stds.results.pruned import export_run
from stds.results.sweep import write_report
from stds.run.files.checkpoint import FORMAT_VERSION
from stds.run.files import rebuild
from stds.run.files.rebuild import allow_target, allowed_targets, build_model, check_saved_config
from stds.run.life.trainer import train


class Touch:
    """A pickle that runs ``touch <path>`` when it is loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _hostile_models(tmp_path: Path, marker: Path) -> dict[str, dict]:
    """``config.model`` nodes that would create ``marker`` if instantiated."""
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(pickle.dumps(Touch(marker)))
    return {
        "os.system": {"_target_": "os.system", "_args_": [f"touch {marker}"]},
        "builtins.exec": {"_target_": "builtins.exec", "_args_": [f"open({str(marker)!r}, 'w').close()"]},
        "numpy.load": {"_target_": "numpy.load", "file": str(payload), "allow_pickle": True},
        "nested": {"_target_": "stds.models.DigitsNet",
                   "neuron": {"_target_": "numpy.load", "file": str(payload), "allow_pickle": True}},
    }


def test_the_payloads_do_run_when_loaded_unchecked(tmp_path):
    """The markers of the tests below are real: unpickling or instantiating the payload makes one."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Touch(marker)))
    assert marker.exists()
    marker.unlink()
    instantiate(OmegaConf.create(_hostile_models(tmp_path, marker)["numpy.load"]))
    assert marker.exists()


def test_allowlist_holds_our_targets_and_what_users_add():
    for name in ("stds.models.DigitsNet", "stds.models.CIFAR10Net", "stds.models.SEWResNet",
                 "stds.models.make_neuron", "stds.data.digits", "stds.data.cifar10",
                 "stds.data.imagenet", "stds.data.fake", "stds.data.datasets.cifar10",
                 "torch.optim.Adam", "torch.optim.SGD", "torch.optim.lr_scheduler.CosineAnnealingLR",
                 "torch.optim.lr_scheduler.ConstantLR", "torch.optim.lr_scheduler.LambdaLR",
                 "stds.run.setup.lr.HoldCosine"):
        assert name in allowed_targets(), name
    for name in ("os.system", "builtins.exec", "numpy.load", "torch.load", "joblib.load"):
        assert name not in allowed_targets()
    config = {"model": {"_target_": "mypackage.models.MyNet"}}
    with pytest.raises(CheckpointError, match="model._target_"):
        check_saved_config(config, Path("x.pt"))
    allow_target("mypackage.models.MyNet")
    try:
        check_saved_config(config, Path("x.pt"))
    finally:
        rebuild._EXTRA.discard("mypackage.models.MyNet")
    with pytest.raises(ValueError, match="dotted name"):
        allow_target("not a name")


@pytest.mark.parametrize("config, key", [
    ({"model": {"_target_": "os.system"}}, "model._target_"),
    ({"model": {"_target_": "stds.models.DigitsNet", "neuron": {"_target_": "builtins.exec"}}},
     "model.neuron._target_"),
    ({"optimizer": {"_target_": "torch.optim.Adam", "lr": "${oc.env:HOME}"}}, "optimizer.lr"),
    ({"sparse": {"exclude": ["fc", "${oc.env:HOME}"]}}, "sparse.exclude.1"),
    ({"model": {"_target_": {"_target_": "os.system"}}}, "model._target_"),
])
def test_check_saved_config_names_the_key_and_the_file(config, key):
    with pytest.raises(CheckpointError) as caught:
        check_saved_config(config, Path("/shared/run/checkpoints/last.pt"))
    line = str(caught.value)
    assert "\n" not in line and f" {key} " in line and "/shared/run/checkpoints/last.pt" in line


def _hostile_checkpoint(path: Path, model: dict) -> Path:
    config = {"model": model, "sparse": {"method": "stmod", "exclude": None}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": FORMAT_VERSION, "model": {}, "config": config, "epoch": 1, "step": 1}, path)
    return path


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "numpy.load", "nested"])
def test_export_refuses_a_hostile_model_config(tmp_path, kind):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    source = _hostile_checkpoint(run / "checkpoints" / "last.pt", _hostile_models(tmp_path, marker)[kind])
    with pytest.raises(CheckpointError) as caught:
        export_run(run, verbose=False)
    assert not marker.exists()
    assert "._target_" in str(caught.value) and str(source) in str(caught.value)
    with pytest.raises(CheckpointError):
        build_model(torch.load(source, weights_only=True)["config"], source)
    assert not marker.exists()


def test_export_refuses_a_resolver_in_the_run_config(tmp_path, monkeypatch):
    """A checkpoint without its config falls back to ``.hydra/config.yaml``: references to its own
    keys resolve, a resolver call does not."""
    monkeypatch.setenv("STDS_TEST_SECRET", "hunter2")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "T: 4\nmodel:\n  _target_: stds.models.DigitsNet\n  T: ${T}\n  channels: ${oc.env:STDS_TEST_SECRET}\n")
    (run / "checkpoints").mkdir()
    torch.save({"format_version": FORMAT_VERSION, "model": {}}, run / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=r"key model\.channels holds an interpolation") as caught:
        export_run(run, verbose=False)
    assert "hunter2" not in str(caught.value) and "config.yaml" in str(caught.value)


def test_init_from_refuses_a_hostile_model_config(tiny_cfg, tmp_path):
    marker = tmp_path / "ran"
    source = _hostile_checkpoint(tmp_path / "evil" / "last.pt", _hostile_models(tmp_path, marker)["numpy.load"])
    with pytest.raises(CheckpointError) as caught:
        train(tiny_cfg("epochs=1", f"init_from={source}"), tmp_path / "run")
    assert not marker.exists()
    line = str(caught.value)
    assert "model._target_" in line and str(source) in line and "does not fit" not in line


def test_init_from_an_unreadable_file_says_so(tiny_cfg, tmp_path):
    source = tmp_path / "garbage.pt"
    source.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError) as caught:
        train(tiny_cfg("epochs=1", f"init_from={source}"), tmp_path / "run")
    assert "is not readable" in str(caught.value) and "does not fit" not in str(caught.value)


SECRET = "s3cr3t-value-of-the-user"


def _hostile_checkpoint_run(tmp_path: Path) -> tuple[list[str], dict]:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("model:\n  _target_: stds.models.DigitsNet\n")
    (run / "metrics.json").write_text("{}")
    _hostile_checkpoint(run / "checkpoints" / "last.pt", _hostile_models(tmp_path, tmp_path / "ran")["os.system"])
    return [str(run), "--export"], {}


def _planted_pickles_sweep(tmp_path: Path) -> tuple[list[str], dict]:
    evil = pickle.dumps(Touch(tmp_path / "ran"))
    sweep, elsewhere = tmp_path / "sweep", tmp_path / "elsewhere"
    run = sweep / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("dataset:\n  _target_: stds.data.digits\nT: 4\n")
    (run / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  launcher:\n    submitit_folder: {elsewhere}/%j\n  job:\n    id: '77'\n")
    for folder in (sweep / ".submitit" / "77", elsewhere / "77"):
        folder.mkdir(parents=True)
        (folder / "77_0_result.pkl").write_bytes(evil)
    (sweep / ".submitit" / "77" / "77_0_log.err").write_text(
        "submitit ERROR (2026-01-01 10:00:00,000) - Submitted job triggered an exception\n"
        "Traceback (most recent call last):\n  File \"x\", line 1\nRuntimeError: boom\n")
    return [str(sweep)], {}


def _interpolating_run(tmp_path: Path) -> tuple[list[str], dict]:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "dataset:\n  _target_: ${oc.env:STDS_TEST_SECRET}\n"
        "model:\n  _target_: stds.models.${oc.env:STDS_TEST_SECRET}\n"
        "sparse:\n  method: ${oc.env:STDS_TEST_SECRET}\nscheduler:\n  kind: sine\n"
        "flat_width: ${oc.env:STDS_TEST_SECRET}\nT: ${oc.env:STDS_TEST_SECRET}\nepochs: 3\nalpha_gr: 0.0\n")
    (run / ".hydra" / "overrides.yaml").write_text("- flat_width=${oc.env:STDS_TEST_SECRET}\n")
    (run / "metrics.json").write_text('{"test_acc1": 0.5, "sparsity": 0.5, "epoch": 3}')
    return [str(run)], {"STDS_TEST_SECRET": SECRET}


REPORTS = {"hostile_checkpoint": _hostile_checkpoint_run, "planted_pickles": _planted_pickles_sweep,
           "interpolations": _interpolating_run}


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """``python launch/report.py`` on each hostile directory of `REPORTS` (its folder and the
    finished process): the directories are made first, then the reports run at once."""
    folders = {name: tmp_path_factory.mktemp(name) for name in REPORTS}
    commands = {name: make(folders[name]) for name, make in REPORTS.items()}
    report = [sys.executable, str(REPO / "launch" / "report.py")]
    env = {key: value for _, extra in commands.values() for key, value in extra.items()}
    procs = at_once(*[[*report, *args] for args, _ in commands.values()], env=env)
    return {name: (folders[name], proc) for name, proc in zip(REPORTS, procs)}


def test_report_export_refuses_a_hostile_checkpoint(reported):
    tmp_path, done = reported["hostile_checkpoint"]
    run = tmp_path / "run"
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "ran").exists() and not (run / "pruned.pt").exists()
    refused = [line for line in done.stderr.splitlines() if "not exported" in line]
    source = run / "checkpoints" / "last.pt"
    assert len(refused) == 1 and "model._target_" in refused[0] and str(source) in refused[0]


def test_report_never_unpickles_submitit_results(reported):
    """A planted result pickle, beside the sweep and where a crafted hydra.yaml points, is never
    loaded; the point's state comes from its plain-text logs."""
    tmp_path, done = reported["planted_pickles"]
    marker, sweep = tmp_path / "ran", tmp_path / "sweep"
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    [record] = collect_runs([sweep])
    assert not marker.exists()
    assert (record.status, record.error) == ("failed", "RuntimeError: boom")
    (sweep / ".submitit" / "77" / "77_0_log.err").unlink()  # ended (a result exists), nothing said
    [record] = collect_runs([sweep])
    assert record.status == "failed" and record.error.startswith("no result")
    assert not marker.exists()


def test_report_never_resolves_interpolations(reported):
    secret = SECRET
    tmp_path, done = reported["interpolations"]
    run = tmp_path / "run"
    assert done.returncode == 0, done.stderr
    written = "".join((run / name).read_text() for name in ("report.csv", "report.md"))
    assert secret not in written + done.stdout + done.stderr
    assert "damaged" in written and "holds an interpolation" in written  # refused, never resolved
    os.environ["STDS_TEST_SECRET"] = secret
    try:
        [record] = collect_runs([run])
        paths = write_report([record], tmp_path / "out")
    finally:
        del os.environ["STDS_TEST_SECRET"]
    assert secret not in paths["csv"].read_text() + paths["md"].read_text()
    assert record.status == "damaged" and record.flat_width is None and record.T is None
