"""One run through two ``torchrun`` "nodes" on this machine (``--nnodes 2``, one process each, a c10d
rendezvous on loopback): one run directory, and the run of one ``torchrun`` with two processes,
bit for bit (``deterministic=true``, the same global batch)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import HANG_S, REPO, TRAIN, last_weights, run_history, run_metrics

pytestmark = pytest.mark.slow

RUN = ("dataset=digits", "epochs=2", "batch_size=16", "flat_width=0.05", "device=cpu", "logging.synops=false",
       "logging.log_every_steps=10")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(cwd: Path, *launcher_args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher_args, str(TRAIN), *RUN],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> None:
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=HANG_S)
            assert proc.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def _only_run(root: Path) -> Path:
    runs = [p for p in root.glob("outputs/runs/*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_two_torchrun_nodes_make_one_run_equal_to_one_node_with_two_processes(tmp_path):
    two, one = tmp_path / "two_nodes", tmp_path / "one_node"
    two.mkdir()
    one.mkdir()
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [_torchrun(two, "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint={endpoint}", "--rdzv-id=stds-two-nodes", "--max-restarts=0")
             for rank in (0, 1)]
    _finish(nodes)
    _finish([_torchrun(one, "--nproc-per-node=2", f"--master-port={_free_port()}")])

    got, want = _only_run(two), _only_run(one)
    lines = run_history(got)
    assert [line["epoch"] for line in lines] == [1, 2]
    assert all(line["ranks_in_sync"] is True for line in lines)
    assert run_metrics(got)["world_size"] == 2
    theirs = run_history(want)
    for mine, other in zip(lines, theirs, strict=True):
        for key in ("step", "d", "sparsity", "train_loss", "test_loss", "test_acc1"):
            assert mine[key] == other[key], (key, mine["epoch"])
    got_w, want_w = last_weights(got), last_weights(want)
    assert all(torch.equal(got_w[name], tensor) for name, tensor in want_w.items())
    assert lines[-1]["test_acc1"] > 0.5
