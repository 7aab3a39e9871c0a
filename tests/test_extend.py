"""A toy model, reparameterization, schedule, learning-rate schedule and report column, each one
registration (``tests/toy_extension.py``), seen everywhere they belong: the config's choices, a
trained run, the allowlist that reads its config back, the report, and the NIR export's refusal line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import yaml

from stds.errors import CheckpointError, ConfigError, ExportError
from stds.run.files import checkpoint
from stds.run.files.rebuild import allowed_targets, check_saved_config, sparsified_model
from stds.run.setup.optim_registry import LR_SCHEDULES, OPTIMIZERS
from stds.run.setup.build import prepare_config
from tests import toy_extension as toy
from tests.conftest import CONF, HANG_S, REPO, TINY, compose_train, run_history

TOY = ("model=toy_net", "sparse=toy_soft", "scheduler=sine", "scheduler.kind=toy_square", "flat_width=0.02",
       "lr_scheduler=toy_step", "epochs=2", "logging.synops=false")


@pytest.fixture
def toys():
    toy.register()
    try:
        yield
    finally:
        toy.unregister()


def test_each_toy_is_a_choice_of_the_config(toys):
    cfg = prepare_config(compose_train(*TINY, *TOY))
    assert cfg.model._target_ == "tests.toy_extension.ToyNet" and cfg.model.hidden == 16
    assert cfg.sparse.method == "toy_soft" and cfg.scheduler.kind == "toy_square"
    assert cfg.lr_scheduler == {"_target_": "torch.optim.lr_scheduler.LambdaLR", "_partial_": True,
                                "lr_lambda": {"_target_": "tests.toy_extension.StepDecay", "every": 2, "gamma": 0.1}}
    assert {"tests.toy_extension.ToyNet", "tests.toy_extension.StepDecay"} <= allowed_targets()


def test_without_the_registration_the_names_are_refused_with_the_registered_ones():
    assert not {"tests.toy_extension.ToyNet", "tests.toy_extension.StepDecay"} & allowed_targets()
    with pytest.raises(ConfigError, match=r"sparse.method=.toy_soft. is not valid; use one of gmp, identity, st, stmod \("):
        prepare_config(compose_train(*TINY, "sparse.method=toy_soft"))
    with pytest.raises(ConfigError, match=r"scheduler.kind='toy_square' is not valid; use one of constant, cubic"):
        prepare_config(compose_train(*TINY, "scheduler.kind=toy_square"))


def test_the_toy_lr_schedule_trains_a_run_at_the_hand_computed_rates_and_is_read_back(toys, tmp_path):
    from stds.run.life.trainer import train

    train(compose_train(*TINY, *TOY, "epochs=4", "lr=0.01"), tmp_path / "run")
    # each record holds the rate after its epoch's step of the schedule: 0.01 · 0.1 ** (epoch // 2)
    assert [r["lr"] for r in run_history(tmp_path / "run")] == pytest.approx([0.01, 1e-3, 1e-3, 1e-4], rel=1e-12)
    last = tmp_path / "run" / "checkpoints" / checkpoint.LAST
    saved = checkpoint.load(last)["config"]
    check_saved_config(saved, last)  # the allowlist takes the toy's LambdaLR and StepDecay
    assert type(sparsified_model(saved, last)).__name__ == "ToyNet"  # the export's way in

    LR_SCHEDULES.remove(toy.LR_SCHEDULE)  # the same file, without the registration
    with pytest.raises(CheckpointError) as refused:
        check_saved_config(saved, last)
    assert str(refused.value).startswith(f"{last}: config key lr_scheduler.lr_lambda._target_ = "
                                         "'tests.toy_extension.StepDecay' is not an allowed _target_")
    assert "\n" not in str(refused.value)


def test_every_shipped_optimizer_and_lr_schedule_file_is_a_registration_allowing_its_targets():
    for group, registry in (("optimizer", OPTIMIZERS), ("lr_scheduler", LR_SCHEDULES)):
        files = {path.stem: yaml.safe_load(path.read_text()) for path in (CONF / group).glob("*.yaml")}
        assert sorted(files) == sorted(name for name, entry in registry.items() if entry.config is None)
        for name, node in files.items():
            targets = {value for key, value in _items(node) if key == "_target_"}
            assert targets and targets <= registry[name].target_names <= allowed_targets(), (group, name)
    assert {"torch.optim.Adam", "torch.optim.adam.Adam", "torch.optim.SGD", "torch.optim.sgd.SGD",
            "stds.run.setup.lr.HoldCosine"} <= allowed_targets()


def _items(node):
    """(key, value) of every mapping in ``node``, nested ones included."""
    for key, value in node.items():
        yield key, value
        if isinstance(value, dict):
            yield from _items(value)


def test_a_missing_optimizer_or_lr_schedule_names_the_registered_choices():
    with pytest.raises(ConfigError, match=r"^lr_scheduler is not set; pick one with lr_scheduler=<name> "
                                          r"\(constant, cosine, hold_cosine\)$"):
        prepare_config(compose_train(*TINY, "~lr_scheduler"))
    with pytest.raises(ConfigError, match=r"^optimizer is not set; pick one with optimizer=<name> \(adam, sgd\)$"):
        prepare_config(compose_train(*TINY, "~optimizer"))


def _train_from_the_command_line(run_dir: Path) -> subprocess.CompletedProcess:
    """A user's launcher: import the registrations, then run launch/train.py as the command line."""
    script = (f"import runpy, sys\nsys.path[:0] = [{str(REPO)!r}, {str(REPO / 'launch')!r}]\n"
              "from tests import toy_extension\ntoy_extension.register()\n"
              f"sys.argv = [{str(REPO / 'launch' / 'train.py')!r}, *sys.argv[1:]]\n"
              f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    args = [*TINY, *TOY, f"hydra.run.dir={run_dir}"]
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_S)


@pytest.mark.slow
def test_the_toys_train_report_read_back_and_refuse_nir(toys, tmp_path):
    run_dir = tmp_path / "run"
    done = _train_from_the_command_line(run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # d = D·f(1) = 0.02 at the end of the toy ramp; the reparameterization is the toy's own
    assert metrics["d"] == pytest.approx(0.02)
    # the toy lr schedule: lr = 2e-3 (conf/train.yaml) times 0.1 ** (epoch // 2) after each epoch
    assert [record["lr"] for record in run_history(run_dir)] == pytest.approx([2e-3, 2e-4], rel=1e-12)
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    model = sparsified_model(saved["config"], run_dir / "checkpoints" / "last.pt")  # through the allowlist
    assert type(model).__name__ == "ToyNet"
    assert {type(p).__name__ for m in (model.fc1, model.fc2) for p in m.parametrizations.weight} == {"ToySoft"}

    from stds.results.sweep import collect_runs, write_report

    paths = write_report(collect_runs([run_dir]), tmp_path / "report")
    row = next(csv.DictReader(paths["csv"].open()))
    assert row["method"] == "toy_soft-toy_square" and row["model"] == "ToyNet"
    assert int(row["toy_steps"]) == metrics["step"] == 2 * 22  # 1437 training digits: 22 full batches of 64
    table = [line for line in paths["md"].read_text().splitlines() if line.startswith("| run |")]
    assert table[0].endswith("| firing_rate_mean | toy_steps | status |")  # registered last, before status

    from stds.results.nir import model_graph

    with pytest.raises(ExportError, match=r"^model ToyNet has no NIR export; the exported models are DigitsNet, "
                                          r"CIFAR10Net, SEWResNet \(a model of your own: register_model"):
        model_graph(model, (1, 8, 8))


def test_every_built_in_report_column_is_described_in_docs_metrics():
    from stds.results.columns import COLUMNS

    text = (REPO / "docs" / "metrics.md").read_text()
    assert [c.title for c in COLUMNS.values() if f"`{c.title}`" not in text] == []
