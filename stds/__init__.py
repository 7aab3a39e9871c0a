"""stds: sparse spiking neural networks trained with STDS and Grad R."""

__version__ = "0.1.0"
