"""Hydra callbacks of the training entrypoint (``hydra.callbacks`` in ``conf/train.yaml``).

`TidySweepDir` removes, once a sweep has ended, the empty folders submitit leaves under the sweep
directory: ``.submitit/%j`` is made for the unresolved job-id pattern of ``submitit_folder`` and
never holds anything (every job writes under its own id). Hydra calls ``on_multirun_end`` only
after a sweep whose points all succeeded, so the sweep directory is also remembered when the sweep
starts and `tidy_started_sweeps` (called by `stds.cli.entry.run_hydra_main` however the sweep
ended) tidies it after a failed point too.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def remove_empty_pattern_folders(folder: Path) -> list[Path]:
    """Delete the empty sub-folders of ``folder`` whose names still hold a submitit pattern
    (``%j``, ``%A_%a``, ...); returns what went. Folders with files in them stay."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        if "%" in path.name and path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):  # not empty
                path.rmdir()
                removed.append(path)
    return removed


_STARTED: list[Path] = []
"""Sweep directories of this process whose sweep started (for `tidy_started_sweeps`)."""


def tidy_started_sweeps() -> list[Path]:
    """`remove_empty_pattern_folders` on ``<sweep dir>/.submitit`` of every sweep started here."""
    removed = []
    while _STARTED:
        removed += remove_empty_pattern_folders(_STARTED.pop() / ".submitit")
    return removed


class TidySweepDir(Callback):
    """After a sweep: `remove_empty_pattern_folders` on ``<sweep dir>/.submitit``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _STARTED.append(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        remove_empty_pattern_folders(Path(str(config.hydra.sweep.dir)) / ".submitit")
