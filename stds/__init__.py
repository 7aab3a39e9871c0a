"""stds: sparse spiking neural networks trained with STDS and Grad R.

The method works on any PyTorch model and needs torch only; these names are what users import::

    from stds import sparsify, sparsity, ThresholdSchedule, attach_gradr_prior

Packages, each importing only those listed after it (``docs/architecture.md``):
``stds.cli`` (command line) -> ``stds.results`` (reports, export) -> ``stds.run`` (a run built
from its config: loop, checkpoints, resume) -> ``stds.models``, ``stds.data`` -> ``stds.method``
(reparameterizations, threshold schedules, the Grad R prior) -> ``stds.errors``.
"""

from stds.method import (
    GradRPrior,
    TargetSparsitySchedule,
    ThresholdSchedule,
    attach_gradr_prior,
    make_reparam,
    pruned_layers,
    pruned_parameters,
    sparsify,
    sparsity,
    threshold_at,
)

__version__ = "0.1.0"

__all__ = [
    "GradRPrior", "TargetSparsitySchedule", "ThresholdSchedule", "attach_gradr_prior", "make_reparam",
    "pruned_layers", "pruned_parameters", "sparsify", "sparsity", "threshold_at",
]
