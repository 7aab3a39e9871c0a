"""Slot utilisation of a search: the sweeper's asynchronous trials against batches of ``n_jobs``.

Slot utilisation = sum of trial run times / (``n_jobs`` x wall time). Each trial is a real local
process (``sleep <seconds>``, a stand-in for a training run of unequal length: the seconds are
drawn per trial from ``--low`` to ``--high``, seeded), told to a real SQLite study by the real
`stds.cli.study.driver.Search`. The batch figure runs the same processes the way the search ran
them before trials were asynchronous: ``n_jobs`` at a time, the next batch after the slowest.

    python benchmarks/search_cost.py                # 12 trials, n_jobs=3, 2 to 12 s each
    python benchmarks/search_cost.py --smoke        # 4 trials of 0.05 to 0.2 s (tests run this)

This measures the scheduling only; the training itself is the same either way.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import optuna
from common import uptime
from optuna.distributions import FloatDistribution

from stds.cli.study.driver import Search
from stds.cli.study.settings import SearchSettings


def _durations(n: int, low: float, high: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(low, high) for _ in range(n)]


def _run(seconds: float, spans: list[tuple[float, float]]) -> float:
    """One trial: a process that lives ``seconds``; its measured run time (its span kept)."""
    started = time.perf_counter()
    subprocess.run(["sleep", f"{seconds:.3f}"], check=True)
    spans.append((started, time.perf_counter()))
    return spans[-1][1] - started


def _wall(spans: list[tuple[float, float]]) -> float:
    """From the first trial's start to the last one's end (opening the study is not a trial slot)."""
    return max(end for _, end in spans) - min(start for start, _ in spans)


def asynchronous(durations: list[float], n_jobs: int, folder: Path) -> tuple[float, float]:
    """(sum of trial times, wall time) of the search over ``durations`` (trial n sleeps durations[n])."""
    busy, lock, spans = [0.0], threading.Lock(), []

    def launch(overrides: list[list[str]], number: int) -> list[None]:
        took = _run(durations[number], spans)
        run_dir = folder / str(number)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(f'{{"test_acc1": {1 - number / 100}, "sparsity": 0.5}}')
        with lock:
            busy[0] += took
        return [None]

    settings = SearchSettings(objectives={"test_acc1": "maximize"}, study_name="bench",
                              space={"flat_width": FloatDistribution(0.1, 1.0)},
                              n_trials=len(durations), n_jobs=n_jobs)
    search = Search(settings, folder, [], launch)
    search.poll_s = 0.05
    search.run()
    return busy[0], _wall(spans)


def batches(durations: list[float], n_jobs: int) -> tuple[float, float]:
    """(sum of trial times, wall time) with ``n_jobs`` trials per batch and a barrier after each."""
    busy, spans = 0.0, []
    for first in range(0, len(durations), n_jobs):
        times: list[float] = []
        threads = [threading.Thread(target=lambda s=s: times.append(_run(s, spans)))
                   for s in durations[first:first + n_jobs]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        busy += sum(times)
    return busy, _wall(spans)


def measure(trials: int, n_jobs: int, low: float, high: float, seed: int) -> dict[str, float]:
    """Slot utilisation of both schedules over the same trial lengths."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    durations = _durations(trials, low, high, seed)
    with tempfile.TemporaryDirectory() as folder:
        busy_async, wall_async = asynchronous(durations, n_jobs, Path(folder) / "search")
    busy_batch, wall_batch = batches(durations, n_jobs)
    return {"async_utilisation": busy_async / (n_jobs * wall_async), "async_wall_s": wall_async,
            "batch_utilisation": busy_batch / (n_jobs * wall_batch), "batch_wall_s": wall_batch,
            "ideal_wall_s": sum(durations) / n_jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--n-jobs", type=int, default=3)
    parser.add_argument("--low", type=float, default=2.0)
    parser.add_argument("--high", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="4 trials of 0.05 to 0.2 s")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.n_jobs, args.low, args.high = 4, 2, 0.05, 0.2
    result = measure(args.trials, args.n_jobs, args.low, args.high, args.seed)
    print(f"{args.trials} trials, n_jobs={args.n_jobs}, {args.low:g} to {args.high:g} s each (seed {args.seed}); "
          f"load: {uptime()}")
    for kind in ("async", "batch"):
        print(f"{kind:5s}: slot utilisation {result[kind + '_utilisation']:.3f}, wall {result[kind + '_wall_s']:.1f} s")
    print(f"ideal wall (sum / n_jobs): {result['ideal_wall_s']:.1f} s")


if __name__ == "__main__":
    main()
