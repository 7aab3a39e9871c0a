"""Sweeps through the SLURM launcher as real SLURM jobs on the local test cluster.

Start the cluster first (it installs its Debian packages when missing):

    bash tests/slurm/start_cluster.sh && source .slurm/env.sh

Every test runs ``python launch/train.py -m hydra/launcher=slurm_cpu ...`` as a user does, on the
embedded digits data with tiny settings, and reads the run directories it leaves.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import HANG_S, REPO, TRAIN, compose_train, run_history, run_metrics, run_train

START_HINT = "bash tests/slurm/start_cluster.sh && source .slurm/env.sh"


def _cluster_up() -> str | None:
    """None when `sinfo` reaches a controller, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo is not installed"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return "sinfo got no answer from slurmctld in 5 s"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return f"sinfo failed: {last[:200]}"
    if not re.search(r"^(idle|mix|alloc)", proc.stdout, re.M):
        return f"no usable node (sinfo: {proc.stdout.strip()!r})"
    return None


_why_not = _cluster_up()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(_why_not is not None, reason=f"no SLURM cluster ({_why_not}); start it: {START_HINT}"),
]

SWEEP = ("-m", "hydra/launcher=slurm_cpu", "dataset=digits", "batch_size=64", "logging.log_every_steps=5")
TIMEOUT = 240  # seconds for one multirun; a hang (e.g. a job stuck PENDING) fails instead of blocking


def _epochs_logged(run_dir: Path) -> list[int]:
    return [record["epoch"] for record in run_history(run_dir)]


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _job_dir(sweep_dir: Path, num: int) -> Path | None:
    """submitit's folder of sweep point ``num``: ``<array id>_<num>``, or ``<job id>`` for a single job."""
    dirs = [p for p in sweep_dir.glob(".submitit/*") if p.is_dir()]
    for pattern in (rf"\d+_{num}", r"\d+" if num == 0 else None):
        found = [p for p in dirs if pattern and re.fullmatch(pattern, p.name)]
        if found:
            return found[0]
    return None


def _job_log(sweep_dir: Path, num: int) -> str:
    """What the job of sweep point ``num`` printed, all tasks and requeues included."""
    folder = _job_dir(sweep_dir, num)
    assert folder is not None, f"no submitit folder for point {num} in {sweep_dir}/.submitit"
    return "".join(p.read_text() for p in sorted(folder.glob("*_log.*")))


def _trial_job_log(run_dir: Path) -> str:
    """What the SLURM job of a search's trial printed (each trial is a job of its own), found as
    the report finds it: by the job id in the run's ``.hydra/hydra.yaml``."""
    from stds.results.jobs import submitit_job_dir
    from stds.run.files.safe import read_yaml

    found = submitit_job_dir(run_dir, read_yaml(run_dir / ".hydra" / "hydra.yaml", run_dir))
    assert found is not None, f"no submitit folder for {run_dir}"
    return "".join(p.read_text() for p in sorted(found[0].glob("*_log.*")))


def test_sweep_runs_one_job_per_point(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_train(*SWEEP, "epochs=1", "flat_width=0.05,0.6", f"hydra.sweep.dir={sweep_dir}", timeout=TIMEOUT)
    _ok(proc)

    assert sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".")) == [
        "0", "1", "multirun.yaml"]
    widths = []
    for num in (0, 1):
        metrics = run_metrics(sweep_dir / str(num))
        assert metrics["epoch"] == 1 and metrics["world_size"] == 1
        assert 0.0 <= metrics["test_acc1"] <= 1.0
        widths.append(metrics["d"])  # the sine schedule ends at D
        # each point ran as its own SLURM job (one array task per point)
        assert "Job completed successfully" in _job_log(sweep_dir, num)
    assert widths == pytest.approx([0.05, 0.6])
    assert _job_dir(sweep_dir, 0).name.split("_")[0] == _job_dir(sweep_dir, 1).name.split("_")[0]  # one array


def test_two_tasks_train_with_ddp(tmp_path):
    sweep_dir = tmp_path / "ddp"
    proc = run_train(*SWEEP, "epochs=1", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
                     f"hydra.sweep.dir={sweep_dir}", timeout=TIMEOUT)
    _ok(proc)

    metrics = run_metrics(sweep_dir / "0")
    assert metrics["world_size"] == 2
    assert metrics["ranks_in_sync"] is True
    # each rank sees half the training set: (n // 2) // batch steps per epoch, not n // batch
    from hydra.utils import instantiate

    n_train = len(instantiate(compose_train("dataset=digits").dataset).train)
    assert metrics["step"] == (n_train // 2) // 64
    assert metrics["step"] != n_train // 64
    # both tasks ran, on ranks 0 and 1 of the same job
    log = _job_log(sweep_dir, 0)
    assert "global_rank=0(2)" in log and "global_rank=1(2)" in log


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the multirun ended (exit {proc.returncode}) before {what}\n{out[-2000:]}\n{err[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _popen_train(*args: str) -> subprocess.Popen:
    import os

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_preempted_job_is_requeued_and_resumes_in_the_same_run_dir(tmp_path):
    run = ("epochs=4", "flat_width=0.05")
    # the reference runs uninterrupted beside it (one CPU each on the 2-CPU node)
    reference = _popen_train(*SWEEP, *run, f"hydra.sweep.dir={tmp_path / 'reference'}")
    # a `${now:...}` name: the requeued job must re-create exactly this directory name
    root = tmp_path / "requeue"
    proc = _popen_train(*SWEEP, *run, f"hydra.sweep.dir={root}/${{now:%H-%M-%S-%f}}")
    try:
        run_dir = _wait_for(lambda: next(iter(root.glob("*/0")), None), 60, "the run directory", proc)
        sweep_dir = run_dir.parent
        _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and _epochs_logged(run_dir)
                  and (run_dir / "checkpoints" / "last.pt").is_file(), 120, "the first epoch", proc)
        job_id = _job_dir(sweep_dir, 0).name  # the job id SLURM knows this point by
        # what SLURM sends before a time limit or on preemption
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=HANG_S)

        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, f"{out[-2000:]}\n{err[-5000:]}"
        ref_out, ref_err = reference.communicate(timeout=TIMEOUT)
        assert reference.returncode == 0, ref_err[-5000:]
    finally:
        for p in (proc, reference):
            if p.poll() is None:
                p.kill()

    # interrupted, requeued by submitit, and SLURM ran it twice
    log = _job_log(sweep_dir, 0)
    assert "Caught signal SIGUSR2" in log
    assert "Requeued job" in log
    assert log.count("Starting with JobEnvironment") == 2
    def job_states():  # accounting lags the job by a few seconds
        states = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State"],
                                capture_output=True, text=True, timeout=HANG_S).stdout.split()
        return states if states[-1:] == ["COMPLETED"] else None

    assert _wait_for(job_states, 30, "accounting of the finished job") == ["REQUEUED", "COMPLETED"]

    # the second run found the first one's directory and checkpoint
    assert [p.name for p in root.iterdir()] == [sweep_dir.name]
    resumed = re.search(r"resumed from (\S+) in epoch (\d+)/4", log)
    assert resumed, log[-3000:]
    assert Path(resumed.group(1)) == run_dir / "checkpoints" / "last.pt"
    assert 2 <= int(resumed.group(2)) <= 4  # the epoch in progress: after at least one finished
    assert _epochs_logged(run_dir) == [1, 2, 3, 4]
    assert not (run_dir / "error.txt").exists()

    # ... and ended where the uninterrupted run did
    got, want = run_metrics(run_dir), run_metrics(tmp_path / "reference" / "0")
    for key in ("epoch", "step", "test_acc1", "sparsity"):
        assert got[key] == want[key], key
    assert want["epoch"] == 4 and want["test_acc1"] > 0.5  # a run that learned, not a degenerate one


def test_failed_point_does_not_lose_the_others(tmp_path):
    sweep_dir = tmp_path / "partial"
    empty = tmp_path / "no-cifar"
    empty.mkdir()
    # point 0 (digits ignores dataset.root) trains; point 1 finds no CIFAR-10 files in the folder
    proc = run_train(*SWEEP, "epochs=1", "dataset=digits,cifar10", f"dataset.root={empty}",
                     f"hydra.sweep.dir={sweep_dir}", timeout=TIMEOUT)

    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "Error executing job with overrides" in output
    assert "dataset=cifar10" in output and "CIFAR-10 not found" in output

    good, bad = sweep_dir / "0", sweep_dir / "1"
    assert run_metrics(good)["epoch"] == 1
    assert not (good / "error.txt").exists()
    assert not (bad / "metrics.json").exists()
    error = (bad / "error.txt").read_text()
    assert "CIFAR-10 not found" in error and str(empty) in error


def test_search_runs_its_trials_as_slurm_jobs_with_the_study_in_a_server_database(tmp_path):
    """``hparams_search=frontier`` through the SLURM launcher, the study in the cluster's MariaDB
    (given by URL, as machines sharing a study would give it), each trial a SLURM job."""
    import os
    import uuid

    import optuna

    storage = os.environ.get("STDS_TEST_SEARCH_STORAGE")
    if not storage:
        pytest.skip(f"STDS_TEST_SEARCH_STORAGE is not set; {START_HINT}")
    name = f"slurm-{uuid.uuid4().hex[:8]}"
    sweep_dir = tmp_path / "search"
    proc = run_train("-m", "hparams_search=frontier", *SWEEP[1:], "epochs=1", "hydra.sweeper.n_trials=2",
                     "hydra.sweeper.n_jobs=2", "hydra.sweeper.params.flat_width.low=0.005",
                     "hydra.sweeper.params.flat_width.high=0.1", f"hydra.sweeper.storage='{storage}'",
                     f"hydra.sweeper.study_name={name}", f"hydra.sweep.dir={sweep_dir}", timeout=TIMEOUT)
    _ok(proc)
    try:
        trials = optuna.load_study(study_name=name, storage=storage).trials
    finally:
        optuna.delete_study(study_name=name, storage=storage)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in trials:
        metrics = run_metrics(sweep_dir / str(t.number))  # each trial a normal run directory
        assert t.values == [metrics["test_acc1"], metrics["sparsity"]]
        assert metrics["d"] == pytest.approx(t.params["flat_width"])
        assert "Job completed successfully" in _trial_job_log(sweep_dir / str(t.number))  # ran as a SLURM job
    assert not (sweep_dir / "study.db").exists()  # the study is in the server, not the sweep dir
    assert "stds:***@localhost" in proc.stderr + proc.stdout and ":stds@" not in proc.stderr + proc.stdout


def test_a_requeued_trial_resumes_in_its_run_dir_and_reports_once(tmp_path):
    """A trial's job preempted (USR2): SLURM requeues it, it resumes in ``<sweep dir>/0``, and the
    study gets one result, the resumed run's."""
    import optuna

    sweep_dir = tmp_path / "search"
    proc = _popen_train("-m", "hparams_search=frontier", *SWEEP[1:], "epochs=3", "hydra.sweeper.n_trials=1",
                        "hydra.sweeper.n_jobs=1", "hydra.sweeper.params.flat_width.low=0.01",
                        "hydra.sweeper.params.flat_width.high=0.02", f"hydra.sweep.dir={sweep_dir}")
    run_dir = sweep_dir / "0"
    try:
        _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and _epochs_logged(run_dir)
                  and (run_dir / "checkpoints" / "last.pt").is_file(), 150, "the trial's first epoch", proc)
        subprocess.run(["scancel", "--signal=USR2", _job_dir(sweep_dir, 0).name], check=True, timeout=HANG_S)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, f"{out[-2000:]}\n{err[-5000:]}"
    finally:
        if proc.poll() is None:
            proc.kill()

    log = _job_log(sweep_dir, 0)
    assert "Requeued job" in log and log.count("Starting with JobEnvironment") == 2
    assert re.search(r"resumed from \S+ in epoch [23]/3, step", log), log[-3000:]
    assert _epochs_logged(run_dir) == [1, 2, 3]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0"]
    (trial,) = optuna.load_study(study_name="frontier", storage=f"sqlite:///{sweep_dir / 'study.db'}").trials
    metrics = run_metrics(run_dir)
    assert trial.state == optuna.trial.TrialState.COMPLETE and metrics["epoch"] == 3
    assert trial.values == [metrics["test_acc1"], metrics["sparsity"]]


def test_a_search_killed_while_its_trials_run_as_slurm_jobs_loses_nothing_when_run_again(tmp_path):
    """SIGKILL the search once a trial's job trains; the jobs go on; the same command at once fails
    none of them, waits for them, and every trial ends told with the values of its metrics.json."""
    import signal

    import optuna

    from stds.run.files.rundir import lock_is_held

    sweep_dir = tmp_path / "search"
    args = ("-m", "hparams_search=frontier", *SWEEP[1:], "epochs=4", "hydra.sweeper.n_trials=3",
            "hydra.sweeper.n_jobs=2", "hydra.sweeper.params.flat_width.low=0.005",
            "hydra.sweeper.params.flat_width.high=0.02", f"hydra.sweep.dir={sweep_dir}")
    proc = _popen_train(*args)
    try:
        _wait_for(lambda: any(lock_is_held(p) for p in sweep_dir.glob("[0-9]*")), 150, "a trial training", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=HANG_S)
    assert any(lock_is_held(p) for p in sweep_dir.glob("[0-9]*")), "the trials' jobs died with the search"

    _ok(run_train(*args, timeout=TIMEOUT))
    trials = optuna.load_study(study_name="frontier", storage=f"sqlite:///{sweep_dir / 'study.db'}").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for t in trials:
        metrics = run_metrics(sweep_dir / str(t.number))
        assert t.values == [metrics["test_acc1"], metrics["sparsity"]] and metrics["epoch"] == 4
        assert _epochs_logged(sweep_dir / str(t.number)) == [1, 2, 3, 4]  # trained once, not again


def test_a_trial_whose_job_waits_in_the_queue_is_never_failed(tmp_path):
    """The trial's job is submitted held (it pends), the search is SIGKILLed and stays gone past
    grace_s; the same command asks SLURM, finds the job PENDING and keeps the trial running.
    Released, the job trains, and the study holds that one trial, told once with its values."""
    import signal

    import optuna

    sweep_dir = tmp_path / "search"
    args = ("-m", "hparams_search=frontier", *SWEEP[1:], "epochs=1", "hydra.sweeper.n_trials=1",
            "hydra.sweeper.n_jobs=1", "hydra.sweeper.heartbeat_s=1", "hydra.sweeper.grace_s=3",
            "hydra.sweeper.params.flat_width.low=0.01", "hydra.sweeper.params.flat_width.high=0.02",
            "+hydra.launcher.additional_parameters.hold=true", f"hydra.sweep.dir={sweep_dir}")
    # read-only: a poll that opened the database for writing could create its tables while the
    # search creates them (SQLite has no "create if missing" for a whole schema)
    storage = f"sqlite:///file:{sweep_dir / 'study.db'}?mode=ro&uri=true"

    def trials():
        try:
            return optuna.load_study(study_name="frontier", storage=storage).trials
        except Exception:  # not created yet
            return []

    def queue_state(job: str) -> str:
        return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                              timeout=HANG_S).stdout.strip()

    proc = _popen_train(*args)
    job = rerun = None
    try:
        job = _wait_for(lambda: (trials() or [None])[0] and trials()[0].user_attrs.get("slurm_job_id"), 150,
                        "the trial's job id in the study", proc)
        assert queue_state(job) == "PENDING"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=HANG_S)
        time.sleep(5)  # nothing watches the trial for longer than grace_s
        with open(tmp_path / "rerun.log", "w") as out:
            rerun = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=REPO, stdout=out,
                                     stderr=subprocess.STDOUT, text=True)
        said = f"Trial 0: its SLURM job {job} is pending; the trial stays running"
        _wait_for(lambda: said in (tmp_path / "rerun.log").read_text(), 150, "the rerun finding the job", rerun)
        time.sleep(4)  # the rerun's own stale checks pass grace_s too
        assert [(t.state, t.number) for t in trials()] == [(optuna.trial.TrialState.RUNNING, 0)]
        subprocess.run(["scontrol", "release", job], check=True, timeout=HANG_S)
        assert rerun.wait(TIMEOUT) == 0, (tmp_path / "rerun.log").read_text()[-5000:]
    finally:
        for p in (proc, rerun):
            if p is not None and p.poll() is None:
                p.kill()
        if job is not None and queue_state(job):  # never leave a held job in the shared cluster
            subprocess.run(["scancel", job], timeout=HANG_S)

    (trial,) = trials()
    metrics = run_metrics(sweep_dir / "0")
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["slurm_job_id"] == job
    assert trial.values == [metrics["test_acc1"], metrics["sparsity"]] and metrics["epoch"] == 1
    assert (sweep_dir / "0" / "train.log").read_text().count("trial 0 told to the study") == 1
    assert "Job completed successfully" in _trial_job_log(sweep_dir / "0")
