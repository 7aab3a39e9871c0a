"""The training runs behind ``search_cost.py --train`` and ``--epochs``: the searches and batches it
starts through ``python launch/train.py -m``, and the figures it reads back from their directories.

- A trial's run time is its job's life as submitit logs it (``.submitit/<job>/<job>_0_log.*``):
  from its first ``submitit`` line (the job has started) to its last (the job is ending). The same
  rule for every launcher and both schedules, so the import of torch and the evaluation count as
  time the slot was used, and the launcher's and the study's work between trials as time it was not.
- A trial's epochs are the last ``epoch`` of its ``metrics.jsonl`` (one record per trained epoch,
  also for a pruned or failed run); its result is its ``metrics.json``.

The scripts import this module as ``search_runs`` (the script's own folder is first on its path).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from common import REPO

SUBMITIT_LINE = re.compile(r"^submitit \w+ \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\) - ")
QUIET = ["logging.progress_bar=false", "logging.histogram_every_epochs=0"]
"""Overrides of every run here: nothing drawn for a terminal nobody watches."""


def train(overrides: Sequence[str], log: Path) -> None:
    """``python launch/train.py -m OVERRIDES`` (this interpreter, the repository as working
    directory), its output in ``log``; a failing command stops the benchmark with its log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "launch/train.py", "-m", *overrides, *QUIET], cwd=REPO,
                              stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"python launch/train.py -m ... failed (exit {proc.returncode}); see {log}:\n{tail}")


def job_span(job_dir: Path) -> tuple[float, float] | None:
    """(start, end) in seconds since the epoch of one submitit job, from the timestamps of the
    first and last ``submitit`` line of rank 0's logs (``<job>_0_log.out`` and ``.err``: the local
    executor writes them to the second, SLURM to the first); None without two such lines."""
    lines = [line for log in sorted(job_dir.glob("*_0_log.*")) if log.suffix in (".out", ".err")
             for line in log.read_text(errors="replace").splitlines()]
    stamps = sorted(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    for m in map(SUBMITIT_LINE.match, lines) if m)
    return (stamps[0], stamps[-1]) if len(stamps) >= 2 else None


def job_spans(sweep_dir: Path) -> list[tuple[float, float]]:
    """The spans of every job of a sweep directory (``.submitit/<job>/``)."""
    spans = [job_span(p) for p in sorted(sweep_dir.glob(".submitit/*")) if p.is_dir()]
    return [s for s in spans if s is not None]


@dataclass(frozen=True)
class Slots:
    """Slot utilisation of one schedule: sum of trial run times / (``slots`` x wall), the wall from
    the first trial's start to the last one's end."""

    trials: int
    busy_s: float
    wall_s: float
    slots: int

    @property
    def utilisation(self) -> float:
        return self.busy_s / (self.slots * self.wall_s)

    @classmethod
    def of(cls, spans: Sequence[tuple[float, float]], slots: int) -> Slots:
        if not spans:
            raise SystemExit("no submitit job log with a start and an end: nothing ran")
        wall = max(end for _, end in spans) - min(start for start, _ in spans)
        return cls(len(spans), sum(end - start for start, end in spans), wall, slots)


def trial_dirs(sweep_dir: Path) -> list[Path]:
    """The trials' run directories of a sweep, by number (``<sweep dir>/<n>``)."""
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def epochs_trained(run_dir: Path) -> int:
    """The last epoch ``metrics.jsonl`` records (0 when the run trained none)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((int(json.loads(line)["epoch"]) for line in lines if line.strip()), default=0)


def planned_epochs(sweep_dir: Path) -> list[int]:
    """Each trial's ``epochs`` (its ``metrics.json``'s ``epochs_planned``), by trial number."""
    return [int(json.loads((d / "metrics.json").read_text())["epochs_planned"]) for d in trial_dirs(sweep_dir)]


def slot_search(launcher: str, slots: int, trials: int, seed: int, folder: Path) -> Path:
    """The asynchronous search: ``trials`` trials, ``slots`` in flight, ``epochs`` searched over
    2 to 12 (an integer; TPE, seeded); its sweep directory."""
    sweep = folder / "async"
    train(["hydra/sweeper=stds_optuna", f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}",
           "hydra.sweeper.study_name=slots", f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.n_jobs={slots}",
           f"hydra.sweeper.sampler.seed={seed}", "+hydra.sweeper.params.epochs={low: 2, high: 12, int: true}"],
          folder / "async.log")
    return sweep


def slot_batches(launcher: str, slots: int, epochs: Sequence[int], folder: Path) -> Path:
    """The same trial lengths the way the search ran them before it was asynchronous: Hydra's
    sweep launched ``slots`` points at a time (``hydra.sweeper.max_batch_size``), each batch
    waited for to its slowest point, in one process; its sweep directory."""
    sweep = folder / "batches"
    train([f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}", f"hydra.sweeper.max_batch_size={slots}",
           "epochs=" + ",".join(str(e) for e in epochs)], folder / "batches.log")
    return sweep


@dataclass(frozen=True)
class Trial:
    """What one trial's run directory says: epochs trained, final top-1 and sparsity, pruned
    (``test_acc1`` None: no ``metrics.json``, the run failed or still trains)."""

    number: int
    epochs: int
    test_acc1: float | None
    sparsity: float | None
    pruned: bool

    @classmethod
    def read(cls, run_dir: Path) -> Trial:
        path = run_dir / "metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        return cls(int(run_dir.name), epochs_trained(run_dir), metrics.get("test_acc1"), metrics.get("sparsity"),
                   bool(metrics.get("pruned", False)))

    def feasible(self, min_sparsity: float) -> bool:
        """Finished (not pruned, not failed) at a sparsity of at least ``min_sparsity``."""
        return (not self.pruned and self.test_acc1 is not None and self.sparsity is not None
                and self.sparsity >= min_sparsity)


@dataclass(frozen=True)
class Answer:
    """One constrained search read back: its trials, the epochs they trained in all, its best."""

    trials: list[Trial]
    min_sparsity: float

    @property
    def epochs(self) -> int:
        return sum(t.epochs for t in self.trials)

    @property
    def best(self) -> Trial | None:
        """The feasible trial of the highest final ``test_acc1`` (the lowest number on a tie)."""
        feasible = [t for t in self.trials if t.feasible(self.min_sparsity)]
        return max(feasible, key=lambda t: (t.test_acc1, -t.number), default=None)

    @classmethod
    def read(cls, sweep_dir: Path, min_sparsity: float, first: int | None = None) -> Answer:
        """The search's trials (only those numbered below ``first``, when given)."""
        dirs = [d for d in trial_dirs(sweep_dir) if first is None or int(d.name) < first]
        return cls([Trial.read(d) for d in dirs], min_sparsity)


def pruned_search(preset: Sequence[str], sweep: Path, seed: int, args: Sequence[str], pruner: str | None) -> None:
    """A search of ``preset`` (its ``hparams_search=`` and the overrides it needs) with the sampler's
    ``seed``, the benchmark's ``args`` and ``pruner`` (a Hydra value; ``null`` for none; None: the
    preset's own) through the local launcher."""
    # null first: a preset's own pruner node would take the new one's keys as a merge
    chosen = ["hydra.sweeper.pruner=null", f"hydra.sweeper.pruner={pruner}"] if pruner else []
    train([*preset, "hydra/launcher=local", f"hydra.sweep.dir={sweep}", f"hydra.sweeper.sampler.seed={seed}",
           *args, *chosen], sweep.parent / f"{sweep.name}.log")
