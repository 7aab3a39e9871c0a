"""Runs across two SLURM nodes on the local test cluster of two nodes:

    bash tests/slurm/start_cluster.sh .slurm2 --nodes 2 && source .slurm2/env.sh

DDP across the nodes through the SLURM launcher (gloo), equal to one node with the same ranks; a
requeued two-node job; the two-node benchmark. A rank or node lost: tests/test_slurm_node_loss.py.
Every run is the digits net for one to three epochs (seconds each on two cores).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import HANG_S, REPO, TRAIN, last_weights, run_history, run_metrics
from tests.test_slurm import _epochs_logged, _job_dir, _job_log, _ok, _wait_for


def _idle_nodes() -> list[str]:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=5,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted({line.split()[0] for line in out.splitlines() if re.search(r" (idle|mix|alloc)", line)})


NODES = _idle_nodes()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(len(NODES) < 2, reason=f"no SLURM cluster of two nodes (usable: {NODES}); start one: "
                       "bash tests/slurm/start_cluster.sh .slurm2 --nodes 2 && source .slurm2/env.sh"),
]

BATCH = 16  # per rank: 44 steps per epoch on two ranks, enough for a run that learns in two epochs
RUN = ("-m", "hydra/launcher=slurm_cpu", "dataset=digits", f"batch_size={BATCH}", "logging.log_every_steps=5",
       "flat_width=0.05", "logging.synops=false")
TWO_NODES = ("hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1")
ONE_NODE_TWO_TASKS = ("hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=2")
EPOCH_KEYS = ("epoch", "step", "d", "sparsity", "test_acc1", "test_loss", "train_loss")


def _popen_train(*args: str, **env: str) -> subprocess.Popen:
    """``python launch/train.py ARGS`` in the background, ``env`` added to the environment."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _assert_same_run(got: Path, want: Path) -> None:
    """Every epoch's numbers and the final weights (bit for bit) of two runs are equal."""
    got_lines, want_lines = run_history(got), run_history(want)
    assert [line["epoch"] for line in got_lines] == [line["epoch"] for line in want_lines]
    for mine, theirs in zip(got_lines, want_lines):
        for key in EPOCH_KEYS:
            if key in theirs:
                assert mine[key] == theirs[key], (key, mine["epoch"], mine[key], theirs[key])
    got_w, want_w = last_weights(got), last_weights(want)
    assert got_w.keys() == want_w.keys()
    for name, tensor in want_w.items():
        assert torch.equal(got_w[name], tensor), name


def _ranks_by_node(sweep_dir: Path) -> dict[int, int]:
    """global rank -> node index within the job, from submitit's 'Starting with JobEnvironment' lines."""
    found = re.findall(r"node=(\d+)\(\d+\), global_rank=(\d+)\(\d+\)", _job_log(sweep_dir, 0))
    return {int(rank): int(node) for node, rank in found}


def test_two_nodes_train_one_run_equal_to_one_node_with_two_tasks(tmp_path):
    two, one = tmp_path / "two_nodes", tmp_path / "one_node"
    both = [_popen_train(*RUN, "epochs=2", *TWO_NODES, f"hydra.sweep.dir={two}"),
            _popen_train(*RUN, "epochs=2", *ONE_NODE_TWO_TASKS, f"hydra.sweep.dir={one}")]
    for proc in both:
        _ok(_finish(proc))

    # ranks 0 and 1 ran on nodes 0 and 1 of the two-node job, on one node in the other
    assert _ranks_by_node(two) == {0: 0, 1: 1}
    assert _ranks_by_node(one) == {0: 0, 1: 0}
    # one run directory, written by rank 0 alone (no second train.log, no per-rank folders)
    assert sorted(p.name for p in two.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]
    assert (two / "0" / "train.log").read_text().count("run directory:") == 1
    lines = run_history(two / "0")
    assert [line["epoch"] for line in lines] == [1, 2]
    # every rank's weights and buffers (d included) equal rank 0's after every epoch
    assert all(line["ranks_in_sync"] is True for line in lines)
    assert run_metrics(two / "0")["world_size"] == 2
    # ... and with deterministic=true the run is the run of one node with two tasks, bit for bit
    _assert_same_run(two / "0", one / "0")
    assert lines[-1]["test_acc1"] > 0.5  # a run that learned


def test_four_ranks_on_two_nodes(tmp_path):
    sweep = tmp_path / "four"
    _ok(_finish(_popen_train(*RUN, "epochs=1", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=2",
                             f"hydra.sweep.dir={sweep}")))
    assert _ranks_by_node(sweep) == {0: 0, 1: 0, 2: 1, 3: 1}
    metrics = run_metrics(sweep / "0")
    assert metrics["world_size"] == 4 and metrics["ranks_in_sync"] is True
    from hydra.utils import instantiate

    from tests.conftest import compose_train

    n_train = len(instantiate(compose_train("dataset=digits").dataset).train)
    assert metrics["step"] == (n_train // 4) // BATCH  # each rank sees a quarter of the training set


def test_a_requeued_two_node_job_resumes_and_ends_as_an_uninterrupted_run(tmp_path):
    """USR2 (a time limit, a preemption) after epoch 1, then ``scontrol requeue`` after epoch 2: the
    two-node job resumes twice from checkpoints/last.pt and ends bit for bit as a run left alone."""
    run = (*RUN, "epochs=3", *TWO_NODES)
    reference = _popen_train(*run, f"hydra.sweep.dir={tmp_path / 'reference'}")
    sweep = tmp_path / "requeued"
    proc = _popen_train(*run, f"hydra.sweep.dir={sweep}")
    run_dir = sweep / "0"
    try:
        _wait_for(lambda: len(_epochs_logged_or_none(run_dir)) >= 1, 240, "the first epoch", proc)
        job_id = _job_dir(sweep, 0).name
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        _wait_for(lambda: len(_epochs_logged_or_none(run_dir)) >= 2
                  and _job_log(sweep, 0).count("Starting with JobEnvironment") >= 4, 240, "the second epoch", proc)
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    finally:
        done, want = _finish(proc), _finish(reference)
    _ok(want)
    _ok(done)

    log = _job_log(sweep, 0)
    assert "Caught signal SIGUSR2" in log and "Requeued job" in log
    # three starts of both tasks: the first, after USR2, after `scontrol requeue`
    assert re.findall(r"global_rank=(\d)\(2\)", log).count("0") == 3
    assert re.findall(r"global_rank=(\d)\(2\)", log).count("1") == 3
    resumed = re.findall(r"resumed from \S+last\.pt in epoch (\d)/3", (run_dir / "train.log").read_text())
    assert len(resumed) == 2 and 2 <= int(resumed[0]) <= int(resumed[1]) <= 3
    assert _epochs_logged(run_dir) == [1, 2, 3] and not (run_dir / "error.txt").exists()
    _assert_same_run(run_dir, tmp_path / "reference" / "0")


def _epochs_logged_or_none(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return _epochs_logged(run_dir) if path.is_file() and (run_dir / "checkpoints" / "last.pt").is_file() else []


def test_the_two_node_benchmark_runs_in_its_smoke_mode():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "slurm_nodes.py"), "--smoke"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=HANG_S, check=False)
    _ok(proc)
    ratio = re.search(r"ratio two nodes / one node \(wall\): (\d+\.\d+)", proc.stdout)
    delays = re.search(r"USR2 to the first resumed step: (\d+\.\d) s; scontrol requeue to it: (\d+\.\d) s",
                       proc.stdout)
    assert ratio and delays, proc.stdout
    assert float(ratio.group(1)) > 0 and all(float(value) > 0 for value in delays.groups())
    assert "load average" in proc.stdout
