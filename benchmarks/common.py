"""What the benchmark scripts share: the real training config composed from ``conf/`` and the
machine's load, as ``uptime`` prints it.

The scripts import this module as ``common`` (Python puts a script's own folder first on its
path), so they run from a checkout as ``python benchmarks/<script>.py`` and depend on ``stds``
alone, never on ``tests``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def compose(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` with ``overrides``, checked against the schema as ``launch/train.py`` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from stds.run.setup.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def uptime() -> str:
    """The load averages, as ``uptime`` prints them (every timing is reported with them)."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
