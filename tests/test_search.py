"""Searches with an Optuna study (`stds.cli.study`, ``hparams_search=...``) and their Pareto fronts.

The fast tests drive `Search` with a stand-in launcher that writes run directories by hand (what
a trial leaves: ``metrics.json``, ``error.txt``, nothing); the slow ones run real searches on the
digits net through ``launch/train.py``.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from stds.cli.study.driver import Search
from stds.cli.study.settings import (
    SearchSettings,
    constraints_from,
    objectives_from,
    search_space,
)
from stds.errors import ConfigError, StdsError
from stds.results.pareto import (
    Bound,
    constraint_values,
    dominates,
    feasible,
    pareto_mask,
)
from stds.run.measure.health import chance_limit
from tests.conftest import HANG_S, REPO, compose_train, run_train

optuna.logging.set_verbosity(optuna.logging.WARNING)

# ------------------------------------------------------------------------------------- Pareto


def test_pareto_front_of_hand_made_points():
    # (test_acc1, sparsity), both maximised
    points = [(0.90, 0.50), (0.80, 0.90), (0.70, 0.80), (0.90, 0.50), (0.95, 0.10), (0.80, 0.85)]
    # (0.70, 0.80) and (0.80, 0.85) lose to (0.80, 0.90); equal points are both on the front
    assert pareto_mask(points, [True, True]) == [True, True, False, True, True, False]
    assert dominates((0.8, 0.9), (0.7, 0.8), [True, True])
    assert not dominates((0.9, 0.5), (0.9, 0.5), [True, True])  # equal: neither beats the other
    # minimising the second objective: (0.95, 0.10) is now best in both, the only point left
    assert pareto_mask(points, [True, False]) == [False, False, False, False, True, False]
    assert pareto_mask([(0.9, 0.5), (0.8, 0.3), (0.8, 0.4)], [True, False]) == [True, True, False]
    assert pareto_mask([], [True]) == []
    assert pareto_mask([(0.5,), (0.7,), (0.7,)], [True]) == [False, True, True]  # one objective: the best


def test_constraints_follow_optunas_sign():
    bounds = {"sparsity": Bound(min=0.9), "test_acc1": Bound(min=0.5, max=0.99)}
    values = {"sparsity": 0.85, "test_acc1": 0.995}
    assert constraint_values(values, bounds) == pytest.approx([0.05, -0.495, 0.005])
    assert not feasible(values, bounds)
    assert feasible({"sparsity": 0.95, "test_acc1": 0.7}, bounds)
    assert constraint_values({"sparsity": float("nan")}, {"sparsity": Bound(min=0.9)}) == [math.inf]
    assert constraint_values({}, {"sparsity": Bound(max=0.9)}) == [math.inf]


# -------------------------------------------------------------------------- settings, presets


def test_search_space_from_params_and_command_line():
    params = {"flat_width": {"low": 0.05, "high": 5.0, "log": True}}
    space, fixed = search_space(params, ["epochs=2", "alpha_gr=tag(log,interval(1e-5,1e-2))",
                                         "loss=ce,mse", "dataset=digits"])
    assert space == {"flat_width": FloatDistribution(0.05, 5.0, log=True),
                     "alpha_gr": FloatDistribution(1e-5, 1e-2, log=True),
                     "loss": CategoricalDistribution(["ce", "mse"])}
    assert fixed == ["epochs=2", "dataset=digits"]
    with pytest.raises(ConfigError, match=r"flat_width=0.5: flat_width is searched .*~hydra.sweeper.params.flat_width"):
        search_space(params, ["flat_width=0.5"])
    with pytest.raises(ConfigError, match=r"hydra.sweeper.params.flat_width.low=0.0 must be > 0 on a log scale"):
        search_space({"flat_width": {"low": 0, "high": 1, "log": True}}, [])
    with pytest.raises(ConfigError, match="nothing to search"):
        search_space({}, ["epochs=2"])


def test_objectives_and_constraints_are_checked():
    assert objectives_from({"test_acc1": "maximize", "synops": "minimize"}) == {
        "test_acc1": "maximize", "synops": "minimize"}
    with pytest.raises(ConfigError, match="'acc' is not a metric of metrics.json"):
        objectives_from({"acc": "maximize"})
    with pytest.raises(ConfigError, match="hydra.sweeper.objectives.sparsity=up: use maximize or minimize"):
        objectives_from({"sparsity": "up"})
    assert constraints_from({"sparsity": {"min": 0.9}}) == {"sparsity": Bound(min=0.9)}
    with pytest.raises(ConfigError, match=r"hydra.sweeper.constraints.sparsity has neither min nor max; "
                                          r"set hydra.sweeper.constraints.sparsity.min="):
        constraints_from({"sparsity": {"min": None}})


def _sweeper(*overrides: str):
    """The sweeper a composed config asks for, built from its ``hydra.sweeper`` node."""
    from omegaconf import OmegaConf

    from stds.cli.sweeper import OptunaSweeper

    cfg = compose_train(*overrides, hydra=True)
    node = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    assert node.pop("_target_") == "hydra_plugins.stds_optuna_sweeper.OptunaSweeper"
    assert node.pop("_recursive_") is False
    return cfg, OptunaSweeper(**node)


@pytest.mark.parametrize("preset, objectives, space", [
    ("frontier", {"test_acc1": "maximize", "sparsity": "maximize"},
     {"flat_width": FloatDistribution(0.05, 5.0, log=True)}),
    ("frontier_gradr", {"test_acc1": "maximize", "sparsity": "maximize"},
     {"flat_width": FloatDistribution(0.01, 5.0, log=True), "alpha_gr": FloatDistribution(1e-6, 1e-2, log=True)}),
    ("constrained", {"test_acc1": "maximize"}, {"flat_width": FloatDistribution(0.05, 5.0, log=True)}),
    ("at_sparsity", {"test_acc1": "maximize"}, {"lr": FloatDistribution(1e-4, 1e-2, log=True)}),
])
def test_presets_compose(preset, objectives, space):
    extra = {"constrained": ["hydra.sweeper.constraints.sparsity.min=0.95"],
             "at_sparsity": ["target_sparsity=0.9"]}.get(preset, [])
    cfg, sweeper = _sweeper(f"hparams_search={preset}", *extra)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    settings, fixed = sweeper.settings(["epochs=2"])
    assert settings.objectives == objectives and settings.space == space and fixed == ["epochs=2"]
    assert settings.study_name == preset and settings.storage is None
    assert settings.constraints == ({"sparsity": Bound(min=0.95)} if preset == "constrained" else {})
    if preset == "frontier_gradr":
        assert cfg.scheduler.kind == "constant"  # Grad R: a constant threshold mu
    if preset == "at_sparsity":  # every trial ends at S on the same ramp: a pruner compares like with like
        assert cfg.scheduler.kind == "target" and cfg.target_sparsity == 0.9
        assert settings.pruner == {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 4,
                                   "n_warmup_steps": 3}
        assert cfg.hydra.sweep.dir == "outputs/search/at_sparsity/s0.9"  # a study per S


def test_a_config_no_trial_can_run_with_is_one_line_before_anything(tmp_path):
    """The run's own checks run on the composed trial config before the first trial: here
    ``scheduler=target`` without ``target_sparsity``; nothing is written."""
    proc = run_train("-m", "hparams_search=at_sparsity", f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=HANG_S)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("Error: scheduler=target needs target_sparsity in (0, 1), got None; "
                                   "set target_sparsity=<S>, e.g. 0.9")
    assert not (tmp_path / "sweep").exists()


def test_preset_range_and_storage_are_overridable_and_s_is_required():
    _, sweeper = _sweeper("hparams_search=frontier", "hydra.sweeper.params.flat_width.high=0.5",
                          "hydra.sweeper.storage=mysql+pymysql://u:p@db/search", "hydra.sweeper.n_trials=8")
    settings, _ = sweeper.settings([])
    assert settings.space["flat_width"] == FloatDistribution(0.05, 0.5, log=True)
    assert settings.storage == "mysql+pymysql://u:p@db/search" and settings.n_trials == 8
    _, sweeper = _sweeper("hparams_search=constrained")
    with pytest.raises(ConfigError, match=r"set hydra.sweeper.constraints.sparsity.min="):
        sweeper.settings([])


# ------------------------------------------------------------- the search loop, stand-in launcher


def _metrics(test_acc1: float, sparsity: float) -> dict:
    return {"test_acc1": test_acc1, "sparsity": sparsity, "test_acc5": 1.0, "epoch": 2}


class FakeLauncher:
    """Writes each trial's run directory as a finished, failed or dead run would leave it.

    ``plan[n]`` says what trial ``n`` leaves: a dict (``metrics.json``), a string (``error.txt``),
    None (nothing: the job died); default: metrics from D. ``raise_after`` makes ``launch`` raise
    (a launcher that lost a job) after writing the files.
    """

    def __init__(self, sweep_dir: Path, plan: dict | None = None, raise_after: Exception | None = None):
        self.sweep_dir, self.plan, self.raise_after = sweep_dir, plan or {}, raise_after
        self.calls: list[list[list[str]]] = []

    def launch(self, overrides: list[list[str]], first_index: int):
        self.calls.append(overrides)
        returns = []
        for items in overrides:
            values = dict(item.split("=", 1) for item in items)
            number = int(values["hydra.sweep.subdir"])
            run_dir = self.sweep_dir / str(number)
            (run_dir / ".hydra").mkdir(parents=True)
            D = float(values["flat_width"])
            what = self.plan.get(number, _metrics(1.0 - D / 10, 0.5 + D / 10))
            if isinstance(what, dict):
                (run_dir / "metrics.json").write_text(json.dumps(what))
            elif isinstance(what, str):
                (run_dir / "error.txt").write_text(what + "\n")
            returns.append(JobReturn(status=JobStatus.COMPLETED if isinstance(what, dict) else JobStatus.FAILED,
                                     _return_value=RuntimeError("the task raised")))
        if self.raise_after is not None:
            raise self.raise_after
        return returns


def _search(sweep_dir: Path, launcher: FakeLauncher, n_trials: int, **kw) -> Search:
    settings = SearchSettings(
        objectives=kw.pop("objectives", {"test_acc1": "maximize", "sparsity": "maximize"}),
        space={"flat_width": FloatDistribution(0.1, 5.0, log=True)}, study_name="s",
        n_trials=n_trials, n_jobs=2, **kw)
    return Search(settings, sweep_dir, ["epochs=2"], launcher.launch,
                  sampler={"_target_": "optuna.samplers.RandomSampler", "seed": 0})


def _study(sweep_dir: Path, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}")


def test_trials_are_told_what_their_run_directories_hold(tmp_path):
    sweep_dir = tmp_path / "sweep"
    plan = {1: "ConfigError: flat_width=-1 must be >= 0", 2: _metrics(float("nan"), 0.9)}
    launcher = FakeLauncher(sweep_dir, plan)
    front = _search(sweep_dir, launcher, n_trials=4).run()

    assert [len(batch) for batch in launcher.calls] == [1, 1, 1, 1]  # one launch per trial, no batches
    first = sorted(launcher.calls, key=lambda c: c[0][-1])[0][0]
    assert first[0] == "epochs=2" and first[-1] == "hydra.sweep.subdir=0" and "trial.number=0" in first
    trials = _study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    for t in (trials[0], trials[3]):  # the values are metrics.json's
        written = json.loads((sweep_dir / str(t.number) / "metrics.json").read_text())
        assert t.values == [written["test_acc1"], written["sparsity"]]
        assert 0.1 <= t.params["flat_width"] <= 5.0
        assert t.user_attrs["run_dir"] == str(sweep_dir / str(t.number))
    assert trials[1].user_attrs["fail_reason"] == "ConfigError: flat_width=-1 must be >= 0"
    assert trials[2].user_attrs["fail_reason"] == "metrics.json has test_acc1=nan, not a finite number"
    # two finished trials on one trade-off line: both on the front (one more accurate, one sparser)
    assert sorted(p["number"] for p in front) == [0, 3]


def test_continuing_counts_every_trial_and_a_lost_job_fails_only_its_trials(tmp_path):
    sweep_dir = tmp_path / "sweep"
    _search(sweep_dir, FakeLauncher(sweep_dir), n_trials=2).run()
    first = [(t.number, t.params, t.values) for t in _study(sweep_dir).trials]

    # the launcher raises (a job ended without a result); trial 2 left metrics.json, trial 3 nothing
    lost = FakeLauncher(sweep_dir, {3: None}, raise_after=RuntimeError("Job 12 has not produced any output"))
    _search(sweep_dir, lost, n_trials=4).run()
    trials = _study(sweep_dir).trials
    assert [(t.number, t.params, t.values) for t in trials[:2]] == first  # not re-run
    assert [t.state for t in trials[2:]] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[3].user_attrs["fail_reason"] == "RuntimeError: Job 12 has not produced any output"

    again = FakeLauncher(sweep_dir)
    _search(sweep_dir, again, n_trials=4).run()  # n_trials reached: nothing to do
    assert again.calls == [] and len(_study(sweep_dir).trials) == 4


def test_trials_of_a_stopped_search_are_settled_from_their_files(tmp_path):
    sweep_dir = tmp_path / "sweep"
    _search(sweep_dir, FakeLauncher(sweep_dir), n_trials=1).run()
    study = _study(sweep_dir)
    space = {"flat_width": FloatDistribution(0.1, 5.0, log=True)}
    left = []
    for owner in (sweep_dir, sweep_dir, tmp_path / "other-machine"):  # asked, never told
        trial = study.ask(space)
        trial.set_user_attr("sweep_dir", str(owner))
        trial.set_user_attr("run_dir", str(owner / str(trial.number)))
        left.append(trial.number)
    (sweep_dir / "1").mkdir()
    (sweep_dir / "1" / "metrics.json").write_text(json.dumps(_metrics(0.9, 0.8)))  # finished after the stop

    launcher = FakeLauncher(sweep_dir)
    _search(sweep_dir, launcher, n_trials=4).run()
    trials = _study(sweep_dir).trials
    assert launcher.calls == []  # 4 trials already: only settled
    assert trials[1].state == TrialState.COMPLETE and trials[1].values == [0.9, 0.8]
    assert trials[2].state == TrialState.FAIL
    assert trials[2].user_attrs["fail_reason"].startswith("the search stopped before this trial reported")
    assert trials[3].state == TrialState.RUNNING  # another machine's trial is left alone


def test_constraints_are_stored_and_infeasible_trials_leave_the_front(tmp_path):
    sweep_dir = tmp_path / "sweep"
    plan = {0: _metrics(0.99, 0.70), 1: _metrics(0.95, 0.92), 2: _metrics(0.93, 0.95), 3: _metrics(0.90, 0.97)}
    search = _search(sweep_dir, FakeLauncher(sweep_dir, plan), n_trials=4, objectives={"test_acc1": "maximize"},
                     constraints={"sparsity": Bound(min=0.9)})
    search.sampler_spec = {"_target_": "optuna.samplers.TPESampler", "seed": 0}
    front = search.run()
    trials = _study(sweep_dir).trials
    assert [list(t.constraints) for t in trials] == [["sparsity>=0.9"]] * 4
    assert [t.constraints["sparsity>=0.9"] for t in trials] == pytest.approx([0.2, -0.02, -0.05, -0.07])
    # the best test_acc1 at sparsity >= 0.9 is trial 1, not the more accurate but denser trial 0
    assert [p["number"] for p in front] == [1]


def test_a_search_whose_every_trial_fails_is_an_error(tmp_path):
    sweep_dir = tmp_path / "sweep"
    launcher = FakeLauncher(sweep_dir, {0: "ConfigError: bad", 1: "ConfigError: bad"})
    with pytest.raises(StdsError, match="all 2 trials of this search failed; the first: ConfigError: bad"):
        _search(sweep_dir, launcher, n_trials=2).run()


def test_a_study_with_other_objectives_is_refused(tmp_path):
    sweep_dir = tmp_path / "sweep"
    _search(sweep_dir, FakeLauncher(sweep_dir), n_trials=1).run()
    with pytest.raises(ConfigError, match=r"is for test_acc1 \(maximize\), sparsity \(maximize\), not "
                                          r"test_acc1 \(maximize\); set hydra.sweeper.study_name"):
        _search(sweep_dir, FakeLauncher(sweep_dir), n_trials=2, objectives={"test_acc1": "maximize"}).run()
    with pytest.raises(ConfigError, match=r"not test_acc1 \(maximize\), sparsity \(maximize\) where sparsity>=0.9"):
        _search(sweep_dir, FakeLauncher(sweep_dir), n_trials=2, constraints={"sparsity": Bound(min=0.9)}).run()


@pytest.mark.parametrize("in_process", [False, True])
def test_a_trial_that_told_the_study_frees_its_slot_before_its_job_ends(tmp_path, in_process):
    """One slot, three trials. Each stand-in job tells the study its end (as a run does), then
    waits for the next trial's launch before it returns (a SLURM job whose end submitit has not
    seen yet): the next trial starts in the meantime. Searching on the job's end instead would
    never launch it (each wait would end only at the shared hang guard, and the check below fails). A launcher that
    runs trials in this process (Hydra's basic) frees the slot only when its call returns: two
    trials never overlap there (each job waits a little for a successor that must not come)."""
    import threading

    sweep_dir = tmp_path / "sweep"
    started = {n: threading.Event() for n in range(4)}
    overlapped: list[int] = []
    search = _search(sweep_dir, FakeLauncher(sweep_dir), n_trials=3)

    def launch(overrides, first_index):
        number = int(dict(item.split("=", 1) for item in overrides[0])["hydra.sweep.subdir"])
        started[number].set()
        study = _study(sweep_dir)
        trial = next(t for t in study.trials if t.number == number)
        run_dir = sweep_dir / str(number)
        (run_dir / ".hydra").mkdir(parents=True)
        metrics = _metrics(0.9 - number / 100, 0.5)
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        study.tell(trial.number, [metrics["test_acc1"], metrics["sparsity"]])  # the run's own tell
        # a hang guard out of process; in process, long enough for a wrong successor to start
        if number < 2 and started[number + 1].wait(timeout=0.5 if in_process else HANG_S):
            overlapped.append(number)
        return [JobReturn(status=JobStatus.COMPLETED, _return_value=None)]

    search.launch, search.poll_s, search.slots, search.in_process = launch, 0.05, 1, in_process
    search.run()
    assert overlapped == ([] if in_process else [0, 1])
    trials = _study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [t.values for t in trials] == [[0.9, 0.5], [0.89, 0.5], [0.88, 0.5]]  # told once, by the run


def test_a_study_whose_tables_another_process_creates_at_the_same_moment_opens(tmp_path, monkeypatch):
    """The race seen on a busy machine: another process (a second search, a reader) creates the new
    database's tables between Optuna's check and its CREATE; the open is retried and finds them.
    Any other error is one line at once."""
    import sqlite3

    import sqlalchemy.exc

    from stds.cli.study import storage as storage_module

    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    real, calls = optuna.create_study, []

    def racing(**kw):
        calls.append(kw["study_name"])
        if len(calls) == 1:
            optuna.storages.RDBStorage(f"sqlite:///{sweep_dir / 'study.db'}")  # the other process wins
            raise sqlalchemy.exc.OperationalError("CREATE TABLE trial_intermediate_values (...)", {},
                                                  sqlite3.OperationalError("table trial_intermediate_values "
                                                                           "already exists"))
        return real(**kw)

    monkeypatch.setattr(storage_module.optuna, "create_study", racing)
    _search(sweep_dir, FakeLauncher(sweep_dir), n_trials=2).run()
    assert calls == ["s", "s"]
    assert [t.state for t in _study(sweep_dir).trials] == [TrialState.COMPLETE] * 2

    def broken(**kw):
        calls.append(kw["study_name"])
        raise sqlalchemy.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("disk I/O error"))

    calls.clear()
    monkeypatch.setattr(storage_module.optuna, "create_study", broken)
    with pytest.raises(StdsError, match=r"cannot open the study 's' in hydra.sweeper.storage=sqlite:///.*disk I/O"):
        _search(sweep_dir, FakeLauncher(sweep_dir), n_trials=3).run()
    assert calls == ["s"]


def test_a_trial_whose_config_does_not_compose_fails_without_a_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    launcher = FakeLauncher(sweep_dir)

    def validate(batch):
        for overrides in batch:
            if "hydra.sweep.subdir=1" in overrides:
                raise ConfigError("flat_width: a value the schema refuses")

    search = _search(sweep_dir, launcher, n_trials=2)
    search.validate = validate
    search.run()
    launched = [o[-1] for batch in launcher.calls for o in batch]
    assert launched == ["hydra.sweep.subdir=0"]  # trial 1 never started
    trials = _study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs["fail_reason"] == (
        "its config does not compose: ConfigError: flat_width: a value the schema refuses")


def test_one_search_at_a_time_in_a_sweep_directory(tmp_path):
    import fcntl

    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    with (sweep_dir / ".search.lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 123 on node7\n")
        held.flush()
        with pytest.raises(StdsError, match=r"a search is already running in .*sweep \(pid 123 on node7\)"):
            _search(sweep_dir, FakeLauncher(sweep_dir), n_trials=1).run()


# ------------------------------------------------------------------------- the report's marks


def _trial_dir(sweep_dir: Path, number: int, acc: float, sparsity: float, D: float,
               constraints: str = "{}", study: str = "frontier") -> None:
    """A finished trial as a search leaves it: a run directory whose hydra.yaml names the sweeper."""
    from tests.test_report import finished_run

    run_dir = finished_run(sweep_dir / str(number), [acc], sparsity, D=D, dataset="digits", model="DigitsNet",
                           overrides=("hparams_search=frontier", f"flat_width={D!r}"))
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n"
        f"  sweep:\n    dir: {sweep_dir}\n    subdir: '{number}'\n"
        "  sweeper:\n    _target_: hydra_plugins.stds_optuna_sweeper.OptunaSweeper\n"
        f"    storage: null\n    study_name: {study}\n"
        "    objectives:\n      test_acc1: maximize\n      sparsity: maximize\n"
        f"    constraints: {constraints}\n"
        "    params:\n      flat_width: {low: 0.01, high: 1.0, log: true}\n")


def test_report_marks_the_pareto_front_of_hand_made_trials(tmp_path):
    from stds.results.plot import PARETO_LABEL, figure
    from stds.results.sweep import collect_runs, write_report

    sweep_dir = tmp_path / "search"
    points = [(0.97, 0.50, 0.02), (0.95, 0.80, 0.05), (0.90, 0.75, 0.04), (0.60, 0.95, 0.2), (0.95, 0.70, 0.03)]
    for number, (acc, sparsity, D) in enumerate(points):
        _trial_dir(sweep_dir, number, acc, sparsity, D)
    # trial 2 loses to trial 1 (less accurate and denser); trial 4 to trial 1 (as accurate, denser)
    runs = collect_runs([sweep_dir])
    paths = write_report(runs, sweep_dir)
    with paths["csv"].open() as handle:
        rows = {int(r["trial"]): r for r in csv.DictReader(handle)}
    assert [rows[n]["pareto"] for n in range(5)] == ["front", "front", "", "front", ""]
    assert rows[1]["params"] == "flat_width=0.05"
    md = paths["md"].read_text()
    assert "| run | trial | params | dataset |" in md and "| firing_rate_mean | pareto | status |" in md
    assert "| 1 | 1 | flat_width=0.05 | digits | DigitsNet | STDS-sine | 0.05 |" in md

    ax = figure(runs).axes[0]
    (front,) = [line for line in ax.get_lines() if line.get_label() == PARETO_LABEL]
    # ringed in order of connectivity (1 - sparsity, percent): trials 3, 1, 0
    assert list(front.get_xdata()) == pytest.approx([5.0, 20.0, 50.0])
    assert list(front.get_ydata()) == pytest.approx([60.0, 95.0, 97.0])
    assert PARETO_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]


def test_report_front_keeps_to_feasible_trials_of_one_study(tmp_path):
    from stds.results.sweep import collect_runs, write_report

    constrained = "{sparsity: {min: 0.9, max: null}}"
    _trial_dir(tmp_path / "a", 0, 0.97, 0.50, 0.02, constraints=constrained, study="constrained")
    _trial_dir(tmp_path / "a", 1, 0.80, 0.905, 0.1, constraints=constrained, study="constrained")
    _trial_dir(tmp_path / "a", 2, 0.85, 0.91, 0.09, constraints=constrained, study="constrained")
    _trial_dir(tmp_path / "b", 0, 0.50, 0.99, 0.5)  # another study: its own front
    from tests.test_report import finished_run

    finished_run(tmp_path / "plain" / "0", [0.99], 0.2, D=0.01, dataset="digits", model="DigitsNet")
    runs = collect_runs([tmp_path])
    write_report(runs, tmp_path)
    marks = {str(r.path.relative_to(tmp_path)): (r.trial, r.pareto) for r in runs}
    assert marks == {"a/0": (0, "infeasible"), "a/1": (1, ""), "a/2": (2, "front"), "b/0": (0, "front"),
                     "plain/0": (None, None)}


# ------------------------------------------------------------- real searches on the digits net

SEARCH = ("-m", "hparams_search=frontier", "hydra/launcher=local", "dataset=digits", "epochs=1",
          "batch_size=64", "logging.log_every_steps=5", "logging.synops=false", "hydra.sweeper.n_jobs=2",
          # the digits net prunes everything in one epoch above D of about 0.1
          "hydra.sweeper.params.flat_width.low=0.005", "hydra.sweeper.params.flat_width.high=0.2")


def _ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.slow
def test_frontier_search_runs_six_trials_then_continues_to_eight(tmp_path):
    sweep_dir = tmp_path / "search"
    _ok(run_train(*SEARCH, "hydra.sweeper.n_trials=6", f"hydra.sweep.dir={sweep_dir}", timeout=HANG_S))
    study = optuna.load_study(study_name="frontier", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    first = study.trials
    assert [t.state for t in first] == [TrialState.COMPLETE] * 6
    for t in first:  # each trial is a normal run directory; its values are its metrics.json
        metrics = json.loads((sweep_dir / str(t.number) / "metrics.json").read_text())
        assert t.values == [metrics["test_acc1"], metrics["sparsity"]]
        assert metrics["d"] == pytest.approx(t.params["flat_width"])  # the sine schedule ends at D
        assert 0.005 <= t.params["flat_width"] <= 0.2

    # the same command with a larger budget adds exactly two trials and re-runs none
    mtimes = {n: (sweep_dir / str(n) / "metrics.json").stat().st_mtime_ns for n in range(6)}
    _ok(run_train(*SEARCH, "hydra.sweeper.n_trials=8", f"hydra.sweep.dir={sweep_dir}", timeout=HANG_S))
    trials = optuna.load_study(study_name="frontier", storage=f"sqlite:///{sweep_dir / 'study.db'}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    assert [(t.params, t.values) for t in trials[:6]] == [(t.params, t.values) for t in first]
    assert {n: (sweep_dir / str(n) / "metrics.json").stat().st_mtime_ns for n in range(6)} == mtimes
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == [str(n) for n in range(8)]

    # the report lists the trials with their parameters and marks the front from the same values
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(sweep_dir)],
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr
    with (sweep_dir / "report.csv").open() as handle:
        rows = {int(r["trial"]): r for r in csv.DictReader(handle)}
    assert sorted(rows) == list(range(8))
    # a trial at chance (a fully pruned net) is marked, never on the front (health.chance_limit: 0.15)
    above = [t for t in trials if t.values[0] > chance_limit(10)]
    on_front = dict(zip([t.number for t in above], pareto_mask([t.values for t in above], [True, True])))
    expected = ["front" if on_front.get(t.number) else "" if t.number in on_front else "chance" for t in trials]
    assert [rows[t.number]["pareto"] for t in trials] == expected
    assert all(rows[t.number]["params"] == f"flat_width={t.params['flat_width']:.4g}" for t in trials)


@pytest.mark.slow
def test_a_failed_trial_is_recorded_with_its_reason(tmp_path):
    sweep_dir = tmp_path / "bad"
    # data the trial's machine lacks: the search does not look at this machine's files before the
    # first trial (trials may run on other nodes), so the trial fails with the run's one line
    missing = tmp_path / "no-cifar"
    proc = run_train("-m", "hydra/sweeper=stds_optuna", "hydra/launcher=local", "dataset=cifar10",
                     f"dataset.root={missing}", "model=cifar10net", "epochs=1", "flat_width=choice(0.1)",
                     "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={sweep_dir}", timeout=HANG_S)
    assert proc.returncode == 1
    line = f"ConfigError: dataset.root={missing} does not exist"
    assert f"Error: all 1 trials of this search failed; the first: {line}" in proc.stderr
    (trial,) = optuna.load_study(study_name="train", storage=f"sqlite:///{sweep_dir / 'study.db'}").trials
    assert trial.state == TrialState.FAIL and trial.params == {"flat_width": 0.1}
    assert trial.user_attrs["fail_reason"].startswith(line)
    assert trial.user_attrs["fail_reason"] == (sweep_dir / "0" / "error.txt").read_text().strip()
    # a point every run refuses (D < 0) is one line before any trial, and nothing is written
    proc = run_train("-m", "hydra/sweeper=stds_optuna", "hydra/launcher=local", "dataset=digits", "epochs=1",
                     "flat_width=choice(-1.0)", "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'x'}",
                     timeout=HANG_S)
    assert proc.returncode == 1 and not (tmp_path / "x").exists()
    assert proc.stderr.strip() == ("Error: hydra.sweeper.params: a trial's config is refused (flat_width=-1.0): "
                                   "flat_width=-1.0 must be >= 0; set flat_width=<value> with value >= 0")
