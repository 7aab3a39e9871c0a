"""The report's columns: `COLUMNS`, one `Column` per column, in the order they are shown.

``report.csv`` holds every column with ``csv=True`` (raw values), ``report.md`` every column with
``md=True`` (formatted cells), the Markdown table dropping a column that ``shown`` says no run has.
A column of your own is one `register_column` call; its value is read from each run's
``metrics.json`` (``metric=``) or computed from the `RunRecord` (``value=``). The built-in columns'
names are those of ``docs/metrics.md`` (``tests/test_report.py`` checks that each is described there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from stds.registry import Registry
from stds.results.record import RunRecord


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def plain(value: Any) -> str:
    if isinstance(value, str) or value is None:
        return value or "-"
    return f"{value:g}"


def si(value: float | None) -> str:
    """``3287052.0`` -> ``3.29M``: three significant digits and k / M / G / T."""
    if value is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


@dataclass(frozen=True)
class Column:
    """One report column: its raw value per run, its Markdown cell, where it is shown."""

    name: str
    value: Callable[[RunRecord], Any]
    cell: Callable[[Any], str] = plain
    csv: bool = True
    md: bool = True
    shown: Callable[[list[RunRecord]], bool] | None = None  # report.md: only when this holds
    header: str | None = None  # report.md's header, where it differs from the name
    last: bool = False  # report.md: after every other column (the trial's place and the status)

    @property
    def title(self) -> str:
        return self.header or self.name


COLUMNS: Registry[Column] = Registry("report column")


def _metric_value(name: str) -> Callable[[RunRecord], Any]:
    def value(run: RunRecord) -> Any:
        found = run.metrics.get(name)
        return found if isinstance(found, (int, float, str)) and not isinstance(found, bool) else None

    return value


def register_column(name: str, value: Callable[[RunRecord], Any] | None = None, *, metric: str | None = None,
                    cell: Callable[[Any], str] = plain, csv: bool = True, md: bool = True,
                    shown: Callable[[list[RunRecord]], bool] | None = None, header: str | None = None,
                    last: bool = False) -> Column:
    """Add a report column: one call. Its value is ``value(run)`` or, with ``metric=``, that
    number or string of the run's ``metrics.json`` (empty where a run has none)."""
    if (value is None) == (metric is None):
        raise ValueError(f"register_column({name!r}): give exactly one of value= or metric=")
    return COLUMNS.add(name, Column(name, value or _metric_value(str(metric)), cell, csv, md, shown, header, last))


def _field(name: str) -> Callable[[RunRecord], Any]:
    return lambda run: getattr(run, name)


def _any_target(runs: list[RunRecord]) -> bool:
    return any(run.target_sparsity is not None for run in runs)


def _any_trial(runs: list[RunRecord]) -> bool:
    return any(run.pareto is not None or run.trial is not None for run in runs)


def _status(run: RunRecord) -> str:
    return f"{run.status}: {run.error}" if run.status in ("failed", "damaged") else run.status


_energy = _metric_value("energy_uj")

_BUILT_IN: list[tuple[str, dict[str, Any]]] = [
    # "run" is the path relative to the report's directory: filled in by stds.results.tables
    ("run", {"value": lambda run: str(run.path)}), ("status", {"md": False}), ("error", {"md": False}),
    ("trial", {"cell": lambda v: "-" if v is None else str(v), "shown": _any_trial}),
    ("params", {"shown": _any_trial}), ("pareto", {"md": False}),
    ("dataset", {}), ("model", {}), ("method", {}), ("flat_width", {}), ("alpha_gr", {}),
    ("target_sparsity", {"cell": percent, "shown": _any_target}), ("T", {}), ("epoch", {}),
    ("epochs_planned", {"cell": lambda v: "?" if v is None else str(v)}),
    ("test_acc1", {"cell": percent}), ("best_test_acc1", {"cell": percent}), ("best_epoch", {"md": False}),
    ("test_acc5", {"cell": percent}), ("sparsity", {"cell": percent}), ("connectivity", {"cell": percent}),
    ("d", {}), ("synops", {"cell": si}), ("first_layer_macs", {"cell": si}),
    ("energy_uj", {"value": _energy, "cell": lambda v: "-" if v is None else f"{v:.4g}",
                   "shown": lambda runs: any(_energy(run) is not None for run in runs)}),
    ("firing_rate_mean", {"cell": lambda v: "-" if v is None else f"{v:.4f}"}),
    ("firing_rates", {"md": False, "value": lambda run: json.dumps(run.firing_rates) if run.firing_rates else None}),
    ("warnings", {"md": False, "value": lambda run: json.dumps(run.warnings) if run.warnings else None}),
    ("overrides", {"md": False, "value": lambda run: "; ".join(run.overrides)}),
]
for _name, _options in _BUILT_IN:
    register_column(_name, _options.pop("value", _field(_name)), **_options)
# report.md ends with the trial's place on the front and the status (its failure's reason inline)
register_column("pareto_md", _field("pareto"), csv=False, shown=_any_trial, header="pareto", last=True)
register_column("status_md", _status, csv=False, header="status", last=True)
