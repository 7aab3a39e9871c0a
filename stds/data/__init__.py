"""Datasets (`datasets`: each a function returning `DatasetSplits(train, test)`, the ``_target_``
of a ``conf/dataset/`` file) and their loaders (`loaders`).

Every dataset is one `register_dataset` call: `DATASETS` is the list the config groups
(``dataset=<name>``) and the allowlist of saved configs (`stds.run.files.rebuild`) read.
"""

from typing import Any, Callable

from stds.data.datasets import DatasetSplits, cifar10, digits, fake, imagenet
from stds.registry import Buildable, Registry, config_node

DATASETS: Registry[Buildable] = Registry("dataset")


def register_dataset(name: str, target: Callable[..., DatasetSplits],
                     config: dict[str, Any] | None = None) -> Buildable:
    """Make ``target`` (a function returning `DatasetSplits`) a dataset of `stds`: one call.
    ``config`` (its ``_target_`` filled in; it needs ``num_classes``, ``in_channels`` and
    ``image_size``) becomes ``dataset=<name>``; a saved config may then name ``target``."""
    return DATASETS.add(name, Buildable(target, config_node(target, config)))


for _fn in (digits, cifar10, imagenet, fake):
    register_dataset(_fn.__name__, _fn)

__all__ = ["DATASETS", "DatasetSplits", "cifar10", "digits", "fake", "imagenet", "register_dataset"]
