"""Where a study lives and how it is opened: the storage URL (shown without its password), the
study itself (created, or checked to be for the same objectives) and its sampler."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import optuna

from stds.cli.jobs import reason
from stds.cli.study.settings import PREFIX, SearchSettings
from stds.errors import ConfigError, StdsError, one_line
from stds.run.life.study_link import SPEC_ATTR

__all__ = ["STUDY_FILE", "check_storage", "default_storage", "make_sampler", "open_study", "shown_url"]

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


def check_storage(url: str) -> None:
    """Refuse, in one line and before anything is written, a storage URL that does not parse and
    a SQLite study file that is empty (it would silently start a new study)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(f"{PREFIX}.storage is not a database URL SQLAlchemy reads ({_scrubbed(url)}); give "
                          "e.g. sqlite:////abs/path/study.db or mysql+pymysql://user@host/db") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        path = Path(parsed.database)
        if path.is_file() and path.stat().st_size == 0:
            raise StdsError(f"{path} is empty, not a study; delete it to start a new study there, or "
                            "restore the study file")


def _scrubbed(url: str) -> str:
    """A URL that does not parse, with whatever stands between ``://user:`` and ``@`` hidden."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, at, host = rest.rpartition("@")
    return f"{head}://{userinfo.split(':', 1)[0]}{':***' if ':' in userinfo else ''}@{host}"


def _rdb(settings: SearchSettings, url: str) -> optuna.storages.RDBStorage:
    """The study's database with Optuna's heartbeat: a trial whose heartbeat stopped for
    ``grace_s`` is failed by `optuna.storages.fail_stale_trials` and retried up to ``max_retry``
    times. The retry continues the failed trial's run (`stds.cli.study.driver`), so it also takes
    the epochs that run reported to the pruner."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry, inherit_intermediate_values=True)
        return RDBStorage(url, heartbeat_interval=settings.heartbeat_s, grace_period=settings.grace_s,
                          heartbeat_stale_trial_callback=retry)


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
    study = _created_or_loaded(settings, storage)
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
    study.set_user_attr(SPEC_ATTR, settings.trial_spec.to_attr())  # what its trials read (the pruner may change)
    return study


def _created_or_loaded(settings: SearchSettings, storage: str, tries: int = 5) -> optuna.Study:
    """`optuna.create_study` with ``load_if_exists``. Optuna creates a new database's tables by
    checking which exist, then creating them: two processes opening one new database at once (two
    searches on a shared study, a reader polling it) can both find a table missing, and the slower
    fails with "table ... already exists" although the schema is now whole. That error is retried
    (the next open finds every table); any other is one line."""
    for attempt in range(tries):
        try:
            return optuna.create_study(storage=_rdb(settings, storage), study_name=settings.study_name,
                                       directions=list(settings.objectives.values()), load_if_exists=True)
        except Exception as exc:
            if "already exists" in str(exc) and attempt + 1 < tries:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise StdsError(f"cannot open the study {settings.study_name!r} in {PREFIX}.storage="
                            f"{shown_url(storage)}: {reason(exc)}") from exc
    raise AssertionError("unreachable: the last try raises")


def _describe(what: Mapping[str, Any]) -> str:
    constraints = what.get("constraints") or []
    return ", ".join(what.get("objectives") or ["?"]) + (f" where {', '.join(constraints)}" if constraints else "")


