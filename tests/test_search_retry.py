"""A search's trials that outlive their processes: a retried trial continues the failed one's run
(`stds.run.files.rundir.continue_from`, `Search._continue`), and a trial whose SLURM job still
waits or runs is never failed (`stds.cli.study.queue`).

The fast tests drive `Search` with stand-in launchers on a real SQLite study and a stand-in
``squeue`` on PATH; the slow one kills a real trial's process mid-run and runs the search again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from stds.cli.study.driver import Search
from stds.cli.study.queue import JOB_ATTR, TAG_ATTR, QueueUnreadable, job_tag, live_job, queued_jobs
from stds.run.files.rundir import continue_from, lock_is_held
from stds.run.life.resume import changed_keys
from tests.conftest import HANG_S, REPO, run_history, run_metrics, run_train
from tests.test_search_life import SEARCH, _finish, _number, _settings, _study

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = {"flat_width": FloatDistribution(0.1, 5.0, log=True)}


def _fake_squeue(tmp_path: Path, monkeypatch, lines: str = "", rc: int = 0) -> Path:
    """A ``squeue`` on PATH that prints the file it returns (edit it to change the queue)."""
    queue, bin_dir = tmp_path / "queue.txt", tmp_path / "bin"
    queue.write_text(lines)
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\ncat '{queue}'\n" + (f"echo 'slurm_load_jobs error: no controller' >&2\nexit {rc}\n"
                                                       if rc else ""))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return queue


def _orphan(where: Path, heartbeat_s: int = 1, **attrs) -> int:
    """A running trial of the sweep directory ``where`` (unless ``sweep_dir=`` says another one),
    asked by a search that is gone; its number."""
    study = _study(where)
    trial = study.ask(SPACE)
    for key, value in {"sweep_dir": str(where.resolve()), "heartbeat_s": heartbeat_s, **attrs}.items():
        trial.set_user_attr(key, value)
    study._storage.record_heartbeat(trial._trial_id)
    return trial.number


def _new_study(sweep_dir: Path, **kw) -> None:
    Search(_settings(0, **kw), sweep_dir, [], lambda o, i: pytest.fail("nothing to launch")).run()


def _run_dir_with_state(run_dir: Path, epochs: int) -> None:
    """What a run killed after ``epochs`` epochs leaves (stand-in bytes for the checkpoints)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"last of epoch %d" % epochs)
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"best")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, epochs + 1)))
    (run_dir / "tb").mkdir()
    (run_dir / "tb" / "events.out.tfevents.1").write_bytes(b"events")
    (run_dir / "train.log").write_text("the killed run's log\n")


def test_continue_from_copies_the_state_to_resume_and_refuses_a_planted_link(tmp_path):
    source, target = tmp_path / "3", tmp_path / "5"
    _run_dir_with_state(source, 2)
    assert continue_from(source, target) == target / "checkpoints" / "last.pt"
    copied = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert copied == ["checkpoints/best.pt", "checkpoints/last.pt", "metrics.jsonl", "tb/events.out.tfevents.1"]
    assert (target / "checkpoints" / "last.pt").read_bytes() == b"last of epoch 2"
    assert (target / "metrics.jsonl").read_text() == (source / "metrics.jsonl").read_text()
    assert continue_from(tmp_path / "nothing", tmp_path / "6") is None and not (tmp_path / "6").exists()

    secret = tmp_path / "secret.txt"
    secret.write_text("not a run's")
    (source / "metrics.jsonl").unlink()
    (source / "metrics.jsonl").symlink_to(secret)
    with pytest.raises(OSError, match="is a symlink"):
        continue_from(source, tmp_path / "7")
    assert not (tmp_path / "7" / "checkpoints" / "last.pt").exists()  # last.pt comes last: no resume


def test_a_search_trials_study_link_may_change_when_it_resumes():
    """A retry resumes the failed trial's checkpoint as another trial number; a pruned trial
    trains on with ``trial.number=null``: neither changes the experiment."""
    saved = {"flat_width": 0.1, "trial": {"storage": None, "study": "s", "number": 1}}
    assert changed_keys(saved, {"flat_width": 0.1, "trial": {"storage": None, "study": "s", "number": 4}}) == []
    assert changed_keys(saved, {"flat_width": 0.2, "trial": {"number": None}}) == [("flat_width", 0.1, 0.2)]


def test_a_retry_continues_the_run_of_the_trial_it_retries(tmp_path, monkeypatch):
    """Trial 0 died after 2 epochs (its heartbeat stopped); trial 1 of a copied study names this
    sweep directory nowhere. The rerun's retry of 0 starts from 0's files; the retry of 1 from nothing."""
    sweep_dir, single = tmp_path / "sweep", {"objectives": {"test_acc1": "maximize"}}
    _fake_squeue(tmp_path, monkeypatch)  # a SLURM search whose jobs are gone from the queue
    _new_study(sweep_dir, **single)
    dead = _orphan(sweep_dir, slurm_tag=job_tag(sweep_dir, 0), slurm_job_id="99")
    study = _study(sweep_dir)
    for epoch, acc in ((1, 0.4), (2, 0.5)):  # what it reported to the pruner before it died
        study._storage.set_trial_intermediate_value(study.trials[dead]._trial_id, epoch, acc)
    foreign = _orphan(sweep_dir, sweep_dir="/elsewhere")
    _run_dir_with_state(sweep_dir / str(dead), 2)
    _run_dir_with_state(sweep_dir / str(foreign), 3)  # not its run: never read
    time.sleep(3)  # past grace_s: both processes died without a word
    seen = {}

    def launch(overrides, index):
        run_dir = sweep_dir / str(_number(overrides[0]))
        last = run_dir / "checkpoints" / "last.pt"
        seen[index] = last.read_bytes() if last.exists() else None
        seen[f"{index} log"] = (run_dir / "train.log").exists()
        _finish(sweep_dir, index, 0.6)
        return [None]

    Search(_settings(2, heartbeat_s=1, grace_s=2, **single), sweep_dir, [], launch, slurm_jobs=True).run()
    trials = _study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    retry_of = {t.number: optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(t) for t in trials[2:]}
    assert retry_of == {2: [0], 3: [1]}
    assert seen == {2: b"last of epoch 2", "2 log": False, 3: None, "3 log": False}
    assert run_history(sweep_dir / "2") == [{"epoch": 1}, {"epoch": 2}]
    assert trials[2].intermediate_values == {1: 0.4, 2: 0.5}  # the pruner sees the whole run
    assert trials[2].user_attrs[TAG_ATTR] == job_tag(sweep_dir, 2) and trials[2].user_attrs[JOB_ATTR] is None


def test_squeue_is_read_as_data_and_absent_means_no_slurm(tmp_path, monkeypatch):
    _fake_squeue(tmp_path, monkeypatch, "12|PENDING|mine stds-trial-3-abc\n12_4|RUNNING|(null)\n13|COMPLETING|x\n")
    jobs = queued_jobs()
    assert [(j.job_id, j.state) for j in jobs] == [("12", "PENDING"), ("12_4", "RUNNING"), ("13", "COMPLETING")]
    assert live_job(jobs, None, "stds-trial-3-abc").job_id == "12"
    assert live_job(jobs, None, "stds-trial-3") is None  # a word of the comment, not a part of one
    assert live_job(jobs, "12_4", None).state == "RUNNING" and live_job(jobs, "13", None) is None  # ended
    _fake_squeue(tmp_path, monkeypatch, "", rc=1)
    with pytest.raises(QueueUnreadable, match="squeue failed: slurm_load_jobs error: no controller"):
        queued_jobs()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert queued_jobs() is None


def test_while_squeue_does_not_answer_no_slurm_trial_is_failed(tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    _new_study(sweep_dir)
    tagged = _orphan(sweep_dir, slurm_tag=job_tag(sweep_dir, 0))
    _orphan(sweep_dir)  # a local trial: SLURM has nothing to say about it
    _fake_squeue(tmp_path, monkeypatch, "", rc=1)
    search = Search(_settings(2), sweep_dir, [], lambda o, i: pytest.fail("nothing to launch"), slurm_jobs=True)
    assert search._in_queue(_study(sweep_dir)) == {tagged: _study(sweep_dir).trials[tagged]._trial_id}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no SLURM here: nothing is kept by the queue
    assert search._in_queue(_study(sweep_dir)) == {}


@pytest.mark.slow
def test_a_trial_whose_slurm_job_waits_is_not_failed_and_is_told_when_it_ends(tmp_path, monkeypatch):
    """Trial 0's job waits in the queue (held) while no search runs, longer than grace_s. The
    rerun finds it by its tag, records its id, keeps it running while it waits; the job then
    runs and ends unheard, and the rerun tells it from its metrics.json: one trial, no retry."""
    sweep_dir = tmp_path / "sweep"
    _new_study(sweep_dir)
    tag = job_tag(sweep_dir, 0)
    queue = _fake_squeue(tmp_path, monkeypatch, f"4242|PENDING|{tag}\n")
    number = _orphan(sweep_dir, slurm_tag=tag)
    time.sleep(3)  # the search was gone past grace_s while the job waited

    def job_runs_later():
        study = _study(sweep_dir)
        deadline = time.monotonic() + HANG_S
        while study.trials[number].user_attrs.get(JOB_ATTR) != "4242":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(3)  # still waiting, past grace_s again, now with a search watching
        queue.write_text(f"4242|RUNNING|{tag}\n")
        _finish(sweep_dir, number, 0.8)
        queue.write_text("")  # it ended without telling (the run died after metrics.json)

    job = threading.Thread(target=job_runs_later)
    search = Search(_settings(1, heartbeat_s=1, grace_s=2), sweep_dir, [],
                    lambda o, i: pytest.fail("nothing new to launch"), slurm_jobs=True)
    search.poll_s = 0.2
    job.start()
    search.run()
    job.join()
    (trial,) = _study(sweep_dir).trials
    assert (trial.state, trial.values, trial.user_attrs[JOB_ATTR]) == (TrialState.COMPLETE, [0.8, 0.5], "4242")


def test_a_trials_run_records_its_slurm_job(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from stds.run.life.study_link import open_link

    sweep_dir = tmp_path / "sweep"
    _new_study(sweep_dir)
    number = _orphan(sweep_dir)
    monkeypatch.setenv("SLURM_JOB_ID", "80")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    node = OmegaConf.create({"storage": f"sqlite:///{sweep_dir / 'study.db'}", "study": "s", "number": number})
    with open_link(node, sweep_dir / str(number)):
        pass
    assert _study(sweep_dir).trials[number].user_attrs[JOB_ATTR] == "77_3"  # as squeue names an array task


# --------------------------------------------------------------------- a real run, killed and retried

STEPS_PER_EPOCH = 1437 // 64  # digits: 1,437 training images, batch_size=64, the last part batch dropped


def _logged_epochs(log: str, epochs: int) -> list[int]:
    return [int(n) for n in re.findall(rf"epoch (\d+)/{epochs}: test_acc1", log)]


@pytest.mark.slow
def test_a_killed_trial_is_retried_and_its_retry_resumes_at_the_saved_epoch(tmp_path):
    """SIGKILL the search and the trial's process after its first epoch; the same command after
    the grace period fails the trial (Optuna) and its retry continues the run from the killed
    run's last.pt: every epoch once, the step counter of an unbroken run, told once, and the
    values of an uninterrupted run with the same parameters."""
    sweep_dir, epochs = tmp_path / "search", 4
    args = (*SEARCH, "hparams_search=frontier", f"epochs={epochs}", "hydra.sweeper.n_trials=1",
            "hydra.sweeper.n_jobs=1", "hydra.sweeper.heartbeat_s=1", "hydra.sweeper.grace_s=3",
            "hydra.sweeper.params.flat_width.low=0.005", "hydra.sweeper.params.flat_width.high=0.02",
            f"hydra.sweep.dir={sweep_dir}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = sweep_dir / "0"
    try:
        deadline = time.monotonic() + HANG_S
        while not ((first / "metrics.jsonl").is_file() and run_history(first)):
            assert driver.poll() is None and time.monotonic() < deadline, "trial 0 trained no epoch"
            time.sleep(0.2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(HANG_S)
    holder = dict(line.split("=", 1) for line in (first / ".lock").read_text().splitlines() if "=" in line)
    os.kill(int(holder["pid"]), signal.SIGKILL)  # the trial's own process (it outlives the search)
    while lock_is_held(first):
        time.sleep(0.1)
    saved = torch.load(first / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    killed_at = saved["epoch"]
    assert 1 <= killed_at < epochs and saved["step"] == killed_at * STEPS_PER_EPOCH
    time.sleep(4)  # past grace_s: the trial's heartbeat is stale

    proc = run_train(*args, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed, retry = optuna.load_study(study_name="frontier", storage=f"sqlite:///{sweep_dir / 'study.db'}").trials
    assert (failed.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(retry) == [0]
    assert retry.params == failed.params
    run_dir = sweep_dir / "1"
    metrics = run_metrics(run_dir)
    assert retry.values == [metrics["test_acc1"], metrics["sparsity"]]
    assert (metrics["epoch"], metrics["step"]) == (epochs, epochs * STEPS_PER_EPOCH)
    history = run_history(run_dir)
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    assert [r["step"] for r in history] == [e * STEPS_PER_EPOCH for e in range(1, epochs + 1)]
    log = (run_dir / "train.log").read_text()
    where = f"epoch {killed_at + 1}/{epochs}, step {killed_at * STEPS_PER_EPOCH}"
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} in {where}" in log
    evaluated_first = killed_at if saved["pending_eval"] is not None else killed_at + 1  # killed before its evaluation
    assert _logged_epochs(log, epochs) == list(range(evaluated_first, epochs + 1))  # no epoch trained twice
    assert log.count("trial 1 told to the study") == 1

    reference = tmp_path / "reference"
    plain = run_train(*SEARCH[1:], f"epochs={epochs}", f"flat_width={failed.params['flat_width']!r}",
                      f"hydra.run.dir={reference}", timeout=HANG_S)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert [metrics[k] for k in ("test_acc1", "sparsity", "step")] == \
        [run_metrics(reference)[k] for k in ("test_acc1", "sparsity", "step")]


def test_each_trials_job_carries_its_tag_after_the_users_comment(tmp_path, monkeypatch):
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    from stds.cli.sweeper import OptunaSweeper

    seen = []
    monkeypatch.setattr(SlurmLauncher, "launch", lambda self, overrides, index: seen.append(self.params) or [None])
    sweeper = OptunaSweeper()
    sweeper.launcher = SlurmLauncher(comment="project-x", partition="gpu")
    launch = sweeper._tagged_launch(tmp_path)
    launch([["flat_width=0.1"]], 7)
    assert seen == [{"comment": f"project-x {job_tag(tmp_path, 7)}", "partition": "gpu"}]
    assert sweeper.launcher.params["comment"] == "project-x"  # each trial's own copy
