"""A search over the config (D, alpha, ...) with Optuna's ask-and-tell API, one trial per run.

`SearchSettings` holds what ``hydra.sweeper`` says (objectives, constraints, search space,
storage, trial counts); `Search.run` asks the study for ``n_jobs`` trials at a time, hands their
overrides to a launch function (the Hydra launcher: local processes or SLURM jobs), and tells the
study what each trial's run directory holds: the objectives from ``metrics.json`` (names of
``docs/metrics.md``), or the failure, with its one line, from ``error.txt`` or the launcher. Trial
``n`` runs in ``<sweep dir>/<n>``. The Hydra plugin around it is `stds.cli.sweeper`; see
``docs/search.md``.

The study is kept in a database (SQLite in the sweep directory by default, any SQLAlchemy URL for
a shared one), so running the same command again continues it: ``n_trials`` counts every trial the
study holds, and trials this sweep directory started but never reported (the search was stopped)
are settled from their run directories: finished if ``metrics.json`` is there, failed otherwise.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from stds.errors import ConfigError, StdsError, error_line, one_line
from stds.results.pareto import Bound, constraint_values, pareto_mask

log = logging.getLogger(__name__)

__all__ = [
    "OBJECTIVE_METRICS", "Outcome", "Search", "SearchSettings", "default_storage", "open_study",
    "search_space", "shown_url", "trial_outcome",
]

OBJECTIVE_METRICS = ("test_acc1", "best_test_acc1", "test_acc5", "sparsity", "d", "synops",
                     "first_layer_macs")
"""Names of ``metrics.json`` (``docs/metrics.md``) a search may optimise or constrain."""
DIRECTIONS = ("maximize", "minimize")
STUDY_FILE = "study.db"
RUN_DIR_ATTR, SWEEP_DIR_ATTR, REASON_ATTR = "run_dir", "sweep_dir", "fail_reason"
PREFIX = "hydra.sweeper"
_UNMET = 1e9  # a finite stand-in for the inf of a constraint on a missing or non-finite metric

LaunchFn = Callable[[list[list[str]], int], Sequence[Any]]


@dataclass(frozen=True)
class SearchSettings:
    """``hydra.sweeper`` checked: metric -> direction, metric -> bound, parameter -> distribution."""

    objectives: dict[str, str]
    constraints: dict[str, Bound] = field(default_factory=dict)
    space: dict[str, BaseDistribution] = field(default_factory=dict)
    study_name: str = "search"
    storage: str | None = None
    n_trials: int = 20
    n_jobs: int = 2

    @property
    def maximize(self) -> list[bool]:
        return [d == "maximize" for d in self.objectives.values()]

    @property
    def constraint_names(self) -> list[str]:
        """Optuna's names of the constraint values, in `constraint_values` order: ``sparsity>=0.9``."""
        names = []
        for metric, bound in self.constraints.items():
            names += [f"{metric}>={bound.min:g}"] if bound.min is not None else []
            names += [f"{metric}<={bound.max:g}"] if bound.max is not None else []
        return names

    def describe(self) -> dict[str, list[str]]:
        """What a study is for, stored with it: objectives with directions, and constraints."""
        return {"objectives": [f"{n} ({d})" for n, d in self.objectives.items()],
                "constraints": self.constraint_names}


def _metric(name: str, where: str) -> str:
    if name not in OBJECTIVE_METRICS:
        raise ConfigError(f"{where}: '{name}' is not a metric of metrics.json a search can use; "
                          f"use one of {', '.join(OBJECTIVE_METRICS)} (docs/metrics.md)")
    return name


def objectives_from(raw: Mapping[str, Any] | None) -> dict[str, str]:
    """``hydra.sweeper.objectives`` ({metric: maximize|minimize}) checked, in the order given."""
    if not raw:
        raise ConfigError(f"{PREFIX}.objectives is empty; set e.g. {PREFIX}.objectives.test_acc1=maximize")
    out = {}
    for name, direction in raw.items():
        _metric(str(name), f"{PREFIX}.objectives")
        if str(direction) not in DIRECTIONS:
            raise ConfigError(f"{PREFIX}.objectives.{name}={direction}: use maximize or minimize")
        out[str(name)] = str(direction)
    return out


def constraints_from(raw: Mapping[str, Any] | None) -> dict[str, Bound]:
    """``hydra.sweeper.constraints`` ({metric: {min: x, max: y}}) checked; each needs a bound."""
    out = {}
    for name, spec in (raw or {}).items():
        key = f"{PREFIX}.constraints.{name}"
        _metric(str(name), key)
        spec = spec or {}
        unknown = set(spec) - {"min", "max"}
        if unknown:
            raise ConfigError(f"{key} has {sorted(unknown)}; a constraint takes only min and max")
        low, high = (_float_or_none(spec.get(k), f"{key}.{k}") for k in ("min", "max"))
        if low is None and high is None:
            raise ConfigError(f"{key} has neither min nor max; set {key}.min=<lowest allowed {name}>")
        out[str(name)] = Bound(min=low, max=high)
    return out


def _float_or_none(value: Any, key: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}={value} must be a finite number")
    return number


def _distribution(name: str, spec: Mapping[str, Any]) -> BaseDistribution:
    """One entry of ``hydra.sweeper.params``: {low, high[, log, step, int]} or {choices: [...]}."""
    key = f"{PREFIX}.params.{name}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}={spec!r}: give {{low: .., high: ..[, log: true]}} or {{choices: [..]}}")
    unknown = set(spec) - {"low", "high", "log", "step", "int", "choices"}
    if unknown:
        raise ConfigError(f"{key} has {sorted(unknown)}; use low, high, log, step, int or choices")
    if spec.get("choices") is not None:
        choices = list(spec["choices"])
        if not choices:
            raise ConfigError(f"{key}.choices is empty")
        return CategoricalDistribution(choices)
    low, high = (_float_or_none(spec.get(k), f"{key}.{k}") for k in ("low", "high"))
    if low is None or high is None or not low < high:
        raise ConfigError(f"{key} needs low < high (got low={low}, high={high})")
    log_scale = bool(spec.get("log", False))
    if log_scale and low <= 0:
        raise ConfigError(f"{key}.low={low} must be > 0 on a log scale ({key}.log=true)")
    step = _float_or_none(spec.get("step"), f"{key}.step")
    if spec.get("int", False):
        return IntDistribution(int(low), int(high), log=log_scale, step=int(step or 1))
    if step is not None and log_scale:
        raise ConfigError(f"{key}: a step and a log scale cannot go together; drop {key}.step")
    return FloatDistribution(low, high, log=log_scale, step=step)


def _from_override(override: Any) -> BaseDistribution:
    """A command-line sweep (``x=interval(a,b)``, ``tag(log,interval(a,b))``, ``x=a,b,c``,
    ``choice(a,b)``) as an Optuna distribution."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep

    value = override.value()
    if isinstance(value, IntervalSweep):
        spec = {"low": value.start, "high": value.end, "log": "log" in value.tags}
        return _distribution(override.get_key_element(), spec)
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(value.list))
    raise ConfigError(f"{override.input_line}: a search takes interval(low,high), tag(log,interval(..)) "
                      "or choices (a,b,c) on the command line; set ranges in hydra.sweeper.params")


def search_space(params: Mapping[str, Any] | None, arguments: Sequence[str]
                 ) -> tuple[dict[str, BaseDistribution], list[str]]:
    """(parameter -> distribution, fixed overrides): ``hydra.sweeper.params`` plus the sweeps of
    the command line; every other command-line override goes to every trial as it is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space = {str(name): _distribution(str(name), spec) for name, spec in (params or {}).items()}
    fixed: list[str] = []
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        name = override.get_key_element()
        if override.is_sweep_override():
            space[name] = _from_override(override)
        elif name in space:
            raise ConfigError(f"{override.input_line}: {name} is searched ({PREFIX}.params.{name}); "
                              f"drop it from the command line or remove it from the search with "
                              f"~{PREFIX}.params.{name}")
        else:
            fixed.append(override.input_line)
    if not space:
        raise ConfigError(f"nothing to search: {PREFIX}.params is empty and no override sweeps; "
                          "choose a preset (hparams_search=frontier) or give e.g. 'flat_width=interval(0.1,2)'")
    return space, fixed


def override_value(value: Any) -> str:
    """A parameter value as Hydra's override grammar reads it back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def shown_url(url: str) -> str:
    """A storage URL fit for a log line: its password replaced by ``***``."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: opening the study will say so
        return url


def default_storage(sweep_dir: Path) -> str:
    """The study's SQLite database in the sweep directory: nothing to start, copied with it."""
    return f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"


def make_sampler(spec: Mapping[str, Any] | None, seed_offset: int) -> optuna.samplers.BaseSampler | None:
    """``hydra.sweeper.sampler`` (``_target_: optuna.samplers.<Name>``, its arguments) built; a
    seed is moved on by the trials the study already has, so a continued study draws new points.
    Constraints need nothing here: Optuna's samplers read each trial's ``set_constraint`` values
    (NSGA-II, TPE and GP take them into account)."""
    if not spec:
        return None
    from hydra.utils import instantiate

    spec = dict(spec)
    target = str(spec.get("_target_", ""))
    if not target.startswith("optuna.samplers."):
        raise ConfigError(f"{PREFIX}.sampler._target_={target or None} is not an Optuna sampler; use "
                          "optuna.samplers.<Name> (NSGAIISampler, TPESampler, GPSampler, RandomSampler)")
    if spec.get("seed") is not None:
        spec["seed"] = int(spec["seed"]) + seed_offset
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return instantiate(spec)
    except Exception as exc:
        raise ConfigError(f"{PREFIX}.sampler ({target}) cannot be built: {one_line(exc)}") from exc


def open_study(settings: SearchSettings, storage: str) -> optuna.Study:
    """The study ``settings.study_name`` in ``storage``, created when new; an existing one must
    be for the same objectives (metrics and directions) and constraints."""
    try:
        study = optuna.create_study(storage=storage, study_name=settings.study_name,
                                    directions=list(settings.objectives.values()), load_if_exists=True)
    except Exception as exc:
        raise StdsError(f"cannot open the study {settings.study_name!r} in {PREFIX}.storage={shown_url(storage)}: "
                        f"{_reason(exc)}") from exc
    wanted = settings.describe()
    stored = {key: study.user_attrs.get(key) for key in wanted}
    if all(value is None for value in stored.values()):
        for key, value in wanted.items():
            study.set_user_attr(key, value)
        stored = wanted
    if stored != wanted:
        raise ConfigError(
            f"the study {settings.study_name!r} in {shown_url(storage)} is for {_describe(stored)}, not "
            f"{_describe(wanted)}; set {PREFIX}.study_name=<a new name> or use a new hydra.sweep.dir")
    return study


def _describe(what: Mapping[str, Any]) -> str:
    constraints = what.get("constraints") or []
    return ", ".join(what.get("objectives") or ["?"]) + (f" where {', '.join(constraints)}" if constraints else "")


@dataclass(frozen=True)
class Outcome:
    """What a trial's run directory says: objective values, or why it failed (``error``)."""

    values: list[float] | None
    constraints: list[float] = field(default_factory=list)
    error: str = ""


def _first_line(path: Path) -> str | None:
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None
    return lines[0] if lines else None


def trial_outcome(run_dir: Path, settings: SearchSettings, job_error: str | None = None) -> Outcome:
    """The trial's result from its files: the objectives of ``metrics.json`` (each a finite
    number), else the first line of ``error.txt``, else ``job_error``, else "died"."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = None
    if isinstance(metrics, dict):
        values: list[float] = []
        for name in settings.objectives:
            value = metrics.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return Outcome(None, error=f"metrics.json has {name}={value!r}, not a finite number")
            values.append(float(value))
        return Outcome(values, constraint_values(metrics, settings.constraints))
    reason = _first_line(run_dir / "error.txt") or job_error
    return Outcome(None, error=reason or f"the trial ended without metrics.json or error.txt (its job "
                                         f"died or was stopped); see {run_dir}")


def _job_error(returned: Any) -> str | None:
    """The failure a Hydra JobReturn carries (the task's exception), as one line."""
    from hydra.core.utils import JobStatus

    if returned is None or getattr(returned, "status", None) != JobStatus.FAILED:
        return None
    error = getattr(returned, "_return_value", None)
    return _reason(error) if isinstance(error, BaseException) else "the job failed"


def _reason(exc: BaseException) -> str:
    """``Type: message`` on one line: why a trial failed, as ``error.txt`` would say it."""
    return error_line(exc).strip()


@contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold ``<sweep dir>/.search.lock`` while the search runs: trials this directory started
    and never reported are then known to belong to a search that stopped."""
    path = sweep_dir / ".search.lock"
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StdsError(f"a search is already running in {sweep_dir} ({holder}); wait for it to end "
                            "or give this one another hydra.sweep.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
            for trial, job_error in zip(ready, errors):
                outcome = trial_outcome(self.run_dir(trial.number), self.settings, job_error)
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
                error = f"its config does not compose: {_reason(exc)}"
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
            log.error("The launcher reported: %s", _reason(exc))
            return [_reason(exc)] * len(overrides)
        returns += [None] * (len(overrides) - len(returns))
        return [_job_error(r) for r in returns]

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
