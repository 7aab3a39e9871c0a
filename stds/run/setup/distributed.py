"""Process set-up for single-process, torchrun and submitit (SLURM or local) runs.

This module is the only place that reads ranks and world sizes from the environment:

* a submitit task with more than one task in its job (``SUBMITIT_EXECUTOR`` is set): rank, local
  rank, world size and master host come from ``submitit.JobEnvironment``; the master address is
  the job's first node (its SLURM ``NodeAddr`` when its name does not resolve); the master port
  is derived from the per-task job id (``<array job>_<task>`` for array jobs), so concurrent array
  tasks do not collide;
* ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
* otherwise a single process.

Every rank uses one device (``cuda:<local rank>`` when CUDA is available, else the CPU), NCCL on
GPUs and gloo on CPUs. Only rank 0 writes files (`DistEnv.is_main`). A collective that waits
longer than ``distributed.timeout_s`` fails instead of hanging, and one whose peer died (a closed
connection) fails at once; `lost_ranks` then names the ranks that stopped answering (a lost node),
for the run's ``error.txt``.
"""

from __future__ import annotations

import gc
import os
import random
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stds.errors import ConfigError

_PORT_RANGE = (20000, 60000)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the run."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is set up."""
        return self.world_size > 1


def port_for_job(job_id: str) -> int:
    """A master port in [20000, 60000] derived from a job id (stable for a requeued job)."""
    return random.Random(job_id).randint(*_PORT_RANGE)


def _submitit_env() -> dict[str, str] | None:
    """torch.distributed variables for a multi-task submitit job, or None outside one."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    job = submitit.JobEnvironment()
    if job.num_tasks <= 1:
        return None
    return {
        "MASTER_ADDR": node_address(job.hostnames[0]),
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(port_for_job(job.job_id)),
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
    }


def node_address(node: str) -> str:
    """Where to reach SLURM node ``node``: its name when the name resolves (the usual case), else
    the ``NodeAddr`` slurmctld holds for it (node names that are not host names, as on the test
    cluster of several nodes on one machine, tests/slurm/start_cluster.sh --nodes 2)."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except socket.gaierror:
        pass
    try:
        shown = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True,
                               text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        shown = ""
    found = re.search(r"\bNodeAddr=(\S+)", shown)
    if found is None:
        raise RuntimeError(f"the job's first node {node!r} does not resolve and `scontrol show node {node}` "
                           "gives no NodeAddr; make the node names resolve (DNS or /etc/hosts)")
    return found.group(1)


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible; set device=cpu or device=auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device={device!r} is not valid; use one of auto, cpu, cuda")


def allotted_cpu_threads() -> int | None:
    """CPU threads this process was given: ``OMP_NUM_THREADS`` (set by ``hydra/launcher=local``,
    the SLURM presets and torchrun), else ``SLURM_CPUS_PER_TASK``; None when nothing says."""
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def _limit_cpu_threads() -> None:
    """torch's intra-op threads = the process's allotment, so that processes sharing a machine
    (a local sweep, tasks of one node) do not each start a thread per core."""
    threads = allotted_cpu_threads()
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Set up this process (and the process group when there are several) and return its place.

    ``timeout_s`` (``distributed.timeout_s``): a collective waiting longer than this raises.
    """
    _limit_cpu_threads()
    submitit_vars = _submitit_env()
    if submitit_vars is not None:
        os.environ.update(submitit_vars)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = _pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def teardown(env: DistEnv) -> None:
    """Wait for every rank, then destroy the process group while the interpreter is whole.

    The run's DDP wrapper holds the group; collecting it first means the group's worker threads
    are joined here rather than during interpreter shutdown, where gloo can abort the process
    ("terminate called without an active exception"). Call it after a successful run only.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    barrier(env)
    dist.destroy_process_group()
    gc.collect()


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in a single process)."""
    if env.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The element-wise maximum of a tensor over ranks (a no-op in a single process)."""
    if env.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def barrier(env: DistEnv) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if env.distributed:
        dist.barrier()


def broadcast_object(value: Any, env: DistEnv) -> Any:
    """Rank 0's value of a picklable object (e.g. the run directory), on every rank."""
    if not env.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


ANSWER_WAIT_S = 60.0
"""At most this long a rank waits for the other ranks' answers after a failed collective (their
collectives fail within about a step of its own). Below the `slurm` presets' ``SLURM_WAIT`` (120 s:
srun ends the other tasks that long after one task ended, a killed one included)."""

_CLOSED = ("closed by peer", "connection reset", "broken pipe", "connection refused", "end of file")


class RanksLost(RuntimeError):
    """Ranks of a distributed run stopped answering (a node or process lost); names them."""

    def __init__(self, message: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = ranks


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is (or was raised from) a failed collective: torch's `DistError` (NCCL,
    the store), or the plain RuntimeError gloo raises, whose message names gloo's source file."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        if isinstance(current, dist.DistError) or (isinstance(current, RuntimeError) and "gloo" in str(current)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _store_address() -> tuple[str, int]:
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def _store_listens(wait_s: float) -> bool:
    """Whether the job's rendezvous store still accepts connections. A plain connect, because
    TCPStore retries a refused connection until its timeout, where a closed port (its process
    killed) answers at once."""
    try:
        with socket.create_connection(_store_address(), timeout=min(wait_s, 10.0)):
            return True
    except OSError:
        return False


def lost_ranks(env: DistEnv, wait_s: float) -> list[int] | None:
    """After a failed collective: the ranks that did not answer within ``wait_s``, as this rank sees them.

    Every surviving rank posts an answer in the job's store (held by rank 0: its process under
    SLURM, its node's torchrun agent) and waits up to ``wait_s`` for the others' answers; the ranks
    without one are lost. A store that cannot be reached (or stops answering) before rank 0 has
    answered means rank 0 is lost: ``[0]`` (the other ranks cannot be asked then). None when the
    store went away after rank 0 answered (rank 0 reports). The process group cannot be asked:
    it is what failed.
    """
    if not _store_listens(wait_s):
        return [0]
    prefix = f"stds/answered/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    keys = {rank: f"{prefix}/{rank}" for rank in range(env.world_size)}
    answered = {env.rank}
    try:
        store = dist.TCPStore(*_store_address(), is_master=False, timeout=timedelta(seconds=wait_s),
                              wait_for_workers=False)
        store.set(keys[env.rank], "1")
        end = time.monotonic() + wait_s
        while len(answered) < env.world_size and time.monotonic() < end:
            answered |= {rank for rank, key in keys.items() if rank not in answered and store.check([key])}
            time.sleep(0.2)
    except (RuntimeError, OSError, KeyError, ValueError):  # the store's host is gone (or frozen)
        return None if 0 in answered else [0]
    return [rank for rank in keys if rank not in answered]


def _how_lost(exc: BaseException, timeout_s: float, store_gone: bool) -> str:
    """Why a collective failed, in words: a closed connection (a process that ended) or the timeout."""
    text = " ".join(str(exc).split()).lower()
    closed = any(words in text for words in _CLOSED)
    how = "its connection closed" if closed else f"no answer within distributed.timeout_s={timeout_s:g} s"
    return how + ("; the job's rendezvous store, held by rank 0, is gone too" if store_gone else "")


def name_lost_ranks(exc: BaseException, env: DistEnv, timeout_s: float) -> RanksLost | None:
    """A `RanksLost` naming the ranks that stopped answering when ``exc`` ended a distributed
    run, as this rank sees them (rank 0 writes it to ``error.txt``; when rank 0 is the one lost,
    a surviving rank does), or None when every rank answered."""
    if not env.distributed or not is_collective_failure(exc):
        return None
    lost = lost_ranks(env, min(timeout_s, ANSWER_WAIT_S))
    if not lost:
        return None
    names = ", ".join(str(rank) for rank in lost)
    first = " ".join(str(exc).split())[:300]
    reporter = "" if env.is_main else f"; reported by rank {env.rank}"
    return RanksLost(f"rank{'s' if len(lost) > 1 else ''} {names} of {env.world_size} stopped answering "
                     f"(a node or process lost: {_how_lost(exc, timeout_s, 0 in lost)}{reporter}); "
                     f"checkpoints/last.pt holds the last checkpoint and the next run resumes from it "
                     f"(collective error: {first})", tuple(lost))
