"""``hydra/launcher=local``: CPUs shared out among parallel sweep points (`stds.cli.launcher`), the
thread count applied in each process (`stds.run.setup.distributed`), and a failed point reported as failed."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from unittest import mock

import pytest
import submitit
import torch
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher
from omegaconf import OmegaConf

from tests.conftest import HANG_S, REPO, compose_train, run_train
from stds.run.setup import distributed
from stds.cli import launcher
from stds.errors import ConfigError
from stds.cli.launcher import CpuShare, LocalSweepLauncher, share_cpus


@pytest.mark.parametrize(
    "points, cpus, cpus_per_task, max_parallel, tasks, expected",
    [
        (4, 2, None, None, 1, CpuShare(parallel=2, threads=1)),   # the dev box: 2 at a time
        (6, 16, None, None, 1, CpuShare(parallel=6, threads=2)),  # 16 // 6 = 2 threads each
        (2, 16, None, None, 1, CpuShare(parallel=2, threads=8)),  # few points: more threads each
        (40, 16, None, None, 1, CpuShare(parallel=16, threads=1)),
        (40, 16, 4, None, 1, CpuShare(parallel=4, threads=4)),    # 16 // 4 jobs of 4 CPUs
        (40, 16, None, 3, 1, CpuShare(parallel=3, threads=5)),    # capped: 16 // 3 = 5
        (4, 16, None, None, 2, CpuShare(parallel=4, threads=2)),  # 2 DDP tasks share a job's 4
        (1, 1, 8, None, 1, CpuShare(parallel=1, threads=8)),      # asked for: more than there is
    ],
)
def test_share_cpus(points, cpus, cpus_per_task, max_parallel, tasks, expected):
    assert share_cpus(points, cpus, cpus_per_task, max_parallel, tasks) == expected


def test_share_cpus_rejects_zero():
    with pytest.raises(ConfigError, match="hydra.launcher.max_parallel=0"):
        share_cpus(4, 2, max_parallel=0)


@pytest.fixture
def torch_threads():
    """Restore torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "env, expected",
    [({"OMP_NUM_THREADS": "1"}, 1), ({"SLURM_CPUS_PER_TASK": "1"}, 1),
     ({"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "8"}, 1), ({"OMP_NUM_THREADS": "x"}, None), ({}, None)],
)
def test_setup_applies_the_allotted_threads(monkeypatch, torch_threads, env, expected):
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "WORLD_SIZE", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    torch.set_num_threads(2)
    assert distributed.allotted_cpu_threads() == expected
    distributed.setup("cpu")
    assert torch.get_num_threads() == (2 if expected is None else expected)


class FakeJob:
    """A job that is done after ``polls`` calls of done(); records how many ran at once."""

    def __init__(self, args: tuple, polls: int, board: dict) -> None:
        self.overrides, self.idx = args[0], args[2]
        self.polls, self.board = polls, board

    def done(self) -> bool:
        self.polls -= 1
        if self.polls == 0:
            self.board["running"] -= 1
        return self.polls <= 0

    def results(self) -> list[JobReturn]:
        status = JobStatus.FAILED if "flat_width=-1" in self.overrides else JobStatus.COMPLETED
        return [JobReturn(overrides=self.overrides, status=status, _return_value=ConfigError("bad"))]

    def cancel(self, check: bool = True) -> None:
        pass


def test_launcher_runs_at_most_parallel_points_with_their_threads(tmp_path, monkeypatch, caplog):
    cfg = compose_train(f"hydra.sweep.dir={tmp_path}", "hydra.job.name=train",
                        "hydra/launcher=local", hydra=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_") == "hydra_plugins.stds_local_launcher.LocalSweepLauncher"
    sweep_launcher = LocalSweepLauncher(**{**params, "poll_s": 0.0})
    sweep_launcher.setup(hydra_context=mock.Mock(), task_function=mock.Mock(), config=cfg)
    monkeypatch.setattr(launcher, "available_cpus", lambda: 2)
    board = {"running": 0, "most": 0, "submitted": []}

    def submit(runner, *args):
        board["running"] += 1
        board["most"] = max(board["most"], board["running"])
        board["submitted"].append((type(runner), args[2]))
        return FakeJob(args, polls=1 + args[2] % 3, board=board)

    points = [["flat_width=0.1"], ["flat_width=-1"], ["flat_width=0.3"], ["flat_width=0.5"], ["flat_width=1"]]
    with mock.patch.object(submitit, "AutoExecutor") as auto, caplog.at_level(logging.INFO):
        auto.return_value.submit.side_effect = submit
        returns = sweep_launcher.launch(points, initial_job_idx=0)
    assert auto.call_args.kwargs == {"cluster": "local", "folder": f"{tmp_path}/.submitit/%j"}
    given = auto.return_value.update_parameters.call_args.kwargs
    assert given["local_setup"] == ["export OMP_NUM_THREADS=1"]  # 2 CPUs, 2 points at a time
    assert "local_max_parallel" not in given and given["timeout_min"] == 1440
    assert board["most"] == 2
    # the jobs run the plugin's own launcher (importable in any job), in sweep order
    assert board["submitted"] == [(launcher.JobRunner, i) for i in range(5)]
    assert issubclass(launcher.JobRunner, LocalLauncher)
    assert [r.overrides for r in returns] == points
    log = caplog.text
    assert "5 points, 2 at a time with 1 CPU thread(s) each (2 CPUs)" in log
    assert "Local sweep: 0 finished, 0 failed, 2 running, 3 waiting, of 5" in log
    assert "Local sweep: 4 finished, 1 failed, 0 running, 0 waiting, of 5" in log


@pytest.mark.slow
def test_sweep_with_a_failed_point_end_to_end(tmp_path):
    """The failed point's run dir shows as failed with its one line; the other one finishes."""
    sweep = tmp_path / "sweep"
    proc = run_train("-m", "flat_width=0.1,-1", "epochs=1", "batch_size=64", "logging.synops=false",
                     "hydra/launcher=local", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0  # Hydra names the failed point
    assert "flat_width=-1.0 must be >= 0" in proc.stderr
    assert "Local sweep: 1 finished, 1 failed, 0 running, 0 waiting, of 2" in proc.stdout
    report = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(sweep)],
                            capture_output=True, text=True, timeout=HANG_S)
    assert report.returncode == 0, report.stderr
    with (sweep / "report.csv").open() as handle:
        rows = {r["run"]: r for r in csv.DictReader(handle)}
    assert rows["0"]["status"] == "finished" and rows["0"]["flat_width"] == "0.1"
    assert rows["1"]["status"] == "failed"
    # no clutter: no empty .submitit/%j, no lock file in the finished point
    assert not (sweep / ".submitit" / "%j").exists() and list((sweep / ".submitit").iterdir())
    assert not (sweep / "0" / ".lock").exists() and (sweep / "0" / "metrics.json").exists()
    assert rows["1"]["error"] == ("ConfigError: flat_width=-1.0 must be >= 0; "
                                  "set flat_width=<value> with value >= 0")
    # the failed point's log ends with why it failed, not with submitit's "Job completed successfully"
    last = (sweep / "1" / "train.log").read_text().splitlines()[-1]
    assert "this sweep point failed: ConfigError: flat_width=-1.0 must be >= 0" in last
    assert "Job completed successfully" not in (sweep / "1" / "train.log").read_text()
    (sweep / "1" / "error.txt").unlink()  # without error.txt the report reads the job's stderr
    report = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(sweep)],
                            capture_output=True, text=True, timeout=HANG_S)
    with (sweep / "report.csv").open() as handle:
        rows = {r["run"]: r for r in csv.DictReader(handle)}
    assert rows["1"]["status"] == "failed" and rows["1"]["error"].startswith("ConfigError: flat_width=-1.0")


def test_sweep_progress_lines_show_each_running_points_step_eta_and_last_epoch(tmp_path, caplog):
    cfg = compose_train(f"hydra.sweep.dir={tmp_path}", "hydra.job.name=train", "hydra/launcher=local", hydra=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    sweep_launcher = LocalSweepLauncher(**{**params, "poll_s": 0.0, "progress_every_s": 0.0})
    sweep_launcher.setup(hydra_context=mock.Mock(), task_function=mock.Mock(), config=cfg)
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "train.log").write_text(  # the loop's lines, as in a point's train.log
        "[2026-01-01 10:00:00,000][stds.run.life.loop][INFO] - epoch 1/2 step 11/44 loss 1.2 lr 0.002 d 0.01 | "
        "880 img/s 72.7 ms/step data 1% | ETA epoch 0:00:01 run 0:00:05\n"
        "[2026-01-01 10:00:01,000][stds.run.life.loop][INFO] - epoch 1/2: test_acc1 0.9000 test_acc5 1.0000 "
        "sparsity 0.4000 d 0.02 | 880 img/s, epoch 1.9 s (eval 0.2 s)\n"
        "[2026-01-01 10:00:02,000][stds.run.life.loop][INFO] - epoch 2/2 step 33/44 loss 0.6 lr 0.002 d 0.04 | "
        "900 img/s 71.1 ms/step data 1% | ETA epoch 0:00:01 run 0:00:01\n")
    board = {"running": 0, "most": 0, "submitted": []}
    with mock.patch.object(submitit, "AutoExecutor") as auto, caplog.at_level(logging.INFO):
        auto.return_value.submit.side_effect = lambda runner, *args: FakeJob(args, polls=3, board=board)
        sweep_launcher.launch([["flat_width=0.1"], ["flat_width=0.3"]], initial_job_idx=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Local sweep: 0 finished")]
    # point 1 has written no step yet: only point 0 is shown
    assert lines and all(line.endswith(" s); #0 step 33/44 ETA 0:00:01, epoch 1/2 test_acc1 0.9000 "
                                       "sparsity 0.4000") for line in lines), lines
    assert launcher.point_progress(tmp_path / "1" / "train.log") is None


def test_a_sweep_that_started_is_tidied_however_it_ended(tmp_path):
    """Hydra skips on_multirun_end after a failed point; the sweep remembered at its start is
    tidied by run_hydra_main all the same: the empty pattern folder goes, job folders stay."""
    from stds.cli.callbacks import TidySweepDir, tidy_started_sweeps

    (tmp_path / ".submitit" / "%j").mkdir(parents=True)
    (tmp_path / ".submitit" / "123").mkdir()
    (tmp_path / ".submitit" / "123" / "123_0_log.err").write_text("x")
    TidySweepDir().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert tidy_started_sweeps() == [tmp_path / ".submitit" / "%j"]
    assert sorted(p.name for p in (tmp_path / ".submitit").iterdir()) == ["123"]
    assert tidy_started_sweeps() == []  # once
