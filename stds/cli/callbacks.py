"""Hydra callbacks of the training entrypoint (``hydra.callbacks`` in ``conf/train.yaml``).

`TidySweepDir` removes, once a sweep has ended, the empty folders submitit leaves under the sweep
directory: ``.submitit/%j`` is made for the unresolved job-id pattern of ``submitit_folder`` and
never holds anything (every job writes under its own id). Hydra calls it only after a sweep
whose points all succeeded; `stds.cli.launcher.LocalSweepLauncher` tidies after every sweep.
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


class TidySweepDir(Callback):
    """After a sweep: `remove_empty_pattern_folders` on ``<sweep dir>/.submitit``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        remove_empty_pattern_folders(sweep_dir / ".submitit")
