"""The method: sparse reparameterizations of the pruned weights (`sparse`), the threshold d
over training (`schedule`), the Grad R prior (`gradr`) and the magnitude-pruning baseline (`gmp`).

Torch only: nothing here imports Hydra, OmegaConf or the run machinery, so it prunes any PyTorch
model (``tests/test_layout.py`` holds this).
"""

from stds.method.gmp import MagnitudeMask, MagnitudePruningSchedule
from stds.method.gradr import GradRPrior, attach_gradr_prior
from stds.method.schedule import ThresholdSchedule, threshold_at
from stds.method.target import TargetSparsitySchedule
from stds.method.sparse import make_reparam, pruned_layers, pruned_parameters, sparsify, sparsity

__all__ = [
    "GradRPrior", "MagnitudeMask", "MagnitudePruningSchedule", "TargetSparsitySchedule", "ThresholdSchedule", "attach_gradr_prior", "make_reparam",
    "pruned_layers", "pruned_parameters", "sparsify", "sparsity", "threshold_at",
]
