"""A search's life beyond one process (`stds.cli.study`, `stds.run.life.study_link`): trials in
flight one at a time, reruns that never fail a live trial, trials that tell their own result,
early stopping, and the problems found before any trial.

The fast tests drive `Search` with stand-in launchers on a real SQLite study; the slow ones run
real searches on the digits net through ``launch/train.py`` as local processes and kill the
search while its trials train.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from stds.cli.study.driver import Search
from stds.cli.study.settings import SearchSettings, override_value
from stds.errors import ConfigError, StdsError
from tests.conftest import HANG_S, REPO, run_train

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _settings(n_trials: int, n_jobs: int = 2, **kw) -> SearchSettings:
    return SearchSettings(objectives=kw.pop("objectives", {"test_acc1": "maximize", "sparsity": "maximize"}),
                          space={"flat_width": FloatDistribution(0.1, 5.0, log=True)}, study_name="s",
                          n_trials=n_trials, n_jobs=n_jobs, **kw)


def _study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=f"sqlite:///{sweep_dir / 'study.db'}")


def _number(overrides: list[str]) -> int:
    return int(dict(o.split("=", 1) for o in overrides)["hydra.sweep.subdir"])


def _finish(sweep_dir: Path, number: int, acc: float) -> None:
    run_dir = sweep_dir / str(number)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps({"test_acc1": acc, "sparsity": 0.5}))


@pytest.mark.parametrize("value", ["a\\b", "a'b", "a\\", "a\\'b", "c:\\x\\\\y", "plain"])
def test_override_value_reads_back_as_the_same_string(value):
    parsed = OverridesParser.create().parse_override("k=" + override_value(value)).value()
    assert parsed == value


def test_the_next_trial_starts_as_soon_as_one_ends(tmp_path):
    """Trial 0 runs until trial 3 has started: with two slots, trials 1, 2 and 3 start one after
    the other in the slot that trial 0 does not hold (no batch waits for its slowest trial)."""
    sweep_dir = tmp_path / "sweep"
    started: list[int] = []
    release_zero = threading.Event()

    def launch(overrides, first_index):
        number = _number(overrides[0])
        assert first_index == number  # the job index is the trial number (its log, its folder)
        started.append(number)
        if number == 0:
            assert release_zero.wait(HANG_S)
        if number == 3:
            release_zero.set()
        _finish(sweep_dir, number, 0.9 - number / 100)
        return [None]

    Search(_settings(4), sweep_dir, [], launch).run()
    assert started == [0, 1, 2, 3]
    assert [t.state for t in _study(sweep_dir).trials] == [TrialState.COMPLETE] * 4


def test_a_trial_told_by_its_run_is_not_told_again(tmp_path):
    """The run tells the study itself (here by hand, with other values than its files hold)."""
    sweep_dir = tmp_path / "sweep"

    def launch(overrides, first_index):
        number = _number(overrides[0])
        study = _study(sweep_dir)
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        study.tell(optuna.Trial(study, trial_id), [0.5, 0.25])
        _finish(sweep_dir, number, 0.9)
        return [None]

    Search(_settings(1), sweep_dir, [], launch).run()
    (trial,) = _study(sweep_dir).trials
    assert trial.values == [0.5, 0.25]


def test_a_rerun_keeps_a_live_trial_and_settles_an_ended_one(tmp_path):
    """Trials of an earlier search: one whose run still holds its lock stays running (and the
    rerun waits for it), one that ended unheard is told from its metrics.json."""
    import fcntl

    sweep_dir = tmp_path / "sweep"
    Search(_settings(1), sweep_dir, [], lambda o, i: (_finish(sweep_dir, 0, 0.9), [None])[1]).run()
    study = _study(sweep_dir)
    numbers = []
    for _ in range(2):
        trial = study.ask({"flat_width": FloatDistribution(0.1, 5.0, log=True)})
        for key, value in (("sweep_dir", str(sweep_dir.resolve())), ("heartbeat_s", 60)):
            trial.set_user_attr(key, value)
        study._storage.record_heartbeat(trial._trial_id)
        numbers.append(trial.number)
    _finish(sweep_dir, numbers[0], 0.8)  # ended while no search ran
    live = sweep_dir / str(numbers[1])
    live.mkdir()
    held = open(live / ".lock", "w")
    fcntl.flock(held, fcntl.LOCK_EX)  # a run training there

    def end_live_run():
        time.sleep(1.0)
        _finish(sweep_dir, numbers[1], 0.7)
        s = _study(sweep_dir)
        s.tell(optuna.Trial(s, s._storage.get_trial_id_from_study_id_trial_number(s._study_id, numbers[1])),
               [0.7, 0.5])  # as the run itself would
        held.close()

    ender = threading.Thread(target=end_live_run)
    search = Search(_settings(3), sweep_dir, [], lambda o, i: pytest.fail("nothing new to launch"))
    search.poll_s = 0.2
    ender.start()
    search.run()
    ender.join()
    trials = _study(sweep_dir).trials
    assert [(t.state, t.values) for t in trials[1:]] == [(TrialState.COMPLETE, [0.8, 0.5]),
                                                         (TrialState.COMPLETE, [0.7, 0.5])]


def test_a_trial_whose_heartbeat_stopped_fails_and_is_retried_with_its_params(tmp_path):
    sweep_dir = tmp_path / "sweep"
    settings = _settings(1, heartbeat_s=1, grace_s=2)
    Search(settings, sweep_dir, [], lambda o, i: (_finish(sweep_dir, 0, 0.9), [None])[1]).run()
    study = _study(sweep_dir)
    dead = study.ask({"flat_width": FloatDistribution(0.1, 5.0, log=True)})
    for key, value in (("sweep_dir", str(sweep_dir.resolve())), ("heartbeat_s", 1)):
        dead.set_user_attr(key, value)
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(3)  # the grace period passes: its process died without a word
    ran = []
    Search(_settings(2, heartbeat_s=1, grace_s=2), sweep_dir, [],
           lambda o, i: (ran.append(_number(o[0])), _finish(sweep_dir, _number(o[0]), 0.6), [None])[2]).run()
    trials = _study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].params == trials[1].params and ran == [2]  # the retry, in its own run directory
    assert trials[2].system_attrs["failed_trial"] == 1


def test_two_searches_never_run_more_than_n_trials(tmp_path):
    """Another search asked the last trial between this one's count and its ask: this one's
    trial is told failed as not run, and nothing is launched for it."""
    sweep_dir = tmp_path / "sweep"
    search = Search(_settings(1), sweep_dir, [], lambda o, i: pytest.fail("over n_trials"))
    original = optuna.Study.ask

    def ask_after_another(study, fixed_distributions=None):
        other = original(study, fixed_distributions)  # the other machine's trial, asked first
        other.set_user_attr("sweep_dir", "/elsewhere")
        study.tell(other, [0.9, 0.5])
        optuna.Study.ask = original
        return original(study, fixed_distributions)

    optuna.Study.ask = ask_after_another
    try:
        search.run()
    finally:
        optuna.Study.ask = original
    trials = _study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs["not_run"] is True


def test_a_copied_study_does_not_make_the_search_read_files_elsewhere(tmp_path):
    """A running trial whose attributes name a run directory outside the sweep directory: its
    files there are never read (the trial is settled from its own place, where nothing is)."""
    sweep_dir, elsewhere = tmp_path / "sweep", tmp_path / "elsewhere"
    Search(_settings(1), sweep_dir, [], lambda o, i: (_finish(sweep_dir, 0, 0.9), [None])[1]).run()
    study = _study(sweep_dir)
    trial = study.ask({"flat_width": FloatDistribution(0.1, 5.0, log=True)})
    trial.set_user_attr("sweep_dir", str(sweep_dir.resolve()))
    trial.set_user_attr("run_dir", str(elsewhere))
    elsewhere.mkdir()
    (elsewhere / "metrics.json").write_text(json.dumps({"test_acc1": 1.0, "sparsity": 1.0}))
    Search(_settings(2), sweep_dir, [], lambda o, i: pytest.fail("nothing to launch")).run()
    told = _study(sweep_dir).trials[1]
    assert told.state == TrialState.FAIL and str(elsewhere) not in told.user_attrs["fail_reason"]


def test_problems_found_before_any_trial_are_one_line_and_write_nothing(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "study.db").write_bytes(b"")
    with pytest.raises(StdsError, match=r"study.db is empty, not a study; delete it"):
        Search(_settings(1), sweep_dir, [], lambda o, i: pytest.fail("ran")).run()
    url = "mysql+pymysql://stds:hunter2@db:notaport/x"
    with pytest.raises(ConfigError) as raised:
        Search(_settings(1, storage=url), tmp_path / "other", [], lambda o, i: pytest.fail("ran")).run()
    assert "hunter2" not in str(raised.value) and "stds:***@db" in str(raised.value)

    from hydra.errors import ConfigCompositionException

    def validate(batch):
        for overrides in batch:
            if any(o.startswith("flat_width=") for o in overrides):
                raise ConfigCompositionException("Could not override 'flat_width'. Key 'flat_width' is not in struct")

    with pytest.raises(ConfigError, match=r"hydra.sweeper.params: a trial's config does not compose \(flat_width="):
        Search(_settings(1), tmp_path / "third", [], lambda o, i: pytest.fail("ran"), validate=validate).run()
    assert not (tmp_path / "third").exists()

    def refuse(batch):  # it composes, and the run's own checks refuse the value
        for overrides in batch:
            if "flat_width=0.1" in overrides:
                raise ConfigError("flat_width=0.1 is refused")

    with pytest.raises(ConfigError, match=r"a trial's config is refused \(flat_width=0.1\): flat_width=0.1 is refused$"):
        Search(_settings(1), tmp_path / "fourth", [], lambda o, i: pytest.fail("ran"), validate=refuse).run()
    assert not (tmp_path / "fourth").exists()


def test_a_pruner_needs_a_single_objective_and_a_known_class():
    with pytest.raises(ConfigError, match=r"pruner: Optuna's pruners stop trials of single-objective studies only"):
        _settings(1, pruner={"_target_": "optuna.pruners.MedianPruner"})
    with pytest.raises(ConfigError, match=r"pruner._target_=os.system is not a pruner"):
        _settings(1, objectives={"test_acc1": "maximize"}, pruner={"_target_": "os.system"})
    built = _settings(1, objectives={"test_acc1": "maximize"},
                      pruner={"_target_": "optuna.pruners.MedianPruner", "n_warmup_steps": 2})
    assert built.trial_spec.to_attr()["pruner"]["n_warmup_steps"] == 2


# --------------------------------------------------------------------- real runs, real processes

SEARCH = ("-m", "hydra/launcher=local", "dataset=digits", "batch_size=64", "logging.log_every_steps=5",
          "logging.synops=false", "logging.progress_bar=false")


def _load(sweep_dir: Path, name: str) -> list:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}").trials


@pytest.mark.slow
def test_a_search_killed_while_its_trials_train_loses_nothing_when_run_again(tmp_path):
    """SIGKILL the search once a trial trains; its trials go on as their own processes; the same
    command at once fails none of them, and every trial ends told with its metrics.json."""
    from stds.run.files.rundir import lock_is_held

    sweep_dir = tmp_path / "search"
    args = (*SEARCH, "hparams_search=frontier", "epochs=4", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.params.flat_width.low=0.005", "hydra.sweeper.params.flat_width.high=0.02",
            f"hydra.sweep.dir={sweep_dir}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + HANG_S
        while not any(lock_is_held(p) for p in sweep_dir.glob("[0-9]*")):
            assert driver.poll() is None and time.monotonic() < deadline, "no trial started training"
            time.sleep(0.5)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(HANG_S)
    live = [int(p.name) for p in sweep_dir.glob("[0-9]*") if lock_is_held(p)]
    assert live, "the trials died with the search"

    proc = run_train(*args, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _load(sweep_dir, "frontier")
    assert len(trials) == 3 and [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for t in trials:
        metrics = json.loads((sweep_dir / str(t.number) / "metrics.json").read_text())
        assert t.values == [metrics["test_acc1"], metrics["sparsity"]] and metrics["epoch"] == 4
        assert "resumed from" not in (sweep_dir / str(t.number) / "train.log").read_text()  # ran once


@pytest.mark.slow
def test_a_pruned_trial_ends_cleanly_keeps_its_checkpoint_and_shows_as_pruned(tmp_path):
    """ThresholdPruner(lower=1.01): no top-1 reaches it, so each trial stops after its first epoch."""
    sweep_dir = tmp_path / "search"
    proc = run_train(*SEARCH, "hparams_search=constrained", "epochs=3", "hydra.sweeper.n_trials=2",
                     "hydra.sweeper.n_jobs=1", "hydra.sweeper.constraints.sparsity.min=0.1",
                     "hydra.sweeper.params.flat_width.low=0.005", "hydra.sweeper.params.flat_width.high=0.02",
                     "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, lower: 1.01}",
                     f"hydra.sweep.dir={sweep_dir}", timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _load(sweep_dir, "constrained")
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for t in trials:
        run_dir = sweep_dir / str(t.number)
        first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        assert t.intermediate_values == {1: first["test_acc1"]}  # reported per epoch, from the run
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["pruned"] is True and metrics["epoch"] == 1 and metrics["epochs_planned"] == 3
        assert (run_dir / "checkpoints" / "last.pt").is_file()
    report = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(sweep_dir)],
                            capture_output=True, text=True, timeout=HANG_S)
    assert report.returncode == 0, report.stderr
    assert "2 pruned" in (sweep_dir / "report.md").read_text()


@pytest.mark.slow
def test_checking_a_searchs_settings_with_cfg_and_m_is_one_line():
    proc = run_train("-m", "hparams_search=frontier", "--cfg", "hydra", timeout=HANG_S)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: --cfg/--info print a config and do not run")


def test_a_run_reads_the_studys_trial_spec_as_data_and_refuses_a_told_trial(tmp_path):
    """The spec a study file holds names only known metrics and allowlisted pruners; a run whose
    trial is already told stops in one line instead of training it twice."""
    from omegaconf import OmegaConf

    from stds.run.life.study_link import SPEC_ATTR, TrialSpec, open_link

    with pytest.raises(StdsError, match=r"names \['os.system'\]"):
        TrialSpec.from_attr({"objectives": ["os.system"]})
    with pytest.raises(ConfigError, match=r"pruner._target_=builtins.eval is not a pruner"):
        TrialSpec.from_attr({"objectives": ["test_acc1"], "pruner": {"_target_": "builtins.eval"}})
    sweep_dir = tmp_path / "sweep"
    Search(_settings(1), sweep_dir, [], lambda o, i: (_finish(sweep_dir, 0, 0.9), [None])[1]).run()
    assert _study(sweep_dir).user_attrs[SPEC_ATTR]["objectives"] == ["test_acc1", "sparsity"]
    node = OmegaConf.create({"storage": f"sqlite:///{sweep_dir / 'study.db'}", "study": "s", "number": 0})
    with pytest.raises(StdsError, match=r"trial 0 of the study 's' is complete already; nothing to train"):
        open_link(node, sweep_dir / "0")
    assert open_link(OmegaConf.create({"number": None}), sweep_dir / "0") is None


@pytest.mark.slow
def test_the_per_sparsity_preset_ends_each_trial_at_s_and_basic_runs_them_one_at_a_time(tmp_path):
    """``hparams_search=at_sparsity``: every trial ends at exactly S (scheduler=target), the study
    is single-objective with the preset's median pruner; Hydra's basic launcher (trials inside the
    search's process) gets one trial at a time whatever ``n_jobs`` says."""
    sweep_dir = tmp_path / "s0.8"
    proc = run_train("-m", *SEARCH[2:], "hparams_search=at_sparsity", "target_sparsity=0.8", "epochs=2",
                     "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={sweep_dir}",
                     timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runs trials in this process: one at a time" in proc.stderr + proc.stdout
    study = optuna.load_study(study_name="at_sparsity", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert len(study.trials) == 3
    spans = []
    for t in study.trials:
        metrics = json.loads((sweep_dir / str(t.number) / "metrics.json").read_text())
        assert metrics["sparsity"] == pytest.approx(0.8, abs=1 / 58_144 + 1e-9)  # S, to one weight
        assert t.state == TrialState.COMPLETE and t.values == [metrics["test_acc1"]]
        assert 1e-4 <= t.params["lr"] <= 1e-2
        spans.append((t.datetime_start, t.datetime_complete))
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))  # never two at once
