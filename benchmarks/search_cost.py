"""What a search costs: slot utilisation of asynchronous trials against batches, and the epochs a
constrained search trains to its answer with and without a pruner (issue 28's measured figures).

Slot utilisation = sum of trial run times / (``n_jobs`` x wall time), the wall from the first
trial's start to the last one's end. Three ways to measure it:

- stand-ins (the default, and ``--smoke``): each trial a real local process (``sleep <seconds>``,
  drawn per trial from ``--low`` to ``--high``, seeded) told to a real SQLite study by the real
  `stds.cli.study.driver.Search`; the batches run the same processes ``n_jobs`` at a time, the
  next batch after the slowest (the search before it was asynchronous). Scheduling only.
- ``--train local|slurm``: real training runs of the digits net through ``python launch/train.py
  -m`` with ``hydra/launcher=local`` or ``slurm_cpu``: the search with ``epochs`` searched over
  2 to 12, then Hydra's plain sweep over the same epochs in batches of ``n_jobs``
  (``hydra.sweeper.max_batch_size``); run times from the jobs' submitit logs (`search_runs`).

Epochs to the answer (``--epochs``): ``hparams_search=constrained`` (best ``test_acc1`` at
``sparsity >= 0.9``), 16 trials of `EPOCHS` epochs, per sampler seed with and without `PRUNER`:
the epochs all trials trained (their ``metrics.jsonl``) and the best feasible final ``test_acc1``.
``--route at_sparsity``: the same question through ``hparams_search=at_sparsity target_sparsity=0.9``
(every trial ends at S; the learning rate searched; the preset's median pruner or none).

    python benchmarks/search_cost.py                    # stand-ins: 12 trials, n_jobs=3, 2 to 12 s each
    python benchmarks/search_cost.py --smoke            # 4 stand-ins of 0.05 to 0.2 s (tests run this)
    nice -n 10 python benchmarks/search_cost.py --train local --out outputs/bench/slots_local
    nice -n 10 python benchmarks/search_cost.py --train slurm --out outputs/bench/slots_slurm
    nice -n 10 python benchmarks/search_cost.py --epochs --out outputs/bench/epochs   # 3 seeds x 2
    nice -n 10 python benchmarks/search_cost.py --epochs --route at_sparsity --out outputs/bench/epochs_at
    python benchmarks/search_cost.py --epochs --out outputs/bench/epochs --read   # the table again

``--read`` tabulates what ``--out`` holds without running anything (``--first K``: each search's
trials 0 to K-1 only, for searches still running or cut short).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
from common import uptime
from optuna.distributions import FloatDistribution
from search_runs import (
    Answer,
    Slots,
    pruned_search,
    job_spans,
    planned_epochs,
    slot_batches,
    slot_search,
)

from stds.cli.launcher import available_cpus
from stds.cli.study.driver import Search
from stds.cli.study.settings import SearchSettings

SMOKE_S = (0.2, 0.05, 0.15, 0.1)
"""The smoke's stand-in trials (seconds): 0.5 s in all, batches of 2 at least 0.2 + 0.15 s long."""
MIN_SPARSITY = 0.9
EPOCHS = 8
EPOCH_ARGS = ("hydra.sweeper.n_trials=16", "hydra.sweeper.n_jobs=2", f"epochs={EPOCHS}")
"""Every constrained search: 16 trials, 2 in flight (the local launcher on 2 CPUs), 8 epochs of the
default recipe (the sine schedule raises the threshold to D over all 8 epochs). A faster ramp
(``scheduler.ramp_until=0.25``) was tried first: at d = 0.31 after one epoch every weight of the
young net is under the threshold (sparsity 0.9997, chance top-1), so nearly every D collapses."""
PRUNER = "{_target_: optuna.pruners.SuccessiveHalvingPruner, min_resource: 3, reduction_factor: 3}"
"""Successive halving with its first rung at epoch 3 (the threshold at 31% of D): a trial goes on
only when its top-1 there is in the best third of the trials that reached it (the first ones:
when it is the best); the next rung (9) lies past the 8 epochs. A trial so stopped trains 3 of 8
epochs, so pruning two trials in three saves 2/3 x 5/8 = 42% of the epochs."""
ROUTES = {
    "constrained": (("hparams_search=constrained", f"hydra.sweeper.constraints.sparsity.min={MIN_SPARSITY}"),
                    PRUNER),
    "at_sparsity": (("hparams_search=at_sparsity", f"target_sparsity={MIN_SPARSITY}"), None),
}
"""``--route``: the search and the pruner of its arm with one. ``constrained`` searches D for the best
top-1 at sparsity >= S with `PRUNER`; ``at_sparsity`` ends every trial at S (``scheduler=target``)
and searches the learning rate with the preset's own median pruner (None: not overridden). The arm
without a pruner sets ``hydra.sweeper.pruner=null``."""
LAUNCHERS = {"local": "local", "slurm": "slurm_cpu"}


def _durations(n: int, low: float, high: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(low, high) for _ in range(n)]


def _run(seconds: float, spans: list[tuple[float, float]]) -> None:
    """One trial: a process that lives ``seconds``; its (start, end) appended to ``spans``."""
    started = time.perf_counter()
    subprocess.run(["sleep", f"{seconds:.3f}"], check=True)
    spans.append((started, time.perf_counter()))


def asynchronous(durations: Sequence[float], n_jobs: int, folder: Path) -> Slots:
    """The search over stand-ins (trial n sleeps ``durations[n]``)."""
    spans: list[tuple[float, float]] = []

    def launch(overrides: list[list[str]], number: int) -> list[None]:
        _run(durations[number], spans)
        run_dir = folder / str(number)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(f'{{"test_acc1": {1 - number / 100}, "sparsity": 0.5}}')
        return [None]

    settings = SearchSettings(objectives={"test_acc1": "maximize"}, study_name="bench",
                              space={"flat_width": FloatDistribution(0.1, 1.0)},
                              n_trials=len(durations), n_jobs=n_jobs)
    search = Search(settings, folder, [], launch)
    search.poll_s = 0.05
    search.run()
    return Slots.of(spans, n_jobs)


def batches(durations: Sequence[float], n_jobs: int) -> Slots:
    """The same stand-ins ``n_jobs`` per batch, a barrier after each batch."""
    spans: list[tuple[float, float]] = []
    for first in range(0, len(durations), n_jobs):
        threads = [threading.Thread(target=_run, args=(s, spans)) for s in durations[first:first + n_jobs]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return Slots.of(spans, n_jobs)


def stand_ins(durations: Sequence[float], n_jobs: int) -> dict[str, Slots]:
    """Slot utilisation of both schedules over the same stand-in trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        searched = asynchronous(durations, n_jobs, Path(folder) / "search")
    return {"asynchronous": searched, "batches": batches(durations, n_jobs)}


def training_runs(launcher: str, n_jobs: int, trials: int, seed: int, out: Path, read: bool) -> dict[str, Slots]:
    """Slot utilisation of the search and of batches over the same trial lengths (training runs)."""
    if not read:
        slot_search(LAUNCHERS[launcher], n_jobs, trials, seed, out)
        slot_batches(LAUNCHERS[launcher], n_jobs, planned_epochs(out / "async"), out)
    return {"asynchronous": Slots.of(job_spans(out / "async"), n_jobs),
            "batches": Slots.of(job_spans(out / "batches"), n_jobs)}


def print_slots(result: dict[str, Slots]) -> None:
    print("| schedule | trials | slots | sum of trial times (s) | wall (s) | slot utilisation |")
    print("|---|---|---|---|---|---|")
    for name, slots in result.items():
        print(f"| {name} | {slots.trials} | {slots.slots} | {slots.busy_s:.2f} | {slots.wall_s:.2f} "
              f"| {slots.utilisation:.3f} |")


def epochs_to_answer(out: Path, seeds: Sequence[int], parallel: int, read: bool, first: int | None = None,
                     route: str = "constrained",
                     pruner: tuple[str, str] | None = None) -> dict[tuple[str, int], Answer]:
    """Each seed's search of ``route`` (`ROUTES`) without and with its pruner (``pruner``: another,
    as (name, Hydra value); its searches go to ``<name>_seed<s>``), ``parallel`` searches at once
    (read back: the trials numbered below ``first``, or all). A search already in ``out`` is
    continued (Hydra's sweeper finds its study), so another pruner reuses the runs without one."""
    preset, own = ROUTES[route]
    name, value = pruner or ("pruner", own)
    arms = {"none": "null", name: value}
    runs = [(arm, seed) for seed in seeds for arm in arms]
    if not read:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            done = [pool.submit(pruned_search, preset, out / f"{arm}_seed{seed}", seed, EPOCH_ARGS, arms[arm])
                    for arm, seed in runs]
            for future in done:
                future.result()
    return {(arm, seed): Answer.read(out / f"{arm}_seed{seed}", MIN_SPARSITY, first) for arm, seed in runs}


def print_answers(answers: dict[tuple[str, int], Answer]) -> None:
    print("| seed | pruner | trials | pruned | no result | epochs trained | best feasible test_acc1 (trial) |")
    print("|---|---|---|---|---|---|---|")
    for (arm, seed), answer in answers.items():
        best = answer.best
        shown = f"{best.test_acc1:.4f} ({best.number})" if best else "none"
        missing = sum(t.test_acc1 is None for t in answer.trials)
        print(f"| {seed} | {arm} | {len(answer.trials)} | {sum(t.pruned for t in answer.trials)} | {missing} "
              f"| {answer.epochs} | {shown} |")
    pruned = next(arm for arm, _ in answers if arm != "none")
    totals = {arm: sum(a.epochs for (name, _), a in answers.items() if name == arm) for arm in ("none", pruned)}
    bests = {key: answer.best for key, answer in answers.items()}
    gaps = [100 * (bests[pruned, s].test_acc1 - bests["none", s].test_acc1)  # type: ignore[union-attr]
            for arm, s in answers if arm == "none" and bests["none", s] and bests[pruned, s]]
    print(f"epochs: {totals[pruned]} with the pruner, {totals['none']} without: "
          f"{100 * (1 - totals[pruned] / totals['none']):.1f}% fewer")
    mean = f"mean {sum(gaps) / len(gaps):+.2f}" if gaps else "no seed has a feasible trial in both"
    print(f"best feasible test_acc1, pruner minus none (points): {', '.join(f'{g:+.2f}' for g in gaps)}; {mean}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--n-jobs", type=int, default=3, help="trials in flight (local: at most the CPUs)")
    parser.add_argument("--low", type=float, default=2.0)
    parser.add_argument("--high", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help=f"4 stand-ins of {', '.join(map(str, SMOKE_S))} s")
    parser.add_argument("--train", choices=sorted(LAUNCHERS), help="slot utilisation of training runs")
    parser.add_argument("--epochs", action="store_true", help="epochs to the answer, with and without the pruner")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--epochs: sampler seeds")
    parser.add_argument("--parallel", type=int, default=2, help="--epochs: searches at once")
    parser.add_argument("--out", type=Path, help="--train, --epochs: the folder of their sweeps")
    parser.add_argument("--read", action="store_true", help="tabulate what --out holds; run nothing")
    parser.add_argument("--first", type=int, help="--epochs --read: only the trials numbered below this")
    parser.add_argument("--pruner", nargs=2, metavar=("NAME", "VALUE"),
                        help="--epochs: another pruner (a Hydra value) in <out>/NAME_seed<s>, against the same "
                             "runs without one")
    parser.add_argument("--route", choices=sorted(ROUTES), default="constrained",
                        help="--epochs: the constrained search over D, or at_sparsity (lr at S, scheduler=target)")
    args = parser.parse_args()
    if (args.train or args.epochs) and args.out is None:
        parser.error("--train and --epochs need --out DIR (their sweep directories go there)")
    before = uptime()
    if args.epochs:
        answers = epochs_to_answer(args.out.resolve(), args.seeds, args.parallel, args.read, args.first, args.route,
                                   tuple(args.pruner) if args.pruner else None)
        pruner = args.pruner[1] if args.pruner else ROUTES[args.route][1] or "the preset's"
        print(f"16-trial {args.route} searches (sparsity >= {MIN_SPARSITY}), {EPOCHS} epochs a trial; pruner {pruner}"
              + (f"; their trials 0 to {args.first - 1}" if args.first else ""))
        print_answers(answers)
    elif args.train:
        n_jobs = min(args.n_jobs, available_cpus()) if args.train == "local" else args.n_jobs
        print(f"{args.trials} training runs of the digits net, epochs 2 to 12 (sampler seed {args.seed}), "
              f"hydra/launcher={LAUNCHERS[args.train]}, n_jobs={n_jobs} (asked {args.n_jobs})")
        print_slots(training_runs(args.train, n_jobs, args.trials, args.seed, args.out.resolve(), args.read))
    else:
        durations = SMOKE_S if args.smoke else _durations(args.trials, args.low, args.high, args.seed)
        print(f"{len(durations)} stand-in trials, n_jobs={2 if args.smoke else args.n_jobs}, "
              f"{min(durations):g} to {max(durations):g} s each, {sum(durations):.2f} s in all")
        print_slots(stand_ins(durations, 2 if args.smoke else args.n_jobs))
    if not args.read:
        print(f"load before: {before}")
        print(f"load after: {uptime()}")


if __name__ == "__main__":
    main()
