"""Datasets (`datasets`: each a function returning `DatasetSplits(train, test)`, the ``_target_``
of a ``conf/dataset/`` file) and their loaders (`loaders`)."""

from stds.data.datasets import DatasetSplits, cifar10, digits, fake, imagenet

__all__ = ["DatasetSplits", "cifar10", "digits", "fake", "imagenet"]
