"""Where a study lives and how it is opened: the storage URL (shown without its password), the
study itself (created, or checked to be for the same objectives) and its sampler."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import optuna

from stds.cli.study.outcome import reason
from stds.cli.study.settings import PREFIX, SearchSettings
from stds.errors import ConfigError, StdsError, one_line

__all__ = ["STUDY_FILE", "default_storage", "make_sampler", "open_study", "shown_url"]

STUDY_FILE = "study.db"


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
                        f"{reason(exc)}") from exc
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


