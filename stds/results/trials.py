"""Trials of a search (``hparams_search=...``, ``hydra/sweeper=stds_optuna``) among collected runs.

A trial is a run directory whose ``.hydra/hydra.yaml`` names the study sweeper; its number is its
``hydra.sweep.subdir``, its objectives and constraints are the sweeper's (metric names of
``docs/metrics.md``). Trials of one study (one sweep directory with its SQLite study, or one
``storage`` and ``study_name``) are compared with each other: a finished trial that meets the
constraints and that no other such trial beats in every objective is on the Pareto front
(`stds.results.pareto`); a trial whose ``test_acc1`` is at chance (`chance_limit` of its classes:
a fully pruned net) is marked ``chance`` and never on the front, whatever its sparsity. The searched parameters are the keys of ``hydra.sweeper.params`` and the
command-line sweeps of the sweep's ``multirun.yaml``. Everything is read as data (YAML); nothing
is instantiated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from omegaconf import DictConfig, OmegaConf

from stds.results.pareto import Bound, feasible, pareto_mask
from stds.run.measure.health import chance_limit

if TYPE_CHECKING:
    from stds.results.record import RunRecord

__all__ = ["AT_CHANCE", "FRONT", "INFEASIBLE", "TrialInfo", "mark_trials", "trial_info"]

SWEEPER_CLASS = "OptunaSweeper"
FRONT, INFEASIBLE, AT_CHANCE = "front", "infeasible", "chance"


@dataclass(frozen=True)
class TrialInfo:
    """What a report needs of one trial: its study, number, objectives, bounds and parameters."""

    study: tuple[str, str]  # (storage URL or sweep directory, study name)
    number: int | None
    objectives: tuple[tuple[str, bool], ...]  # (metric, maximised)
    bounds: tuple[tuple[str, Bound], ...]
    params: tuple[str, ...]  # the searched config keys
    chance: float | None = None  # the highest test_acc1 that is still chance for its classes


def _load(path: Path) -> DictConfig | None:
    try:
        loaded = OmegaConf.load(path)
    except Exception:
        return None
    return loaded if isinstance(loaded, DictConfig) else None


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    except Exception:  # a resolver this process does not know
        return None
    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


def _sweep_keys(sweep_dir: Path) -> list[str]:
    """Keys the sweep's command line searched (``x=interval(..)``, ``x=a,b``), from multirun.yaml."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _load(sweep_dir / "multirun.yaml")
    task = _get(cfg, "hydra.overrides.task") if cfg is not None else None
    try:
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task or []])
    except Exception:
        return []
    return [o.get_key_element() for o in parsed if o.is_sweep_override()]


def _bounds(raw: Any) -> tuple[tuple[str, Bound], ...]:
    out = []
    for name, spec in (raw or {}).items():
        spec = spec if isinstance(spec, dict) else {}
        low, high = spec.get("min"), spec.get("max")
        out.append((str(name), Bound(min=None if low is None else float(low),
                                     max=None if high is None else float(high))))
    return tuple(out)


def trial_info(run_dir: Path) -> TrialInfo | None:
    """The trial a run directory is, or None if a search did not start it."""
    cfg = _load(run_dir / ".hydra" / "hydra.yaml")
    if cfg is None or not str(_get(cfg, "hydra.sweeper._target_") or "").endswith(SWEEPER_CLASS):
        return None
    objectives = _get(cfg, "hydra.sweeper.objectives")
    if not isinstance(objectives, dict) or not objectives:
        return None
    sweep_dir = run_dir.resolve().parent
    subdir = str(_get(cfg, "hydra.sweep.subdir"))
    params = [str(k) for k in (_get(cfg, "hydra.sweeper.params") or {})]
    params += [k for k in _sweep_keys(sweep_dir) if k not in params]
    return TrialInfo(
        study=(str(_get(cfg, "hydra.sweeper.storage") or sweep_dir), str(_get(cfg, "hydra.sweeper.study_name"))),
        number=int(subdir) if subdir.isdigit() else None,
        objectives=tuple((str(k), str(v) == "maximize") for k, v in objectives.items()),
        bounds=_bounds(_get(cfg, "hydra.sweeper.constraints")), params=tuple(params), chance=_chance(run_dir))


def _chance(run_dir: Path) -> float | None:
    """`chance_limit` for the run's ``dataset.num_classes`` (None when its config lacks it)."""
    cfg = _load(run_dir / ".hydra" / "config.yaml")
    classes = _get(cfg, "dataset.num_classes") if cfg is not None else None
    return chance_limit(classes) if isinstance(classes, int) and not isinstance(classes, bool) and classes > 1 else None


def _value(run: RunRecord, name: str) -> float | None:
    value = getattr(run, name, None)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _mark_study(members: list[tuple[RunRecord, TrialInfo]]) -> None:
    """``pareto`` of one study's trials: front / infeasible / "" (finished, dominated)."""
    info = members[0][1]
    names = [name for name, _ in info.objectives]
    scored = []
    for run, member in members:
        values = {name: _value(run, name) for name in {*names, *(n for n, _ in info.bounds)}}
        if run.status != "finished" or any(values[n] is None for n in names):
            continue
        if not feasible(values, dict(info.bounds)):
            run.pareto = INFEASIBLE
            continue
        if member.chance is not None and run.test_acc1 is not None and run.test_acc1 <= member.chance:  # a net that learned nothing is no trade-off
            run.pareto = AT_CHANCE
            continue
        scored.append((run, [values[n] for n in names]))
    mask = pareto_mask([point for _, point in scored], [up for _, up in info.objectives])
    for (run, _), on in zip(scored, mask):
        run.pareto = FRONT if on else ""


def _params_text(run: RunRecord, keys: tuple[str, ...]) -> str:
    """The searched values of a trial, from its overrides: ``flat_width=0.6261 alpha_gr=1e-05``."""
    found = {}
    for item in run.overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") in keys:
            try:
                value = f"{float(value):.4g}"
            except ValueError:
                pass
            found[key.lstrip("+~")] = value
    return " ".join(f"{k}={found[k]}" for k in keys if k in found)


def mark_trials(runs: Iterable[RunRecord]) -> None:
    """Set ``trial``, ``params`` and ``pareto`` on the runs that are trials of a search."""
    studies: dict[tuple[Any, ...], list[tuple[RunRecord, TrialInfo]]] = {}
    for run in runs:
        info = trial_info(Path(run.path))
        if info is None:
            continue
        run.trial, run.params = info.number, _params_text(run, info.params)
        studies.setdefault((info.study, info.objectives, info.bounds), []).append((run, info))
    for members in studies.values():
        _mark_study(members)
