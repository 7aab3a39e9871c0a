"""``hydra/sweeper=stds_optuna`` under the name Hydra requires of a sweeper.

Hydra instantiates sweepers only from classes defined in the ``hydra_plugins`` namespace package,
which it scans at start-up; ``launch/`` is on ``sys.path`` whenever ``launch/train.py`` runs. The
work is in `stds.cli.sweeper` and `stds.cli.study`.
"""

from stds.cli.sweeper import OptunaSweeper as _StudySweeper


class OptunaSweeper(_StudySweeper):
    """`stds.cli.sweeper.OptunaSweeper`, registered as a Hydra plugin."""
