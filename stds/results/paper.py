"""Published points the report draws beside runs of the same setting."""

PAPER_CIFAR10_STDS: tuple[tuple[float, float, float], ...] = (
    # (D, final test top-1, final sparsity) from the published CIFAR-10 training logs of
    # Chen et al. (ICML 2022): STDS, sine schedule, T=8, the 6-conv/2-fc net, 2048 epochs
    (1.0, 0.9249, 0.9536),
    (2.0, 0.9249, 0.9777),
    (3.0, 0.9164, 0.9860),
    (4.0, 0.9106, 0.9901),
    (5.0, 0.9021, 0.9925),
)
PAPER_LABEL = "Chen et al. 2022 logs (STDS-sine, T=8, 2048 epochs)"
PAPER_SETTING = ("cifar10", "CIFAR10Net")
"""(dataset, model) of runs next to which the published points are drawn."""
