"""What ``hydra.sweeper`` says, checked: objectives, constraints, the search space, trial counts.

`SearchSettings` is the checked form; `search_space` splits a command line into the searched
parameters and the overrides every trial gets; `override_value` writes a parameter back in
Hydra's override grammar.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from stds.errors import ConfigError
from stds.run.life.study_link import TrialSpec, make_pruner
from stds.run.measure.objectives import OBJECTIVE_METRICS, Bound

__all__ = ["OBJECTIVE_METRICS", "PREFIX", "SearchSettings", "constraints_from", "objectives_from",
           "override_value", "search_space"]

DIRECTIONS = ("maximize", "minimize")
PREFIX = "hydra.sweeper"


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
    pruner: dict[str, Any] | None = None  # {_target_: optuna.pruners.<Name>, ...}, single objective only
    heartbeat_s: int = 60  # each running trial records a heartbeat this often
    grace_s: int = 600  # a trial whose heartbeat stopped this long ago failed (and is retried once)
    max_retry: int = 1

    def __post_init__(self) -> None:
        if self.pruner and len(self.objectives) > 1:
            raise ConfigError(f"{PREFIX}.pruner: Optuna's pruners stop trials of single-objective studies only, "
                              f"and this one has {len(self.objectives)} objectives; drop the pruner "
                              f"(~{PREFIX}.pruner) or search each target_sparsity on its own (docs/search.md)")
        make_pruner(self.pruner)  # a pruner that cannot be built is refused before any trial
        if self.grace_s <= self.heartbeat_s:
            raise ConfigError(f"{PREFIX}.grace_s={self.grace_s} must be larger than "
                              f"{PREFIX}.heartbeat_s={self.heartbeat_s}")

    @property
    def trial_spec(self) -> TrialSpec:
        """What each trial needs to tell the study its result and to be pruned."""
        return TrialSpec(tuple(self.objectives), dict(self.constraints), self.pruner, self.heartbeat_s)

    @property
    def maximize(self) -> list[bool]:
        return [d == "maximize" for d in self.objectives.values()]

    @property
    def constraint_names(self) -> list[str]:
        """Optuna's names of the constraint values, in `constraint_values` order: ``sparsity>=0.9``
        (the trial's own rule, `TrialSpec.constraint_names`)."""
        return self.trial_spec.constraint_names

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
    # inside '...' Hydra reads a backslash as itself except in a run right before a quote (escaped
    # quote or the closing one), where each is doubled: escape just those
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", str(value))
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"'{text}'"


