"""A run that is a trial of a search (``trial.number`` set by the search): it keeps its trial alive
in the study, reports each epoch's ``test_acc1`` to the study's pruner, and tells the study its own
result, so that nothing else has to be alive when it ends.

- Heartbeat: every ``heartbeat_s`` seconds the run records a heartbeat for its trial (Optuna's
  ``RDBStorage.record_heartbeat``); a search that finds a trial whose heartbeat stopped for longer
  than its grace period settles it as failed (``optuna.storages.fail_stale_trials``). Optuna
  starts its own heartbeat thread only inside ``study.optimize``, which a run does not call, so
  the thread is here.
- Pruning: with a pruner in the study's settings, ``trial.report(test_acc1, epoch)`` after each
  evaluation and ``trial.should_prune()``; a pruned run ends after that epoch, writes
  ``metrics.json`` with ``"pruned": true`` and keeps its checkpoint (``resume=`` continues it).
- Telling: the run's result (`stds.run.measure.objectives.trial_outcome` on its own files), or its
  failure's one line, told to the study as the run ends.
- Its SLURM job: a run inside a SLURM job records the job's id (user attribute `JOB_ATTR`), so a
  search can ask SLURM whether the trial's job still waits or runs before settling anything.

What a trial needs of the search (objectives, bounds, pruner, heartbeat) is stored in the study
(user attribute `SPEC_ATTR`) and read here as data: metric names from
`stds.run.measure.objectives.OBJECTIVE_METRICS`, pruner classes from `PRUNERS` only.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from stds.errors import ConfigError, StdsError, error_line
from stds.run.measure.objectives import OBJECTIVE_METRICS, Bound, Outcome, trial_outcome

log = logging.getLogger(__name__)

__all__ = ["JOB_ATTR", "PRUNERS", "SPEC_ATTR", "StudyLink", "TrialSpec", "make_pruner", "open_link",
           "slurm_job_id"]

SPEC_ATTR = "trial_spec"
REASON_ATTR = "fail_reason"
JOB_ATTR = "slurm_job_id"
PRUNERS = ("MedianPruner", "PercentilePruner", "SuccessiveHalvingPruner", "HyperbandPruner",
           "ThresholdPruner", "NopPruner")
"""Optuna pruners a search may name (``hydra.sweeper.pruner._target_: optuna.pruners.<Name>``)."""
_UNMET = 1e9  # a finite stand-in for the inf of a constraint on a missing or non-finite metric


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a study needs: objective metrics, bounds, pruner (``{_target_, ...}``)
    and the heartbeat interval in seconds."""

    objectives: tuple[str, ...]
    bounds: dict[str, Bound] = field(default_factory=dict)
    pruner: dict[str, Any] | None = None
    heartbeat_s: int = 60

    @property
    def constraint_names(self) -> list[str]:
        """Optuna's names of the constraint values, in `constraint_values` order: ``sparsity>=0.9``."""
        names = []
        for metric, bound in self.bounds.items():
            names += [f"{metric}>={bound.min:g}"] if bound.min is not None else []
            names += [f"{metric}<={bound.max:g}"] if bound.max is not None else []
        return names

    def to_attr(self) -> dict[str, Any]:
        return {"objectives": list(self.objectives), "pruner": self.pruner, "heartbeat_s": self.heartbeat_s,
                "bounds": {m: [b.min, b.max] for m, b in self.bounds.items()}}

    @classmethod
    def from_attr(cls, raw: Any) -> TrialSpec:
        """The spec stored in a study, checked as data (a study file may come from anywhere)."""
        if not isinstance(raw, dict):
            raise StdsError(f"the study has no usable {SPEC_ATTR}; it was not made by a search of stds")
        objectives = tuple(str(m) for m in raw.get("objectives") or [])
        bounds = {str(m): Bound(*(None if v is None else float(v) for v in pair))
                  for m, pair in (raw.get("bounds") or {}).items()}
        unknown = sorted((set(objectives) | set(bounds)) - set(OBJECTIVE_METRICS))
        if not objectives or unknown:
            raise StdsError(f"the study's {SPEC_ATTR} names {unknown or 'no objective'}; not a search of stds")
        make_pruner(raw.get("pruner"))  # refuses a pruner outside PRUNERS
        return cls(objectives, bounds, raw.get("pruner"), int(raw.get("heartbeat_s") or 60))


def make_pruner(spec: Mapping[str, Any] | None) -> Any:
    """``{_target_: optuna.pruners.<Name>, arg: value, ...}`` built; None for no pruner.

    Only the classes of `PRUNERS`, with plain numbers, strings and booleans as arguments.
    """
    if not spec:
        return None
    import optuna

    spec = dict(spec)
    target = str(spec.pop("_target_", ""))
    name = target.removeprefix("optuna.pruners.")
    if name not in PRUNERS or not target.startswith("optuna.pruners."):
        raise ConfigError(f"hydra.sweeper.pruner._target_={target or None} is not a pruner a search can use; "
                          f"use optuna.pruners.<Name> with Name one of {', '.join(PRUNERS)}")
    bad = [k for k, v in spec.items() if v is not None and not isinstance(v, (int, float, str, bool))]
    if bad:
        raise ConfigError(f"hydra.sweeper.pruner.{bad[0]}: give a number, a string or a boolean")
    try:
        return getattr(optuna.pruners, name)(**spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"hydra.sweeper.pruner ({target}) cannot be built: {error_line(exc).strip()}") from None


def tell(study: Any, trial: Any, outcome: Outcome, spec: TrialSpec) -> None:
    """Tell the study one trial's outcome: values and constraints, pruned, or failed with its reason."""
    from optuna.trial import TrialState

    if outcome.pruned:
        study.tell(trial, state=TrialState.PRUNED)
    elif outcome.values is None:
        trial.set_user_attr(REASON_ATTR, outcome.error)
        study.tell(trial, state=TrialState.FAIL)
    else:
        for name, value in zip(spec.constraint_names, outcome.constraints):
            trial.set_constraint(name, min(value, _UNMET))  # <= 0: met
        study.tell(trial, outcome.values)


def slurm_job_id() -> str | None:
    """This process's SLURM job as ``squeue`` names it (``123``; ``123_4`` for a task of a job
    array), or None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


class StudyLink:
    """The study's trial ``number`` as this run sees it (see the module's text)."""

    def __init__(self, study: Any, trial_id: int, run_dir: Path) -> None:
        import optuna

        self.study, self.run_dir = study, run_dir
        self.trial = optuna.Trial(study, trial_id)  # reopened by its id, as Optuna's own ask() does
        self.spec = TrialSpec.from_attr(study.user_attrs.get(SPEC_ATTR))
        self.pruner = make_pruner(self.spec.pruner)
        if self.pruner is not None:
            study.pruner = self.pruner
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="trial-heartbeat", daemon=True)

    def _heartbeat(self) -> None:
        while True:
            try:
                self.study._storage.record_heartbeat(self.trial._trial_id)
            except Exception as exc:  # a database hiccup: the next beat tries again
                log.warning("trial %d: heartbeat not recorded: %s", self.trial.number, error_line(exc).strip())
            if self._stop.wait(self.spec.heartbeat_s):
                return

    def should_stop(self, epoch: int, test_acc1: float) -> bool:
        """Report the epoch's top-1 to the pruner; whether the pruner stops this trial now."""
        if self.pruner is None or not math.isfinite(test_acc1):
            return False
        self.trial.report(float(test_acc1), epoch)
        return bool(self.trial.should_prune())

    def tell_result(self, job_error: str | None = None) -> None:
        """Tell the study what the run directory holds (once; a told trial is left as it is)."""
        from optuna.trial import TrialState

        outcome = trial_outcome(self.run_dir, self.spec.objectives, self.spec.bounds, job_error)
        try:
            if self.study._storage.get_trial(self.trial._trial_id).state != TrialState.RUNNING:
                return
            tell(self.study, self.trial, outcome, self.spec)
        except Exception as exc:  # the database is out of reach: the next search tells it from the files
            log.warning("trial %d: not told to the study (%s); the next search run tells it from %s",
                        self.trial.number, error_line(exc).strip(), self.run_dir)
            return
        log.info("trial %d told to the study %r: %s", self.trial.number, self.study.study_name,
                 "pruned" if outcome.pruned else outcome.values if outcome.values is not None else outcome.error)

    def __enter__(self) -> StudyLink:
        job = slurm_job_id()
        if job is not None:
            try:
                self.trial.set_user_attr(JOB_ATTR, job)
            except Exception as exc:  # the search still finds the job by its comment
                log.warning("trial %d: its job id is not recorded: %s", self.trial.number, error_line(exc).strip())
        self._beat.start()
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        self._stop.set()
        self._beat.join(timeout=5)
        from stds.run.life.signals import RunStopped

        # a stopped run (requeue, Ctrl-C) stays running: it resumes, or its heartbeat runs out
        if exc is not None and not isinstance(exc, (RunStopped, KeyboardInterrupt)):
            self.tell_result(error_line(exc).strip())


def open_link(node: Any, run_dir: Path, sweeper_storage: str | None = None) -> StudyLink | None:
    """The link for ``cfg.trial`` (``storage``, else ``sweeper_storage``; ``study``, ``number``), or
    None when the run is no trial. A trial the study no longer holds as running (told, failed for a stopped heartbeat) is
    refused in one line, so a job that started late does not train it a second time."""
    if node is None or node.get("number") is None:
        return None
    import optuna

    storage = node.get("storage") or sweeper_storage
    if not storage:
        raise StdsError(f"trial.number={node.get('number')} but neither trial.storage nor hydra.sweeper.storage "
                        "names the study's database; set trial.number=null to train without the study")
    storage, name, number = str(storage), str(node.get("study")), int(node.get("number"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        except Exception as exc:
            raise StdsError(f"trial.number={number}: cannot open trial {number} of the study {name!r}: "
                            f"{error_line(exc).strip()}") from None
    state = study._storage.get_trial(trial_id).state
    if state != optuna.trial.TrialState.RUNNING:
        raise StdsError(f"trial {number} of the study {name!r} is {state.name.lower()} already; nothing to "
                        f"train (to train this run on without the study: resume={run_dir} trial.number=null)")
    return StudyLink(study, trial_id, run_dir)
