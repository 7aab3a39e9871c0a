"""Process set-up: which ranks and addresses a SLURM task, torchrun or a plain process gets."""

from pathlib import Path

import pytest
import torch

from tests.conftest import HANG_S

from stds.run.setup import distributed
from stds.errors import ConfigError

SLURM_TASK = {
    "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4711", "SLURM_ARRAY_JOB_ID": "4700",
    "SLURM_ARRAY_TASK_ID": "3", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
    "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[07-08]",
}
TORCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    for name in TORCH_VARS + tuple(SLURM_TASK):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_slurm_task_of_a_two_node_array_job(clean_env):
    for name, value in SLURM_TASK.items():
        clean_env.setenv(name, value)
    clean_env.setattr(distributed.socket, "getaddrinfo", lambda host, port: [("an address",)])
    env_vars = distributed._submitit_env()
    assert env_vars == {
        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(distributed.port_for_job("4700_3")),
        "RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5",
    }


def test_master_address_is_the_node_name_or_its_slurm_node_addr(monkeypatch):
    import subprocess

    assert distributed.node_address("localhost") == "localhost"  # a name that resolves is used as it is
    asked = []

    def scontrol(args, **kwargs):
        asked.append(args)
        shown = "NodeName=node1 Arch=x86_64 CoresPerSocket=2 NodeAddr=127.0.0.2 NodeHostName=vm Port=19001"
        return subprocess.CompletedProcess(args, 0, shown if args[-1] == "node1" else "", "")

    monkeypatch.setattr(distributed.subprocess, "run", scontrol)
    unresolvable = "node1.invalid"  # .invalid never resolves (RFC 6761)
    monkeypatch.setattr(distributed.socket, "getaddrinfo", lambda host, port: (_ for _ in ()).throw(
        distributed.socket.gaierror(f"{host} unknown")))
    assert distributed.node_address("node1") == "127.0.0.2"
    assert asked == [["scontrol", "show", "node", "-o", "node1"]]
    with pytest.raises(RuntimeError, match=f"first node '{unresolvable}' does not resolve.*NodeAddr"):
        distributed.node_address(unresolvable)


def _rank_of_two(rank: int, port: int, lose: str, found: str) -> None:
    """A rank of a two-process gloo group with a 3 s timeout. ``lose``: ``freeze1`` (rank 1 stops
    itself, SIGSTOP: a node that stops answering, its sockets open), ``kill1`` or ``kill0`` (that
    rank is SIGKILLed: a process or node gone, its connections closed), or ``none``; the surviving
    rank (rank 0 unless rank 0 is the one lost) writes what it names to ``found``."""
    import os
    import signal

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    timeout_s = HANG_S if lose == "none" else 3  # nobody lost: no timeout may fire, however busy the machine
    env = distributed.setup("cpu", timeout_s=timeout_s)
    dist.all_reduce(torch.ones(1))
    if lose in (f"freeze{rank}", f"kill{rank}"):
        os.kill(os.getpid(), signal.SIGSTOP if lose.startswith("freeze") else signal.SIGKILL)
    try:
        dist.all_reduce(torch.ones(1))
        error = RuntimeError("[gloo/transport/tcp/pair.cc] a collective failed on both ranks")
    except RuntimeError as exc:  # the collective timed out, or its peer's connection closed
        error = exc
    lost = distributed.name_lost_ranks(error, env, timeout_s=timeout_s)
    if rank == (1 if lose == "kill0" else 0):
        Path(found).write_text(f"{lost}|{lost.ranks}" if lost is not None else "nobody")
    os._exit(0)


def _named_by_the_survivor(lose: str, tmp_path: Path) -> str:
    """What the surviving rank of `_rank_of_two` names (two spawned processes)."""
    import os
    import signal
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = mp.get_context("spawn")
    found = tmp_path / "named.txt"
    ranks = [ctx.Process(target=_rank_of_two, args=(rank, port, lose, str(found))) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        ranks[1 if lose == "kill0" else 0].join(timeout=HANG_S)
        return found.read_text()
    finally:
        for process in ranks:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join()


@pytest.mark.slow
def test_a_rank_that_stops_answering_is_named_after_the_timeout(tmp_path):
    named = _named_by_the_survivor("freeze1", tmp_path)
    assert named.startswith("rank 1 of 2 stopped answering (a node or process lost: no answer within "
                            "distributed.timeout_s=3 s);")
    assert "Timed out" in named and named.endswith("|(1,)")


@pytest.mark.slow
def test_a_killed_rank_is_named_as_its_connection_closes(tmp_path):
    named = _named_by_the_survivor("kill1", tmp_path)
    assert named.startswith("rank 1 of 2 stopped answering (a node or process lost: its connection closed);")
    assert "reported by" not in named and named.endswith("|(1,)")


@pytest.mark.slow
def test_a_killed_rank_0_is_named_by_the_survivor(tmp_path):
    named = _named_by_the_survivor("kill0", tmp_path)
    # rank 0 held the store: rank 1 finds it closed and names rank 0 at once
    assert named.startswith("rank 0 of 2 stopped answering (a node or process lost: its connection closed; "
                            "the job's rendezvous store, held by rank 0, is gone too; reported by rank 1);")
    assert named.endswith("|(0,)")


@pytest.mark.slow
def test_ranks_that_all_answer_name_nobody(tmp_path):
    assert _named_by_the_survivor("none", tmp_path) == "nobody"


def test_port_is_per_array_task_and_stable_across_requeues():
    ports = {distributed.port_for_job(f"4700_{task}") for task in range(8)}
    assert len(ports) == 8 and all(20000 <= p <= 60000 for p in ports)
    assert distributed.port_for_job("4700_3") == distributed.port_for_job("4700_3")


def test_single_task_job_and_plain_process_are_single_process(clean_env):
    assert distributed._submitit_env() is None
    clean_env.setenv("SUBMITIT_EXECUTOR", "slurm")
    clean_env.setenv("SLURM_JOB_ID", "12")
    clean_env.setenv("SLURM_NTASKS", "1")
    assert distributed._submitit_env() is None
    env = distributed.setup("cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    assert env.device == torch.device("cpu")


def test_device_choice(clean_env):
    with pytest.raises(ConfigError, match="device"):
        distributed.setup("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda"):
            distributed.setup("cuda")
        assert distributed.setup("auto").device.type == "cpu"


def test_teardown_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    env = distributed.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    distributed.teardown(env)  # nothing set up: nothing to do
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    distributed.teardown(env)
    assert not dist.is_initialized()
