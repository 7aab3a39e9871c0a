"""The search loop: ask the study for trials, launch them, tell the study what they left."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from stds.cli.jobs import job_error
from stds.cli.study.lock import sweep_lock
from stds.cli.study.outcome import Outcome, reason, trial_outcome
from stds.cli.study.settings import SearchSettings, override_value
from stds.cli.study.storage import default_storage, make_sampler, open_study, shown_url
from stds.errors import StdsError
from stds.results.pareto import pareto_mask

log = logging.getLogger(__name__)

__all__ = ["Search"]

RUN_DIR_ATTR, SWEEP_DIR_ATTR, REASON_ATTR = "run_dir", "sweep_dir", "fail_reason"
_UNMET = 1e9  # a finite stand-in for the inf of a constraint on a missing or non-finite metric

LaunchFn = Callable[[list[list[str]], int], Sequence[Any]]


class Search:
    """One invocation of a search: continue the study until it holds ``n_trials`` trials.

    ``launch(overrides_per_trial, first_job_index)`` runs the trials (a Hydra launcher's
    ``launch``); ``validate(batch)`` composes a batch of overrides and raises if it cannot.
    """

    def __init__(self, settings: SearchSettings, sweep_dir: Path, fixed: Sequence[str], launch: LaunchFn,
                 sampler: Mapping[str, Any] | None = None,
                 validate: Callable[[list[list[str]]], None] | None = None) -> None:
        self.settings = settings
        self.sweep_dir = Path(sweep_dir).resolve()
        self.fixed = list(fixed)
        self.launch = launch
        self.sampler_spec = sampler
        self.validate = validate
        self.storage = settings.storage or default_storage(self.sweep_dir)
        self.ran: list[Outcome] = []  # outcomes of the trials this invocation asked for

    def run_dir(self, number: int) -> Path:
        return self.sweep_dir / str(number)

    def run(self) -> list[dict[str, Any]]:
        """Settle stopped trials, run new ones until ``n_trials``; returns the Pareto front."""
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        if self.validate is not None:
            self.validate([self.fixed])  # a bad fixed override fails here, before any trial
        with sweep_lock(self.sweep_dir):
            study = open_study(self.settings, self.storage)
            sampler = make_sampler(self.sampler_spec, len(study.trials))
            if sampler is not None:
                study.sampler = sampler
            self._settle_stopped(study)
            self._loop(study)
        front = self._summary(study)
        failed = [o for o in self.ran if o.values is None]
        if self.ran and len(failed) == len(self.ran):
            raise StdsError(f"all {len(self.ran)} trials of this search failed; the first: {failed[0].error}")
        return front

    def _settle_stopped(self, study: optuna.Study) -> None:
        """Trials this sweep directory started that never reported: finished or failed now."""
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.user_attrs.get(SWEEP_DIR_ATTR) != str(self.sweep_dir):
                continue  # another machine's trial, running now
            run_dir = Path(frozen.user_attrs.get(RUN_DIR_ATTR, self.run_dir(frozen.number)))
            outcome = trial_outcome(run_dir, self.settings, "the search stopped before this trial "
                                    f"reported, and {run_dir} has no metrics.json (the job died or was stopped)")
            # a trial of an earlier process, reopened by its id as Optuna's own ask() does
            self._tell(study, optuna.Trial(study, frozen._trial_id), outcome)

    def _loop(self, study: optuna.Study) -> None:
        job_index = 0
        while (todo := min(self.settings.n_jobs, self.settings.n_trials - len(study.trials))) > 0:
            trials = [self._ask(study) for _ in range(todo)]
            ready = [t for t in trials if self._composes(study, t)]
            errors = self._launch([self._overrides(t) for t in ready], job_index)
            job_index += len(ready)
            for trial, error in zip(ready, errors):
                outcome = trial_outcome(self.run_dir(trial.number), self.settings, error)
                self.ran.append(outcome)
                self._tell(study, trial, outcome)

    def _ask(self, study: optuna.Study) -> optuna.Trial:
        trial = study.ask(self.settings.space)
        trial.set_user_attr(SWEEP_DIR_ATTR, str(self.sweep_dir))
        trial.set_user_attr(RUN_DIR_ATTR, str(self.run_dir(trial.number)))
        log.info("Trial %d: %s", trial.number, " ".join(self._overrides(trial)[len(self.fixed):-1]))
        return trial

    def _overrides(self, trial: optuna.Trial) -> list[str]:
        """The trial's command line: the fixed overrides, its parameters, its run directory."""
        params = [f"{name}={override_value(value)}" for name, value in trial.params.items()]
        return [*self.fixed, *params, f"hydra.sweep.subdir={trial.number}"]

    def _composes(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        """Whether the trial can start: its config composes and its run directory is new."""
        run_dir = self.run_dir(trial.number)
        error = None
        if (run_dir / ".hydra").exists():
            error = (f"{run_dir} already holds a run that is not this study's trial {trial.number}; "
                     "give the search a new hydra.sweep.dir")
        elif self.validate is not None:
            try:
                self.validate([self._overrides(trial)])
            except Exception as exc:
                error = f"its config does not compose: {reason(exc)}"
        if error is not None:
            self.ran.append(Outcome(None, error=error))
            self._tell(study, trial, self.ran[-1])
        return error is None

    def _launch(self, overrides: list[list[str]], job_index: int) -> list[str | None]:
        """Run the trials; per trial, the error its launcher reported (None if none)."""
        if not overrides:
            return []
        try:
            returns = list(self.launch(overrides, job_index))
        except Exception as exc:  # e.g. a SLURM job that died without a result: read the files
            log.error("The launcher reported: %s", reason(exc))
            return [reason(exc)] * len(overrides)
        returns += [None] * (len(overrides) - len(returns))
        return [job_error(r) for r in returns]

    def _tell(self, study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
        if outcome.values is None:
            trial.set_user_attr(REASON_ATTR, outcome.error)
            log.warning("Trial %d failed: %s", trial.number, outcome.error)
            study.tell(trial, state=TrialState.FAIL)
            return
        for name, value in zip(self.settings.constraint_names, outcome.constraints):
            trial.set_constraint(name, min(value, _UNMET))  # <= 0: met
        study.tell(trial, outcome.values)

    def _summary(self, study: optuna.Study) -> list[dict[str, Any]]:
        """Log the study's counts and its Pareto front (feasible finished trials); return the front."""
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        ok = [t for t in done if all(v <= 0 for v in t.constraints.values())]
        failed = sum(t.state == TrialState.FAIL for t in trials)
        log.info("Study %r in %s: %d trials, %d finished (%d feasible), %d failed, %d running elsewhere",
                 study.study_name, shown_url(self.storage), len(trials), len(done), len(ok), failed,
                 len(trials) - len(done) - failed)
        names = list(self.settings.objectives)
        front = [t for t, on in zip(ok, pareto_mask([t.values for t in ok], self.settings.maximize)) if on]
        for t in sorted(front, key=lambda t: t.number):
            values = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, t.values))
            params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
            log.info("Pareto front: trial %d (%s): %s", t.number, params, values)
        return [{"number": t.number, "params": dict(t.params), "values": dict(zip(names, t.values))}
                for t in front]
