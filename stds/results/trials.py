"""Trials of a search (``hparams_search=...``, ``hydra/sweeper=stds_optuna``) among collected runs.

A trial is a run directory whose ``.hydra/hydra.yaml`` names the study sweeper; its number is its
``hydra.sweep.subdir``, its objectives and constraints are the sweeper's (metric names of
``docs/metrics.md``). Trials of one study (one sweep directory with its SQLite study, or one
``storage`` and ``study_name``) are compared with each other: a finished trial that meets the
constraints and that no other such trial beats in every objective is on the Pareto front
(`stds.results.pareto`); a trial whose ``test_acc1`` is at chance (`chance_limit` of its classes:
a fully pruned net) is marked ``chance`` and never on the front, whatever its sparsity. The
searched parameters are the keys of ``hydra.sweeper.params`` and the command-line sweeps of the
sweep's ``multirun.yaml``. Everything is read as data (`stds.run.files.safe`: no symlink, no
interpolation resolved); nothing is instantiated. A trial whose ``hydra.yaml`` is refused or
holds a field of the wrong type is marked ``damaged``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from stds.results.pareto import Bound, feasible, pareto_mask
from stds.run.files.safe import UnsafeFileError, plain_value, read_yaml, select
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


def _load(path: Path, root: Path) -> dict[str, Any] | None:
    """A YAML file of the sweep as plain data (`stds.run.files.safe.read_yaml`); None if missing."""
    try:
        loaded = read_yaml(path, root)
    except FileNotFoundError:
        return None
    return loaded if isinstance(loaded, dict) else None


def _sweep_keys(sweep_dir: Path) -> list[str]:
    """Keys the sweep's command line searched (``x=interval(..)``, ``x=a,b``), from multirun.yaml
    (an override holding an interpolation is left out: nothing is resolved from a file)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _load(sweep_dir / "multirun.yaml", sweep_dir)
    task = select(cfg, "hydra.overrides.task") if cfg is not None else None
    listed = [str(o) for o in task if isinstance(o, str) and "${" not in o] if isinstance(task, list) else []
    try:
        parsed = OverridesParser.create().parse_overrides(listed)
    except Exception:  # noqa: BLE001 - a damaged multirun.yaml only loses the searched keys
        return []
    return [o.get_key_element() for o in parsed if o.is_sweep_override()]


def _bound(value: Any, where: str, source: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UnsafeFileError(f"{source}: {where} is {value!r}, not a finite number")
    return float(value)


def _bounds(raw: Any, source: Path) -> tuple[tuple[str, Bound], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise UnsafeFileError(f"{source}: hydra.sweeper.constraints is not a mapping of metric to bounds")
    out = []
    for name, spec in raw.items():
        spec = spec if isinstance(spec, dict) else {}
        where = f"hydra.sweeper.constraints.{name}"
        out.append((str(name), Bound(min=_bound(spec.get("min"), f"{where}.min", source),
                                     max=_bound(spec.get("max"), f"{where}.max", source))))
    return tuple(out)


def _number_of(subdir: Any) -> int | None:
    """The trial number a ``hydra.sweep.subdir`` names (``7``); None for any other name."""
    text = str(subdir) if isinstance(subdir, (str, int)) and not isinstance(subdir, bool) else ""
    return int(text) if text.isascii() and text.isdigit() else None


def trial_info(run_dir: Path) -> TrialInfo | None:
    """The trial a run directory is, or None if a search did not start it; `UnsafeFileError`
    (one line) when its ``hydra.yaml`` is refused or a field has the wrong type."""
    source = run_dir / ".hydra" / "hydra.yaml"
    cfg = _load(source, run_dir)
    if cfg is None or not str(plain_value(cfg, "hydra.sweeper._target_", source) or "").endswith(SWEEPER_CLASS):
        return None
    objectives = plain_value(cfg, "hydra.sweeper.objectives", source)
    if not isinstance(objectives, dict) or not objectives:
        return None
    sweep_dir = run_dir.parent
    params = plain_value(cfg, "hydra.sweeper.params", source) or {}
    if not isinstance(params, dict):
        raise UnsafeFileError(f"{source}: hydra.sweeper.params is not a mapping of key to search space")
    keys = [str(k) for k in params]
    keys += [k for k in _sweep_keys(sweep_dir) if k not in keys]
    storage, name = (plain_value(cfg, f"hydra.sweeper.{k}", source) for k in ("storage", "study_name"))
    return TrialInfo(
        study=(str(storage or sweep_dir.resolve()), str(name)),
        number=_number_of(plain_value(cfg, "hydra.sweep.subdir", source)),
        objectives=tuple((str(k), str(v) == "maximize") for k, v in objectives.items()),
        bounds=_bounds(plain_value(cfg, "hydra.sweeper.constraints", source), source), params=tuple(keys),
        chance=_chance(run_dir))


def _chance(run_dir: Path) -> float | None:
    """`chance_limit` for the run's ``dataset.num_classes`` (None when its config lacks it)."""
    source = run_dir / ".hydra" / "config.yaml"
    cfg = _load(source, run_dir)
    classes = plain_value(cfg, "dataset.num_classes", source) if cfg is not None else None
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
        try:
            info = trial_info(Path(run.path))
        except UnsafeFileError as exc:  # this run is marked; the others are reported
            run.status, run.error = "damaged", str(exc).replace(f"{run.path}{os.sep}", "")
            continue
        if info is None:
            continue
        run.trial, run.params = info.number, _params_text(run, info.params)
        studies.setdefault((info.study, info.objectives, info.bounds), []).append((run, info))
    for members in studies.values():
        _mark_study(members)
