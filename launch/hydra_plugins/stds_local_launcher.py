"""``hydra/launcher=local`` under the name Hydra requires of a launcher.

Hydra instantiates launchers only from classes defined in the ``hydra_plugins`` namespace
package, which it scans at start-up. ``launch/`` is on ``sys.path`` whenever
``launch/train.py`` (or ``torchrun launch/train.py``) runs, so this directory is part of that
namespace there. The work is in `stds.cli.launcher`; the jobs themselves never import this module.
"""

from stds.cli.launcher import LocalSweepLauncher as _SharedCpuLauncher


class LocalSweepLauncher(_SharedCpuLauncher):
    """`stds.cli.launcher.LocalSweepLauncher`, registered as a Hydra plugin."""
