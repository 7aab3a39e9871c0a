"""The files of one run directory read as data, every field checked for its type.

Each file is read by `stds.run.files.safe` (no symlink, regular files only, a size cap, YAML as
plain data). A field of the wrong type, a refused file, an interpolation in a config value the
report shows, or a ``metrics.json`` cut mid-write raises `UnsafeFileError` with one line naming
the file and the key: `stds.results.collect.read_run` marks that run ``damaged`` with it and
reports the others.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stds.run.files.safe import UnsafeFileError, plain_value, read_json, read_text, read_yaml


def _kind(value: Any) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def number(record: dict[str, Any], key: str, source: Path) -> float | None:
    """``record[key]`` as a float: absent or null -> None, non-finite -> None, a non-number
    (a boolean, string, list) -> `UnsafeFileError` naming ``key`` and ``source``."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnsafeFileError(f"{source}: {key} is {_kind(value)}, not a number")
    return float(value) if math.isfinite(value) else None


def whole(record: dict[str, Any], key: str, source: Path) -> int | None:
    """``record[key]`` as an int (a float must be whole); None if absent, null or non-finite."""
    value = number(record, key, source)
    if value is not None and value != int(value):
        raise UnsafeFileError(f"{source}: {key} is {value!r}, not a whole number")
    return None if value is None else int(value)


def warnings_of(record: dict[str, Any], source: Path) -> list[str]:
    """``warnings``: a list of strings (or one string), each on one line."""
    listed = record.get("warnings") or []
    if isinstance(listed, str):
        listed = [listed]
    if not isinstance(listed, list) or not all(isinstance(w, str) for w in listed):
        raise UnsafeFileError(f"{source}: warnings is {_kind(listed)}, not a list of strings")
    return [" ".join(w.split()) for w in listed if w.strip()]


def rates_of(record: dict[str, Any], source: Path) -> dict[str, float]:
    """``firing_rates``: a mapping of layer name to a number (null entries left out)."""
    rates = record.get("firing_rates") or {}
    if not isinstance(rates, dict):
        raise UnsafeFileError(f"{source}: firing_rates is {_kind(rates)}, not a mapping of layer to rate")
    out = {}
    for layer in rates:
        value = number(rates, layer, source)
        if value is not None:
            out[str(layer)] = value
    return out


def config_number(cfg: Any, key: str, source: Path) -> float | None:
    """A number of the run's config (YAML may hold ``1e-5`` as text): None if absent."""
    value = plain_value(cfg, key, source)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UnsafeFileError(f"{source}: config key {key} is {value[:40]!r}, not a number") from None
    return number({key: value}, key, source)


def config_text(cfg: Any, key: str, source: Path) -> str | None:
    """A string of the run's config (a ``_target_``, a method name); None if absent."""
    value = plain_value(cfg, key, source)
    if value is not None and not isinstance(value, str):
        raise UnsafeFileError(f"{source}: config key {key} is {_kind(value)}, not a string")
    return value


@dataclass
class RunFiles:
    """What a run directory holds: config and overrides (``.hydra/``), ``metrics.json``
    (``final``, None if absent), the ``metrics.jsonl`` records, ``hydra.yaml`` and the first line
    of ``error.txt``."""

    config: dict[str, Any] | None
    overrides: list[str]
    final: dict[str, Any] | None
    history: list[dict[str, Any]]
    hydra: Any
    error: str | None


def _optional(reader: Any, path: Path, root: Path) -> Any:
    try:
        return reader(path, root)
    except FileNotFoundError:
        return None


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    listed = _optional(read_yaml, path, run_dir) or []
    if not isinstance(listed, list) or not all(isinstance(item, (str, int, float)) for item in listed):
        raise UnsafeFileError(f"{path} is not a list of overrides")
    kept = [str(item) for item in listed if not str(item).startswith("hydra.")]
    for index, item in enumerate(kept):
        if "${" in item:
            raise UnsafeFileError(f"{path}: override {index} holds an interpolation; nothing is resolved from a file")
    return kept


def _history(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line cut by a kill (unparsable) is skipped."""
    text = _optional(read_text, run_dir / "metrics.jsonl", run_dir) or ""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # cut by a kill, or not ours
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_files(run_dir: Path) -> RunFiles:
    """The files of ``run_dir`` (`UnsafeFileError` when one is refused or damaged)."""
    config_path = run_dir / ".hydra" / "config.yaml"
    config = _optional(read_yaml, config_path, run_dir)
    if config is not None and not isinstance(config, dict):
        raise UnsafeFileError(f"{config_path} is not a mapping of config keys")
    final = _optional(read_json, run_dir / "metrics.json", run_dir)
    if final is not None and not isinstance(final, dict):
        raise UnsafeFileError(f"{run_dir / 'metrics.json'} is {_kind(final)}, not a JSON object")
    error_text = _optional(read_text, run_dir / "error.txt", run_dir)
    lines = [line.strip() for line in (error_text or "").splitlines() if line.strip()]
    error = None if error_text is None else (lines[0] if lines else "unknown error")
    hydra = _optional(read_yaml, run_dir / ".hydra" / "hydra.yaml", run_dir)
    return RunFiles(config, _overrides(run_dir), final, _history(run_dir), hydra, error)
