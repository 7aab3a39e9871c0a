"""Sweep reports from run directories written by hand (`stds.results.sweep`, ``launch/report.py``)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib.image
import pytest

from tests.conftest import REPO, at_once

from stds.errors import StdsError
from stds.results.collect import collect_runs, method_label, read_run
from stds.results.sweep import write_report


CONFIG = """\
dataset:
  _target_: stds.data.datasets.{dataset}
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
  ramp: sine
optimizer:
  _target_: torch.optim.Adam
  _partial_: true
  lr: ${{lr}}
flat_width: {D}
alpha_gr: {alpha}
target_sparsity: {S}
T: {T}
epochs: {epochs}
lr: 0.001
"""


def make_run(
    run_dir: Path, *, method: str = "stmod", schedule: str = "sine", D: float = 1.0,
    alpha: float = 0.0, S: float = 0.9, T: int = 8, epochs: int = 3, dataset: str = "cifar10",
    model: str = "CIFAR10Net", history: list[dict] | None = None, final: dict | None = None,
    error: str | None = None, overrides: tuple[str, ...] = (),
) -> Path:
    """A run directory as `stds.run.life.loop` leaves it (only the files the report reads)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(CONFIG.format(
        dataset=dataset, model=model, method=method, schedule=schedule, D=D, alpha=alpha, S=S,
        T=T, epochs=epochs))
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
            "d": 1.0, "warnings": []}


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
    make_run(root / "2", D=3.0, epochs=5,
             history=[epoch(1, 0.4, 0.95, d=0.1), epoch(2, 0.3, 0.97, d=0.25)])
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
    assert finished.target_sparsity is None  # only scheduler=target runs have one
    assert (finished.epoch, finished.epochs_planned) == (3, 3)
    assert (finished.test_acc1, finished.best_test_acc1, finished.test_acc5) == (0.7, 0.8, 0.75)
    assert (finished.best_epoch, finished.d) == (2, 1.0)
    assert finished.sparsity == 0.9 and finished.connectivity == 1 - 0.9
    assert finished.synops == 3000.0 and finished.first_layer_macs == 500.0
    assert finished.firing_rate_mean == pytest.approx(0.2)
    assert finished.overrides == ["flat_width=2"]

    running = read_run(sweep / "2")
    assert (running.status, running.epoch, running.epochs_planned) == ("running", 2, 5)
    # best by best.pt's rule: epoch 1 (connectivity 0.05) is not within 5% of the last's 0.03
    assert (running.test_acc1, running.best_test_acc1, running.sparsity) == (0.3, 0.3, 0.97)
    assert (running.best_epoch, running.d) == (2, 0.25)  # d of the last line

    failed = read_run(sweep / "10")
    assert failed.status == "failed" and failed.epoch == 1
    assert failed.error.startswith("NonFiniteLossError: the loss became NaN")

    empty = read_run(sweep / "nested" / "1")
    assert (empty.status, empty.method, empty.epoch) == ("running", "st-linear", 0)
    assert empty.test_acc1 is None and empty.sparsity is None and empty.connectivity is None


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
    assert dense["flat_width"] == ""  # the threshold does nothing in a dense run
    assert (d1["method"], d1["flat_width"], d1["alpha_gr"], d1["T"]) == ("STDS-sine", "1.0", "0.0", "8")
    assert (d1["test_acc1"], d1["best_test_acc1"], d1["test_acc5"]) == ("0.85", "0.9", "0.9")
    assert (d1["sparsity"], d1["connectivity"], d1["d"], d1["best_epoch"]) == ("0.5", "0.5", "1.0", "2")
    assert (d1["epoch"], d1["epochs_planned"], d1["status"]) == ("3", "3", "finished")
    assert (d2["synops"], d2["first_layer_macs"]) == ("3000.0", "500.0")
    assert json.loads(d2["firing_rates"]) == {"features.0": 0.1, "features.3": 0.3}
    assert d2["firing_rate_mean"] == str((0.1 + 0.3) / 2)
    assert rows[5]["method"] == "Grad R" and rows[5]["alpha_gr"] == "0.0001"
    assert rows[4]["status"] == "failed" and "NaN" in rows[4]["error"]
    assert rows[6]["test_acc1"] == "" and rows[6]["epoch"] == "0"
    assert rows[6]["target_sparsity"] == "" and rows[6]["warnings"] == ""

    md = paths["md"].read_text()
    assert "7 runs: 4 finished, 2 running, 1 failed." in md
    assert ("| run | dataset | model | method | flat_width | alpha_gr | T | epoch | epochs_planned "
            "| test_acc1 | best_test_acc1 | test_acc5 | sparsity | connectivity | d | synops "
            "| first_layer_macs | firing_rate_mean | status |") in md  # no target_sparsity run
    assert ("| 1 | cifar10 | CIFAR10Net | STDS-sine | 1 | 0 | 8 | 3 | 3 | 85.00% | 90.00% "
            "| 90.00% | 50.00% | 50.00% | 1 | 3k | 500 | 0.2000 | finished |") in md
    assert ("| 2 | cifar10 | CIFAR10Net | STDS-sine | 3 | 0 | 8 | 2 | 5 | 30.00% | 30.00% "
            "| 35.00% | 97.00% | 3.00% | 0.25 | 2k | 500 | 0.2000 | running |") in md
    assert "failed: NonFiniteLossError: the loss became NaN or inf at epoch 2, step 20 \\| lower lr |" in md
    assert "| nested/1 | cifar10 | CIFAR10Net | st-linear | 0.5 | 0 | 8 | 0 | 3 | - | - |" in md
    assert "flat_width=3: 91.64% at 98.60%" in md  # the published points for CIFAR-10 / CIFAR10Net
    assert "- `0`: features.0 0.1000, features.3 0.3000" in md
    assert "top1" not in md and "top-1" not in md and "Warnings" not in md
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
    assert (record.epoch, record.test_acc1) == (1, 0.5)


def test_entrypoint_writes_into_the_first_directory_or_out_and_errors_are_one_line(sweep, tmp_path):
    report = [sys.executable, str(REPO / "launch" / "report.py")]
    into, out, missing = at_once([*report, str(sweep)],
                                 [*report, str(sweep / "0"), "--out", str(tmp_path / "elsewhere")],
                                 [*report, str(tmp_path / "missing")])
    assert into.returncode == 0, into.stderr
    assert (sweep / "report.csv").exists() and "report.md" in into.stdout
    assert out.returncode == 0 and (tmp_path / "elsewhere" / "report.png").exists()
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and missing.stderr.startswith("Error: ")


def test_old_run_dirs_with_flat_width_for_the_threshold_now(tmp_path):
    """Before the rename, metrics files named the threshold now ``flat_width``; it is read as d."""
    running = make_run(tmp_path / "0", D=2.0, history=[epoch(1, 0.5, 0.6, flat_width=0.75)])
    old_final = final_of([epoch(1, 0.5, 0.6)], 1)
    del old_final["d"]
    finished = make_run(tmp_path / "1", D=2.0, history=[epoch(1, 0.5, 0.6, flat_width=2.0)],
                        final={**old_final, "flat_width": 2.0})
    assert (read_run(running).d, read_run(running).flat_width) == (0.75, 2.0)
    assert read_run(finished).d == 2.0
    new = make_run(tmp_path / "2", history=[epoch(1, 0.5, 0.6, d=0.5, flat_width=9.0)])
    assert read_run(new).d == 0.5  # the new name wins


def test_warnings_are_listed_under_the_table(tmp_path):
    history = [epoch(1, 0.1, 1.0)]
    final = {**final_of(history, 1), "warnings": [
        "every weight is pruned (sparsity 100%); lower flat_width", "test_acc1 is at chance"]}
    make_run(tmp_path / "0", history=history, final=final)
    finished_run(tmp_path / "1", [0.9], 0.5)
    paths = write_report(collect_runs([tmp_path]), tmp_path)
    md = paths["md"].read_text()
    table_end = md.index("## Warnings")
    assert "| 0 | cifar10" in md[:table_end]
    assert ("## Warnings\n\n- `0`: every weight is pruned (sparsity 100%); lower flat_width\n"
            "- `0`: test_acc1 is at chance\n") in md
    rows = {r["run"]: r for r in _rows(paths["csv"])}
    assert json.loads(rows["0"]["warnings"]) == final["warnings"] and rows["1"]["warnings"] == ""


def _lines_by_label(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_target_sparsity_runs_are_their_own_method_beside_a_d_sweep(tmp_path):
    for n, (S, sparsity, acc) in enumerate([(0.95, 0.951, 0.80), (0.8, 0.802, 0.90), (0.9, 0.899, 0.86)]):
        finished_run(tmp_path / "target" / str(n), [acc], sparsity, schedule="target", S=S, D=1.0)
    finished_run(tmp_path / "d" / "0", [0.91], 0.7, D=0.5)
    finished_run(tmp_path / "d" / "1", [0.84], 0.93, D=1.5)
    runs = collect_runs([tmp_path])
    paths = write_report(runs, tmp_path)
    rows = _rows(paths["csv"])
    assert [(r["method"], r["target_sparsity"], r["flat_width"]) for r in rows] == [
        ("STDS-sine", "", "0.5"), ("STDS-sine", "", "1.5"),
        ("STDS-target", "0.8", ""), ("STDS-target", "0.9", ""), ("STDS-target", "0.95", "")]
    md = paths["md"].read_text()
    assert "| flat_width | alpha_gr | target_sparsity | T |" in md
    assert "| target/1 | cifar10 | CIFAR10Net | STDS-target | - | 0 | 80.00% | 8 |" in md  # D unused
    assert "| d/0 | cifar10 | CIFAR10Net | STDS-sine | 0.5 | 0 | - | 8 |" in md

    from stds.results.plot import figure

    fig = figure(runs)
    assert len(fig.axes) == 1  # one (dataset, model): both sweeps in one panel
    lines = _lines_by_label(fig.axes[0])
    target, sine = lines["STDS-target"], lines["STDS-sine"]
    # points sorted by connectivity = 1 - sparsity, in percent
    assert list(target.get_xdata()) == pytest.approx([100 * (1 - s) for s in (0.951, 0.899, 0.802)])
    assert list(target.get_ydata()) == pytest.approx([80.0, 86.0, 90.0])
    assert list(sine.get_xdata()) == pytest.approx([7.0, 30.0])
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert {"target_sparsity=0.8", "target_sparsity=0.95", "flat_width=0.5"} <= labels
    assert fig.axes[0].get_ylabel() == "test_acc1 [%]"


def test_stds_gmp_and_grad_r_sweeps_are_three_frontiers_in_one_panel(tmp_path):
    """The three-method comparison of docs/target_sparsity.md: one report over the target sweep
    (STDS and GMP at the same S) and the Grad R sweep draws one series per method in one panel."""
    for n, (S, acc) in enumerate([(0.9, 0.97), (0.98, 0.93)]):
        finished_run(tmp_path / "target" / str(n), [acc], S, schedule="target", S=S)
        finished_run(tmp_path / "target" / str(n + 2), [acc - 0.1], S, method="gmp", schedule="target", S=S)
    for n, (alpha, sparsity, acc) in enumerate([(0.3, 0.91, 0.95), (1.0, 0.975, 0.9)]):
        finished_run(tmp_path / "gradr" / str(n), [acc], sparsity, schedule="constant", D=0.05, alpha=alpha)
    runs = collect_runs([tmp_path / "target", tmp_path / "gradr"])
    rows = _rows(write_report(runs, tmp_path / "report")["csv"])
    assert sorted({r["method"] for r in rows}) == ["GMP", "Grad R", "STDS-target"]
    from stds.results.plot import figure

    fig = figure(runs)
    assert len(fig.axes) == 1
    lines = _lines_by_label(fig.axes[0])
    assert list(lines["STDS-target"].get_xdata()) == pytest.approx([2.0, 10.0])  # connectivity, sorted
    assert list(lines["STDS-target"].get_ydata()) == pytest.approx([93.0, 97.0])
    assert list(lines["GMP"].get_ydata()) == pytest.approx([83.0, 87.0])
    assert list(lines["Grad R"].get_xdata()) == pytest.approx([2.5, 9.0])
    assert list(lines["Grad R"].get_ydata()) == pytest.approx([90.0, 95.0])


def test_runs_at_zero_connectivity_sit_on_the_axis_floor_and_are_listed(tmp_path):
    digits = {"dataset": "digits", "model": "DigitsNet"}
    finished_run(tmp_path / "0", [0.95], 0.6, D=0.1, **digits)
    finished_run(tmp_path / "1", [0.9], 0.95, D=0.3, **digits)
    finished_run(tmp_path / "2", [0.1], 1.0, D=0.4, **digits)
    make_run(tmp_path / "3", D=0.5, epochs=4, history=[epoch(1, 0.12, 1.0)], **digits)
    runs = collect_runs([tmp_path])
    md = write_report(runs, tmp_path)["md"].read_text()
    assert ("Runs at 0% connectivity (every weight pruned) have no place on the log axis; the plot "
            "draws them at its left edge as triangles (◀): `2` (STDS-sine, flat_width=0.4: "
            "test_acc1 10.00%, finished), `3` (STDS-sine, flat_width=0.5: test_acc1 12.00%, "
            "running).") in md

    from stds.results.plot import FLOOR_LABEL, figure

    ax = figure(runs).axes[0]
    floor = ax.get_xlim()[0]
    # the limits come from the positive connectivities 40% and 5% alone: [5/1.5, 40*1.5]
    assert ax.get_xlim() == pytest.approx((5 / 1.5, 40 * 1.5))
    marks = [line for line in ax.get_lines() if line.get_marker() == "<"]
    assert [float(line.get_xdata()[0]) for line in marks] == pytest.approx([floor, floor])
    assert [float(line.get_ydata()[0]) for line in marks] == pytest.approx([10.0, 12.0])
    assert marks[0].get_markerfacecolor() != "white" and marks[1].get_markerfacecolor() == "white"
    assert marks[0].get_label() == FLOOR_LABEL
    assert FLOOR_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]
    assert list(_lines_by_label(ax)["STDS-sine"].get_xdata()) == pytest.approx([5.0, 40.0])


def _hydra_yaml(run_dir: Path, job_id: str, sweep_dir: str) -> None:
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n"
        f"  sweep:\n    dir: '{sweep_dir}'\n    subdir: ${{hydra.job.num}}\n"
        "  launcher:\n    submitit_folder: ${hydra.sweep.dir}/.submitit/%j\n"
        f"  job:\n    id: '{job_id}'\n    num: 0\n"
        f"  runtime:\n    cwd: {run_dir.parent}\n")


def _job_logs(sweep: Path, job_id: str, out: str, err: str) -> Path:
    """The plain-text logs submitit leaves in ``.submitit/<job>/`` (its INFO lines go to stdout)."""
    folder = sweep / ".submitit" / job_id
    folder.mkdir(parents=True)
    (folder / f"{job_id}_0_log.out").write_text(out)
    (folder / f"{job_id}_0_log.err").write_text(err)
    return folder


_STARTED = "submitit INFO (2026-01-01 10:00:00,000) - Starting with JobEnvironment(job_id=1)\n"
_DONE = "submitit INFO (2026-01-01 10:05:00,000) - Job completed successfully\n"
_RAISED = "submitit ERROR (2026-01-01 10:05:00,000) - Submitted job triggered an exception\n"


def test_a_run_whose_submitit_job_ended_without_metrics_is_failed(tmp_path):
    """No metrics.json and no error.txt: the job's plain-text logs say whether it ended and why."""
    sweep = tmp_path / "sweep"
    traceback = ("Traceback (most recent call last):\n  File \"x\", line 1\n"
                 "torch.OutOfMemoryError: CUDA out of memory\n\n")
    cases = {  # run dir -> (job id, stdout, stderr)
        # Hydra caught the task's exception; the launcher wrote its line to stderr
        "0": ("101", _STARTED + _DONE, "ConfigError: flat_width=-1.0 must be >= 0; set flat_width=<value> "
                                       "with value >= 0\n"),
        "1": ("102", _STARTED, _RAISED + traceback),  # the job raised
        "2": ("103", _STARTED, ""),  # still running
        "3": ("104", _STARTED + _DONE, ""),  # ended, nothing said why
        "4": ("105", _STARTED, "slurmstepd: error: *** JOB 105 ON n1 CANCELLED AT 2026-01-01T12:00:00 "
                               "DUE TO TIME LIMIT ***\n"),
    }
    for name, (job_id, out, err) in cases.items():
        make_run(sweep / name)
        # a sweep dir with ${now:...} is never resolved: the job folder is found beside the run
        _hydra_yaml(sweep / name, job_id, "outputs/multirun/${now:%Y-%m-%d}" if name == "0" else str(sweep))
        _job_logs(sweep, job_id, out, err)
    records = {r.path.name: r for r in collect_runs([sweep])}
    assert (records["0"].status, records["0"].error) == (
        "failed", "ConfigError: flat_width=-1.0 must be >= 0; set flat_width=<value> with value >= 0")
    assert (records["1"].status, records["1"].error) == ("failed", "OutOfMemoryError: CUDA out of memory")
    assert (records["2"].status, records["2"].error) == ("running", "")
    assert records["3"].status == "failed"
    assert records["3"].error.startswith("no result: the job ended without metrics.json or error.txt; see ")
    assert records["3"].error.endswith("104_0_log.err")
    assert records["4"].status == "failed" and "DUE TO TIME LIMIT" in records["4"].error
    # error.txt, when the run wrote one, is the reason shown
    (sweep / "1" / "error.txt").write_text("RuntimeError: from the run\n")
    assert read_run(sweep / "1").error == "RuntimeError: from the run"
    md = write_report(collect_runs([sweep]), sweep)["md"].read_text()
    assert "5 runs: 0 finished, 1 running, 4 failed." in md
