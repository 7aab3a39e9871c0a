"""A rank or node lost in a two-node job on the local test cluster of two nodes:

    bash tests/slurm/start_cluster.sh .slurm2 --nodes 2 && source .slurm2/env.sh

One rank's training process frozen (SIGSTOP: a node that stops answering) or killed (SIGKILL: a
process or node gone), rank 1's or rank 0's: the surviving rank does not hang, the job fails with
one line in ``error.txt`` naming the lost rank, ``checkpoints/last.pt`` holds the last completed
save, and the same command run again resumes from it and finishes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import HANG_S, run_history
from tests.test_slurm import _epochs_logged, _job_dir, _job_log, _ok, _wait_for
from tests.test_slurm_nodes import RUN, TWO_NODES, _finish, _popen_train
from tests.test_slurm_nodes import pytestmark  # noqa: F401  (slurm, slow, two nodes up)


def task_pid(job_id: str, rank: int) -> int | None:
    """The PID of the training process of global rank ``rank`` of SLURM job ``job_id`` (by its environment)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = dict(item.split("=", 1) for item in
                           (proc / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in item)
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        # the task's python, not the srun above it (whose arguments name submitit too)
        program = Path(cmdline.split(b"\0")[0].decode(errors="replace")).name
        if (program.startswith("python") and b"submitit" in cmdline and environ.get("SLURM_JOB_ID") == job_id
                and environ.get("SLURM_PROCID") == str(rank) and environ.get("SLURM_STEP_ID", "") != "batch"):
            return int(proc.name)
    return None


def lose_rank_after_epoch_1(sweep: Path, run: tuple[str, ...], rank: int, sig: int, srun_wait_s: int):
    """Start ``run``, send ``sig`` to rank ``rank``'s training process once epoch 1 is logged and
    checkpointed; the finished command. ``srun_wait_s``: srun ends the other task this long after
    the first task ended (the presets' ``SLURM_WAIT``, shortened)."""
    run_dir = sweep / "0"
    proc = _popen_train(*run, SLURM_WAIT=str(srun_wait_s))
    try:
        _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and _epochs_logged(run_dir)
                  and (run_dir / "checkpoints" / "last.pt").is_file(), HANG_S, "the first epoch", proc)
        job_id = _job_dir(sweep, 0).name
        pid = _wait_for(lambda: task_pid(job_id, rank), HANG_S, f"rank {rank}'s process")
    except BaseException:
        cancel_jobs(sweep)
        _finish(proc)
        raise
    os.kill(pid, sig)
    return _finish(proc)


def cancel_jobs(sweep: Path) -> None:
    """Cancel the SLURM jobs of ``sweep`` (a test that failed leaves no job on the shared cluster)."""
    for folder in sweep.glob(".submitit/*"):
        if re.fullmatch(r"\d+(_\d+)?", folder.name):
            subprocess.run(["scancel", folder.name.split("_")[0]], timeout=HANG_S, check=False)


def assert_last_checkpoint_is_the_last_save(run_dir: Path) -> dict:
    """``last.pt`` loads and is the last save the run finished: the one after the evaluation of
    the last epoch in ``metrics.jsonl`` (its record), or the next epoch's save before its evaluation."""
    from stds.run.files import checkpoint

    state = checkpoint.load(run_dir / "checkpoints" / checkpoint.LAST)
    last_line = run_history(run_dir)[-1]
    if state["pending_eval"] is None:
        assert state["last_record"] == last_line and state["epoch"] == last_line["epoch"]
    else:  # killed between the epoch's two saves: trained, not yet evaluated
        assert state["epoch"] == last_line["epoch"] + 1 and state["last_record"] == last_line
    return state


LOSSES = {  # what is done to which rank -> how error.txt says it was lost
    "rank1_frozen": (1, signal.SIGSTOP, "no answer within distributed.timeout_s=15 s);"),
    "rank1_killed": (1, signal.SIGKILL, "its connection closed);"),
    "rank0_killed": (0, signal.SIGKILL, ("its connection closed; the job's rendezvous store, held by rank 0, "
                                          "is gone too; reported by rank 1);")),
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_a_lost_rank_ends_the_job_with_its_name_and_the_next_run_resumes(loss, tmp_path):
    """The survivor fails at its next collective (a closed connection) or after distributed.timeout_s
    (a frozen peer), names the lost rank in one line of error.txt (rank 1 writes it when rank 0 is
    lost); last.pt is the last save; the same command resumes from it and finishes."""
    rank, sig, how = LOSSES[loss]
    sweep = tmp_path / "lost"
    run = (*RUN, "epochs=3", *TWO_NODES, "distributed.timeout_s=15", f"hydra.sweep.dir={sweep}")
    run_dir = sweep / "0"
    # a frozen task lives on: srun ends it 5 s after the survivor ended; a killed one starts srun's
    # wait, which must outlast the survivor's wait for answers (15 s here)
    lost = lose_rank_after_epoch_1(sweep, run, rank, sig, srun_wait_s=5 if sig == signal.SIGSTOP else 60)
    assert lost.returncode != 0, lost.stderr[-3000:]
    error = (run_dir / "error.txt").read_text()
    assert error.count("\n") == 1, error
    assert error.startswith(f"RanksLost: rank {rank} of 2 stopped answering (a node or process lost: {how}"), error
    epochs_done = _epochs_logged(run_dir)
    assert epochs_done and epochs_done[-1] < 3
    state = assert_last_checkpoint_is_the_last_save(run_dir)

    _ok(_finish(_popen_train(*run)))
    log = (run_dir / "train.log").read_text()
    where = f"epoch {min(state['epoch'] + 1, 3)}/3, step {state['step']}"
    assert re.search(rf"resumed from \S+last\.pt in {re.escape(where)}\b", log), log[-3000:]
    assert _epochs_logged(run_dir) == [1, 2, 3] and not (run_dir / "error.txt").exists()


def _node_state(node: str) -> set[str]:
    """slurmctld's state of ``node`` and its flags, e.g. {"DOWN", "NOT_RESPONDING"} (``scontrol``: the
    summary of ``sinfo -n`` can show a failed node as it was while its job is completing)."""
    try:
        shown = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True,
                               timeout=HANG_S, check=False).stdout
    except subprocess.TimeoutExpired:
        return set()
    found = re.search(r"\bState=(\S+)", shown)
    return set(found.group(1).split("+")) if found else set()


def _node_back(node: str) -> bool:
    """Whether SLURM has ``node`` in service: idle or running jobs, answering, not drained."""
    state = _node_state(node)
    return bool(state & {"IDLE", "MIXED", "ALLOCATED"}) and not state & {"NOT_RESPONDING", "DRAIN", "DOWN"}


def _job_state(job_id: str) -> str:
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                               timeout=HANG_S, check=False).stdout
    except subprocess.TimeoutExpired:
        return ""
    found = re.search(r"\bJobState=(\S+)", shown)
    return found.group(1) if found else ""


def start_slurmd(cluster: Path, node: str) -> None:
    """Start ``node``'s slurmd as tests/slurm/start_cluster.sh starts it (the same command, log and
    PID file, in the background of a shell that exits), then wait until SLURM has the node back."""
    conf, pid_file = cluster / "slurm.conf", cluster / "pids" / f"slurmd-{node}.pid"
    subprocess.run(["bash", "-c", 'slurmd -D -N "$1" -f "$2" >>"$3" 2>&1 & echo $! >"$4"', "start_slurmd", node,
                    str(conf), str(cluster / "log" / f"slurmd-{node}.out"), str(pid_file)],
                   stdin=subprocess.DEVNULL, timeout=HANG_S, check=True, env={**os.environ, "SLURM_CONF": str(conf)})
    _wait_for(lambda: _node_back(node), HANG_S, f"{node} back in SLURM")


def _slurmd_alive(pid_file: Path) -> bool:
    try:
        return Path(f"/proc/{int(pid_file.read_text())}/comm").read_text().strip() == "slurmd"
    except (OSError, ValueError):
        return False


@pytest.fixture
def node2_slurmd():
    """The PID file of node2's slurmd in the test cluster (``$SLURM_CONF``'s folder). Whatever the
    test does, the daemon runs again afterwards, started as start_cluster.sh starts it, and the
    node is back (idle, or running a job) before the test ends: other runs share the cluster."""
    cluster = Path(os.environ["SLURM_CONF"]).resolve().parent
    pid_file = cluster / "pids" / "slurmd-node2.pid"
    if not _slurmd_alive(pid_file):
        pytest.skip(f"no running slurmd of node2 recorded in {pid_file}")
    yield pid_file
    if not _slurmd_alive(pid_file):
        start_slurmd(cluster, "node2")
    _wait_for(lambda: _node_back("node2"), HANG_S, "node2 back in SLURM")


def test_a_node_whose_slurmd_dies_is_failed_by_slurm_and_its_job_requeued_and_resumed(node2_slurmd, tmp_path):
    """node2's slurmd killed after epoch 1 (the job's step on node2 lives on without it): after
    SlurmdTimeout SLURM sets node2 DOWN and requeues the job (NODE_FAIL); srun stops both tasks with
    SIGTERM, so rank 0 saves last.pt at the step both ranks agree on, and no error.txt is written.
    The requeued job waits for two nodes; once node2's slurmd is back it starts, resumes from that
    last.pt and trains on (an epoch more is checked, then the job is cancelled). The run is far
    longer than SlurmdTimeout (30 s on the test cluster) on any machine: 1,000 epochs."""
    sweep = tmp_path / "slurmd"
    run_dir = sweep / "0"
    proc = _popen_train(*RUN, "epochs=1000", *TWO_NODES, "distributed.timeout_s=60", f"hydra.sweep.dir={sweep}")
    try:
        _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and _epochs_logged(run_dir)
                  and (run_dir / "checkpoints" / "last.pt").is_file(), HANG_S, "the first epoch", proc)
        job_id = _job_dir(sweep, 0).name
        os.kill(int(node2_slurmd.read_text()), signal.SIGKILL)
        # SLURM cancels the job's step on every node, says why in the job's log, and requeues it; the
        # multirun may end meanwhile (submitit reads the job's NODE_FAIL as its end), the job lives on
        _wait_for(lambda: "DUE TO NODE FAILURE" in _job_log(sweep, 0), HANG_S, "SLURM to fail node2's job")
        seen = []
        _wait_for(lambda: seen.append((_job_state(job_id), _node_state("node2"))) or seen[-1][0] == "PENDING",
                  HANG_S, "the job requeued")
        assert {"DOWN", "NOT_RESPONDING"} <= seen[-1][1], seen[-5:]
        stopped = assert_last_checkpoint_is_the_last_save(run_dir)
        assert not (run_dir / "error.txt").exists()
        start_slurmd(node2_slurmd.parent.parent, "node2")
        where = f"epoch {stopped['epoch'] + 1}/1000, step {stopped['step']}"
        resumed = re.compile(rf"resumed from \S+last\.pt in {re.escape(where)}\b")
        _wait_for(lambda: resumed.search((run_dir / "train.log").read_text()), HANG_S, "the job to resume")
        _wait_for(lambda: _epochs_logged(run_dir)[-1] > stopped["epoch"] + 1, HANG_S, "an epoch after the resume")
    finally:
        cancel_jobs(sweep)
        _finish(proc)
    log = (run_dir / "train.log").read_text()
    assert re.search(r"stopped by SIGTERM in epoch \d+/1000, step \d+; \S+last\.pt is saved", log)
    epochs = _epochs_logged(run_dir)
    assert epochs == list(range(1, len(epochs) + 1)) and not (run_dir / "error.txt").exists()  # none twice