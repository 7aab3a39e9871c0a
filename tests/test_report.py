"""Sweep reports from run directories written by hand (`stds.report`, ``launch/report.py``)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from stds.errors import StdsError
from stds.report import collect_runs, method_label, read_run, write_report

REPO = Path(__file__).resolve().parents[1]

CONFIG = """\
dataset:
  _target_: stds.data.{dataset}
  root: data/{dataset}
  num_classes: 10
  in_channels: 3
  image_size: 32
model:
  _target_: stds.models.{model}
  T: ${{T}}
  num_classes: ${{dataset.num_classes}}
sparse:
  method: {method}
  exclude: null
scheduler:
  kind: {schedule}
optimizer:
  _target_: torch.optim.Adam
  _partial_: true
  lr: ${{lr}}
flat_width: {D}
alpha_gr: {alpha}
T: {T}
epochs: {epochs}
lr: 0.001
"""


def make_run(
    run_dir: Path, *, method: str = "stmod", schedule: str = "sine", D: float = 1.0,
    alpha: float = 0.0, T: int = 8, epochs: int = 3, dataset: str = "cifar10",
    model: str = "CIFAR10Net", history: list[dict] | None = None, final: dict | None = None,
    error: str | None = None, overrides: tuple[str, ...] = (),
) -> Path:
    """A run directory as `stds.train` leaves it (only the files the report reads)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(CONFIG.format(
        dataset=dataset, model=model, method=method, schedule=schedule, D=D, alpha=alpha, T=T,
        epochs=epochs))
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in overrides) or "[]\n")
    if history:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if final is not None:
        (run_dir / "metrics.json").write_text(json.dumps(final))
    if error is not None:
        (run_dir / "error.txt").write_text(error + "\n")
    return run_dir


def epoch(n: int, acc1: float, sparsity: float, **extra) -> dict:
    return {"epoch": n, "step": 10 * n, "test_acc1": acc1, "test_acc5": min(acc1 + 0.05, 1.0),
            "sparsity": sparsity, "synops": 1000.0 * n, "first_layer_macs": 500.0,
            "firing_rates": {"features.0": 0.1, "features.3": 0.3}, **extra}


def final_of(history: list[dict], planned: int) -> dict:
    best = max(history, key=lambda r: r["test_acc1"])
    last = history[-1]
    return {"test_acc1": last["test_acc1"], "test_acc5": last["test_acc5"],
            "best_test_acc1": best["test_acc1"], "best_epoch": best["epoch"],
            "sparsity": last["sparsity"], "sparsity_layers": {}, "synops": last["synops"],
            "first_layer_macs": last["first_layer_macs"], "firing_rates": last["firing_rates"],
            "epoch": last["epoch"], "epochs_planned": planned, "step": last["step"],
            "flat_width": 1.0}


def finished_run(run_dir: Path, accs: list[float], sparsity: float, **config) -> Path:
    history = [epoch(i + 1, a, sparsity) for i, a in enumerate(accs)]
    return make_run(run_dir, history=history, final=final_of(history, len(accs)),
                    epochs=len(accs), **config)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A multirun over D (0: D=2, 1: D=1, 2: running, 10: failed), a sweep inside it, a dense run
    beside it and a directory without any metrics."""
    root = tmp_path / "multirun"
    finished_run(root / "0", [0.5, 0.8, 0.7], 0.9, D=2.0, overrides=("flat_width=2",))
    finished_run(root / "1", [0.6, 0.9, 0.85], 0.5, D=1.0, overrides=("flat_width=1",))
    make_run(root / "2", D=3.0, epochs=5, history=[epoch(1, 0.4, 0.95), epoch(2, 0.3, 0.97)])
    make_run(root / "10", D=4.0, history=[epoch(1, 0.2, 0.99)],
             error="NonFiniteLossError: the loss became NaN or inf at epoch 2, step 20 | lower lr")
    finished_run(root / "nested" / "0", [0.92], 0.0, method="identity", schedule="constant")
    finished_run(root / "nested" / "inner" / "0", [0.75], 0.8, schedule="constant", alpha=1e-4)
    make_run(root / "nested" / "1", method="st", schedule="linear", D=0.5)  # just started
    (root / "multirun.yaml").write_text("{}\n")
    (root / "stray").mkdir()  # metrics without .hydra/config.yaml: not a run directory
    (root / "stray" / "metrics.json").write_text("{}")
    return root


def test_method_labels():
    assert method_label("identity", "constant", 0.0) == "dense"
    assert method_label("stmod", "sine", 0.0) == "STDS-sine"
    assert method_label("stmod", "linear", 0.0) == "STDS-linear"
    assert method_label("stmod", "constant", 2e-4) == "Grad R"
    assert method_label("stmod", "constant", 0.0) == "STDS-constant"
    assert method_label("st", "constant", 1e-3) == "Grad R"
    assert method_label("identity", "constant", 1e-3) == "dense"  # the prior needs pruned layers
    assert method_label("st", "sine", 0.0) == "st-sine"


def test_collect_finds_nested_runs_in_natural_order(sweep):
    names = [str(r.path.relative_to(sweep.resolve())) for r in collect_runs([sweep])]
    assert names == ["0", "1", "2", "10", "nested/0", "nested/1", "nested/inner/0"]


def test_finished_running_failed_and_empty_runs(sweep):
    finished = read_run(sweep / "0")
    assert (finished.status, finished.method, finished.flat_width, finished.T) == (
        "finished", "STDS-sine", 2.0, 8)
    assert (finished.epochs_done, finished.epochs_planned) == (3, 3)
    assert (finished.top1_final, finished.top1_best, finished.top5) == (0.7, 0.8, 0.75)
    assert finished.sparsity == 0.9 and finished.connectivity == 1 - 0.9
    assert finished.synops == 3000.0 and finished.first_layer_macs == 500.0
    assert finished.firing_rate_mean == pytest.approx(0.2)
    assert finished.overrides == ["flat_width=2"]

    running = read_run(sweep / "2")
    assert (running.status, running.epochs_done, running.epochs_planned) == ("running", 2, 5)
    assert (running.top1_final, running.top1_best, running.sparsity) == (0.3, 0.4, 0.97)

    failed = read_run(sweep / "10")
    assert failed.status == "failed" and failed.epochs_done == 1
    assert failed.error.startswith("NonFiniteLossError: the loss became NaN")

    empty = read_run(sweep / "nested" / "1")
    assert (empty.status, empty.method, empty.epochs_done) == ("running", "st-linear", 0)
    assert empty.top1_final is None and empty.sparsity is None and empty.connectivity is None


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_report_table_values(sweep):
    paths = write_report(collect_runs([sweep]), sweep)
    rows = _rows(paths["csv"])
    # order: dense, then STDS-sine by D, then Grad R, then st-linear
    assert [r["run"] for r in rows] == [
        "nested/0", "1", "0", "2", "10", "nested/inner/0", "nested/1"]
    dense, d1, d2 = rows[0], rows[1], rows[2]
    assert (dense["method"], dense["sparsity"], dense["connectivity"]) == ("dense", "0.0", "1.0")
    assert dense["D"] == ""  # the threshold does nothing in a dense run
    assert (d1["method"], d1["D"], d1["alpha"], d1["T"]) == ("STDS-sine", "1.0", "0.0", "8")
    assert (d1["top1_final"], d1["top1_best"], d1["top5"]) == ("0.85", "0.9", "0.9")
    assert (d1["sparsity"], d1["connectivity"]) == ("0.5", "0.5")
    assert (d1["epochs_done"], d1["epochs_planned"], d1["status"]) == ("3", "3", "finished")
    assert (d2["synops"], d2["first_layer_macs"]) == ("3000.0", "500.0")
    assert json.loads(d2["firing_rates"]) == {"features.0": 0.1, "features.3": 0.3}
    assert rows[5]["method"] == "Grad R" and rows[5]["alpha"] == "0.0001"
    assert rows[4]["status"] == "failed" and "NaN" in rows[4]["error"]
    assert rows[6]["top1_final"] == "" and rows[6]["epochs_done"] == "0"

    md = paths["md"].read_text()
    assert "7 runs: 4 finished, 2 running, 1 failed." in md
    assert ("| 1 | cifar10 | CIFAR10Net | STDS-sine | 1 | 0 | 8 | 3/3 | 85.00% | 90.00% "
            "| 90.00% | 50.00% | 50.00% | 3k | 500 | 0.2000 | finished |") in md
    assert ("| 2 | cifar10 | CIFAR10Net | STDS-sine | 3 | 0 | 8 | 2/5 | 30.00% | 40.00% "
            "| 35.00% | 97.00% | 3.00% | 2k | 500 | 0.2000 | running |") in md
    assert "failed: NonFiniteLossError: the loss became NaN or inf at epoch 2, step 20 \\| lower lr |" in md
    assert "| nested/1 | cifar10 | CIFAR10Net | st-linear | 0.5 | 0 | 8 | 0/3 | - | - |" in md
    assert "D=3: 91.64% at 98.60%" in md  # the published points for CIFAR-10 / CIFAR10Net
    assert "- `0`: features.0 0.1000, features.3 0.3000" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(paths["png"])
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # something is drawn


def test_published_points_only_for_cifar10_net(tmp_path):
    finished_run(tmp_path / "a", [0.9], 0.5, dataset="digits", model="DigitsNet")
    md = write_report(collect_runs([tmp_path]), tmp_path)["md"].read_text()
    assert "Chen et al." not in md


def test_several_directories_and_out_dir(tmp_path):
    finished_run(tmp_path / "a" / "0", [0.9], 0.5)
    finished_run(tmp_path / "b", [0.8], 0.6, D=0.5)  # a smaller D comes first
    runs = collect_runs([tmp_path / "a", tmp_path / "b", tmp_path / "a"])
    assert len(runs) == 2
    paths = write_report(runs, tmp_path / "out")
    assert [r["run"] for r in _rows(paths["csv"])] == ["../b", "../a/0"]


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(StdsError, match="no run directories"):
        collect_runs([tmp_path])
    with pytest.raises(StdsError, match="not a directory"):
        collect_runs([tmp_path / "missing"])


def test_report_without_plottable_runs_still_writes_everything(tmp_path):
    make_run(tmp_path / "0")
    paths = write_report(collect_runs([tmp_path]), tmp_path)
    assert all(p.exists() for p in paths.values())


def test_truncated_metrics_line_is_skipped(tmp_path):
    run = make_run(tmp_path / "0", history=[epoch(1, 0.5, 0.6)])
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 2, "test_ac')
    record = read_run(run)
    assert (record.epochs_done, record.top1_final) == (1, 0.5)


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_entrypoint_writes_into_the_first_directory_or_out(sweep, tmp_path):
    done = _launch(str(sweep))
    assert done.returncode == 0, done.stderr
    assert (sweep / "report.csv").exists() and "report.md" in done.stdout
    done = _launch(str(sweep / "0"), "--out", str(tmp_path / "elsewhere"))
    assert done.returncode == 0 and (tmp_path / "elsewhere" / "report.png").exists()


def test_entrypoint_errors_are_one_line(tmp_path):
    done = _launch(str(tmp_path / "missing"))
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("Error: ")
