"""``hydra/sweeper=stds_optuna``: Hydra's sweeper over an Optuna study (`stds.cli.study.driver.Search`).

The presets ``hparams_search=frontier|frontier_gradr|constrained|at_sparsity`` select it. Each trial is one
normal training run in ``<sweep dir>/<trial number>``, started by whichever Hydra launcher the
command chose (``local``, ``submitit_local``, ``slurm``), ``n_jobs`` at a time. See
``docs/search.md``.

Why not ``hydra-optuna-sweeper``: its last release (1.3.0) requires ``optuna<3`` (2.10), whose
database storage fails with SQLAlchemy 2 (measured: ``create_study`` with SQLite raises an
AssertionError); it runs only with SQLAlchemy 1.4 and alembic < 1.14 pinned. This plugin uses the
current Optuna's ask-and-tell API instead.

Hydra takes sweepers only from the ``hydra_plugins`` namespace: the preset names
``hydra_plugins.stds_optuna_sweeper.OptunaSweeper``, this class under that name, in
``launch/hydra_plugins/`` (on ``sys.path`` whenever ``launch/train.py`` runs).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from stds.cli.study.driver import Search
from stds.cli.study.queue import job_tag, tagged_comment
from stds.cli.study.settings import (
    SearchSettings,
    constraints_from,
    objectives_from,
    search_space,
)
from stds.cli.study.storage import shown_url
from stds.errors import ConfigError
from stds.run.measure.health import chance_limit
from stds.run.setup.config import validate

log = logging.getLogger(__name__)

__all__ = ["OptunaSweeper"]


def _plain(node: Any) -> Any:
    """A config node as plain Python values (the sweeper's arguments may be DictConfigs)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _count(value: Any, key: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"hydra.sweeper.{key}={value!r} must be an integer >= {least}")
    return value


class OptunaSweeper(Sweeper):
    """Searches the config with an Optuna study; trials are launched by the configured launcher."""

    def __init__(self, objectives: Mapping[str, str] | None = None, constraints: Mapping[str, Any] | None = None,
                 params: Mapping[str, Any] | None = None, sampler: Mapping[str, Any] | None = None,
                 storage: str | None = None, study_name: str = "search", n_trials: int = 20,
                 n_jobs: int = 2, pruner: Mapping[str, Any] | None = None, heartbeat_s: int = 60,
                 grace_s: int = 600, max_retry: int = 1) -> None:
        self.raw = {k: _plain(v) for k, v in dict(objectives=objectives, constraints=constraints,
                                                     params=params, sampler=sampler, pruner=pruner).items()}
        self.timing = {"heartbeat_s": _count(heartbeat_s, "heartbeat_s", 1),
                       "grace_s": _count(grace_s, "grace_s", 2), "max_retry": _count(max_retry, "max_retry", 0)}
        self.storage = storage
        self.study_name = str(study_name)
        self.n_trials = _count(n_trials, "n_trials", 0)
        self.n_jobs = _count(n_jobs, "n_jobs", 1)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def settings(self, arguments: Sequence[str]) -> tuple[SearchSettings, list[str]]:
        """The checked search settings and the overrides every trial gets."""
        space, fixed = search_space(self.raw["params"], arguments)
        settings = SearchSettings(
            objectives=objectives_from(self.raw["objectives"]),
            constraints=constraints_from(self.raw["constraints"]), space=space,
            study_name=self.study_name, storage=self.storage or None,
            n_trials=self.n_trials, n_jobs=self.n_jobs, pruner=self.raw["pruner"], **self.timing)
        return settings, fixed

    def _chance(self) -> float | None:
        """The highest test_acc1 that is chance for the searched dataset (no trial there is on the front)."""
        assert self.config is not None
        classes = OmegaConf.select(self.config, "dataset.num_classes", default=None)
        return chance_limit(classes) if isinstance(classes, int) and classes > 1 else None

    def _check_trial_configs(self, batch: Sequence[Sequence[str]]) -> None:
        """Compose each trial's overrides as its job will, and run the run's own config checks on
        the result (those that do not look at this machine's files), so that a config no trial
        can run with (``scheduler=target`` without ``target_sparsity``) fails before the first."""
        assert self.config is not None and self.hydra_context is not None
        for overrides in batch:
            composed = self.hydra_context.config_loader.load_sweep_config(
                master_config=self.config, sweep_overrides=list(overrides))
            validate(composed, files=False)

    def sweep(self, arguments: list[str]) -> list[dict[str, Any]]:
        assert self.config is not None and self.launcher is not None
        settings, fixed = self.settings(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        slots = settings.n_jobs
        if isinstance(self.launcher, BasicLauncher) and slots > 1:
            # it runs each trial inside this process: Hydra's job state and torch's random state are
            # the process's own, so two trials at once on two threads would share them
            log.info("n_jobs=%d, but hydra/launcher=basic runs trials in this process: one at a time "
                     "(hydra/launcher=local runs %d at once)", slots, slots)
            slots = 1
        elif hasattr(self.launcher, "points_at_once"):  # the local launcher: at most as many as the CPUs allow
            slots = self.launcher.points_at_once(settings.n_jobs)
            if slots < settings.n_jobs:
                log.info("n_jobs=%d, but the CPUs here run %d trials at a time: %d in flight",
                         settings.n_jobs, slots, slots)
        # hydra-submitit-launcher's SLURM launcher, by the submitit cluster it submits to (Hydra's
        # plugin scan loads its module again, so a class imported here is not the one it built)
        slurm = getattr(self.launcher, "_EXECUTOR", None) == "slurm" and isinstance(self.launcher.params, dict)
        search = Search(settings, sweep_dir, fixed, self._tagged_launch(sweep_dir) if slurm else self.launcher.launch,
                        sampler=self.raw["sampler"], validate=self._check_trial_configs, slots=slots,
                        chance=self._chance(), slurm_jobs=slurm, in_process=isinstance(self.launcher, BasicLauncher),
                        on_start=lambda: OmegaConf.save(self.config, sweep_dir / "multirun.yaml"))
        log.info("Search %r: %d trials in all, %d at a time, study in %s; trials in %s/<trial>",
                 settings.study_name, settings.n_trials, slots, shown_url(search.storage), search.sweep_dir)
        return search.run()

    def _tagged_launch(self, sweep_dir: Path) -> Any:
        """The SLURM launcher's ``launch``, each trial's job given its `job_tag` in its comment
        (``hydra.launcher.comment`` kept before it), so a later search finds the job in the queue
        even if it never started. Each trial gets a copy of the launcher: trials launch on threads."""
        def launch(job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
            launcher = copy.copy(self.launcher)
            tag = job_tag(sweep_dir.resolve(), initial_job_idx)  # the job index is the trial number
            comment = tagged_comment(self.launcher.params.get("comment"), tag)
            launcher.params = {**self.launcher.params, "comment": comment}
            return launcher.launch(job_overrides, initial_job_idx)
        return launch
