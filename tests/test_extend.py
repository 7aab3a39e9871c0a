"""A toy model, reparameterization, schedule and report column, each one registration
(``tests/toy_extension.py``), seen everywhere they belong: the config's choices, a trained run,
the allowlist that reads its config back, the report, and the NIR export's refusal line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stds.errors import ConfigError, ExportError
from stds.run.files.rebuild import allowed_targets, sparsified_model
from stds.run.setup.build import prepare_config
from tests import toy_extension as toy
from tests.conftest import HANG_S, REPO, TINY, compose_train

TOY = ("model=toy_net", "sparse=toy_soft", "scheduler=sine", "scheduler.kind=toy_square", "flat_width=0.02",
       "epochs=2", "logging.synops=false")


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
    assert "tests.toy_extension.ToyNet" in allowed_targets()


def test_without_the_registration_the_names_are_refused_with_the_registered_ones():
    assert "tests.toy_extension.ToyNet" not in allowed_targets()
    with pytest.raises(ConfigError, match=r"sparse.method=.toy_soft. is not valid; use one of gmp, identity, st, stmod \("):
        prepare_config(compose_train(*TINY, "sparse.method=toy_soft"))
    with pytest.raises(ConfigError, match=r"scheduler.kind='toy_square' is not valid; use one of constant, cubic"):
        prepare_config(compose_train(*TINY, "scheduler.kind=toy_square"))


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
