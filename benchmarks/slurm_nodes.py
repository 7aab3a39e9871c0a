"""Two SLURM nodes against one: the wall time of a two-node digits run (``nodes=2
tasks_per_node=1``) against one node with the same two ranks (``nodes=1 tasks_per_node=2``), and
the time from a requeue (``scancel --signal=USR2``, as at a time limit, and ``scontrol requeue``)
to the first optimizer step of the resumed job.

Needs a cluster of two nodes (``bash tests/slurm/start_cluster.sh .slurm2 --nodes 2 && source
.slurm2/env.sh``). The two layouts run in alternating rounds, one job at a time; each round times
the whole multirun command (submission, start-up, training, end) and reads the training time from
the run's ``metrics.jsonl``. The requeue time is read from the run's ``train.log``: from the moment
the requeue was asked for to the first step line after ``resumed from``. Prints the medians and
the load average.

    python benchmarks/slurm_nodes.py --epochs 2 --rounds 3
    python benchmarks/slurm_nodes.py --smoke    # one short round of each: the script still works
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from common import REPO, uptime

TRAIN = REPO / "launch" / "train.py"
BASE = ("-m", "hydra/launcher=slurm_cpu", "dataset=digits", "batch_size=16", "flat_width=0.05",
        "logging.synops=false", "logging.log_every_steps=1")
LAYOUTS = {"two nodes x 1 task": ("hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1"),
           "one node x 2 tasks": ("hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=2")}
_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def _train(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check(proc: subprocess.Popen) -> None:
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"a run failed (exit {proc.returncode}):\n{out[-1500:]}\n{err[-3000:]}")


def _timed_run(layout: tuple[str, ...], epochs: int, sweep: Path) -> tuple[float, float]:
    """(wall time of the multirun command, training time of its epochs) in seconds."""
    started = time.perf_counter()
    _check(_train(*BASE, f"epochs={epochs}", *layout, f"hydra.sweep.dir={sweep}"))
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in (sweep / "0" / "metrics.jsonl").read_text().splitlines()]
    return wall, sum(line["epoch_time_s"] for line in lines)


def _stamp(line: str) -> float | None:
    found = _STAMP.match(line)
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if found else None


def _first_resumed_step(log: Path, after: float) -> float | None:
    """The time of the first step line that follows a ``resumed from`` line logged after ``after``."""
    resumed = False
    for line in log.read_text().splitlines():
        when = _stamp(line)
        if when is None or when < after:
            continue
        if "resumed from" in line:
            resumed = True
        elif resumed and re.search(r"epoch \d+/\d+ step \d+/\d+", line):
            return when
    return None


def _requeue_delay(how: list[str], epochs: int, sweep: Path) -> float:
    """Seconds from asking for a requeue (after the first epoch) to the resumed job's first step."""
    proc = _train(*BASE, f"epochs={epochs}", *LAYOUTS["two nodes x 1 task"], f"hydra.sweep.dir={sweep}")
    run_dir = sweep / "0"
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
        if proc.poll() is not None:
            _check(proc)
        time.sleep(0.2)
    job = next(p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit())
    asked = time.time()
    subprocess.run([*how, job], check=True, timeout=60)
    _check(proc)
    first = _first_resumed_step(run_dir / "train.log", asked)
    if first is None:
        sys.exit(f"no resumed step after the requeue in {run_dir / 'train.log'}")
    return first - asked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one round of one epoch (requeue: two)")
    args = parser.parse_args()
    epochs, rounds = (1, 1) if args.smoke else (args.epochs, args.rounds)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(rounds):
            for name, layout in LAYOUTS.items():
                times[name].append(_timed_run(layout, epochs, Path(tmp) / f"{index}-{len(times[name])}-{name[:3]}"))
        usr2 = _requeue_delay(["scancel", "--signal=USR2"], max(epochs, 2), Path(tmp) / "usr2")
        requeue = _requeue_delay(["scontrol", "requeue"], max(epochs, 2), Path(tmp) / "requeue")
    print(f"digits net, {epochs} epoch(s), 2 ranks (gloo), {rounds} round(s); medians:")
    walls = {}
    for name, measured in times.items():
        walls[name] = statistics.median(wall for wall, _ in measured)
        train = statistics.median(train for _, train in measured)
        print(f"  {name}: {walls[name]:.1f} s wall (multirun command), {train:.1f} s training")
    print(f"  ratio two nodes / one node (wall): {walls['two nodes x 1 task'] / walls['one node x 2 tasks']:.2f}")
    print(f"  USR2 to the first resumed step: {usr2:.1f} s; scontrol requeue to it: {requeue:.1f} s")
    print(f"  load: {uptime()}")


if __name__ == "__main__":
    main()
