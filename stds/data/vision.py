"""The datasets built on torchvision's classes, imported only when such a dataset is opened.

torchvision's import takes more than a second (it loads ``torch._dynamo``), so `stds.data` and
every run on the digits import it only through this module, from the functions that need it
(`stds.data.datasets.cifar10`, ``imagenet`` and ``fake``; ``launch/check_data.py``).

- `CIFAR10Files`: CIFAR-10's batch files read by `stds.data.datasets.read_cifar10_batch`.
- `ImageFiles`: ImageNet-style folders whose bad images follow ``dataset.bad_images``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from torchvision import datasets

from stds.data.datasets import read_cifar10_batch, read_cifar10_classes
from stds.data.images import BadImages, _check_hint, decode
from stds.errors import DataError, one_line


class CIFAR10Files(datasets.CIFAR10):
    """torchvision's CIFAR-10 dataset (its items, transforms and download) with its own reading.

    The batch files are pickles: torchvision unpickles them with `pickle.load`, which would run
    code a planted file names, and checks their md5 on every build (178 MB hashed; a small copy in
    the real format, as the tests write, is refused). Here each file is read by a restricted
    unpickler and checked as it is opened (`read_cifar10_batch`: shapes, label count and range),
    so a bad file fails in one line naming it, not with a traceback in epoch 1. The archive fetched
    by ``download=True`` is still verified against its md5.
    """

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}

    def __init__(self, root: str, train: bool = True, transform: Any = None, download: bool = False) -> None:
        datasets.VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        if download:
            self.download()
        folder = Path(self.root) / self.base_folder
        images, self.targets = [], []
        for name, _ in self.train_list if train else self.test_list:
            data, labels = read_cifar10_batch(folder / name)
            images.append(data)
            self.targets.extend(labels)
        self.data = np.concatenate(images)
        self.classes = read_cifar10_classes(folder / self.meta["filename"])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def class_files(directory: str, class_to_idx: dict[str, int], extensions: Any = None,
                is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image file under each class folder, as torchvision's
    ``make_dataset`` lists them, except that a directory symlink below a class folder is not
    followed: torchvision walks with ``followlinks=True``, so a link to a parent folder (a loop)
    counted the same files again and again."""
    valid = is_valid_file or (lambda path: datasets.folder.has_file_allowed_extension(path, extensions))
    samples, found = [], set()
    for name in sorted(class_to_idx):
        for root, _, files in sorted(os.walk(os.path.join(directory, name))):  # followlinks=False
            for file in sorted(files):
                path = os.path.join(root, file)
                if valid(path) and os.path.isfile(path):
                    samples.append((path, class_to_idx[name]))
                    found.add(name)
    empty = sorted(set(class_to_idx) - found)
    if empty and not allow_empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
    return samples


class ImageFiles(datasets.ImageFolder):
    """``ImageFolder`` whose files that do not decode are named (``error``) or skipped (``skip``),
    and whose walk does not follow directory symlinks (`class_files`)."""

    make_dataset = staticmethod(class_files)

    def __init__(self, root: str, transform: Any, bad_images: BadImages) -> None:
        super().__init__(root, transform=transform)
        self.bad_images = bad_images

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Sample ``index``; with ``skip``, the next sample (in file order) that decodes."""
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = decode(path)
            except Exception as exc:  # noqa: BLE001 - any decode failure names the file
                reason = f"{type(exc).__name__}: {one_line(exc)}"
                if self.bad_images.policy == "error":
                    raise DataError(
                        f"image {path} does not decode ({reason}); remove or replace it, or set "
                        f"dataset.bad_images=skip; {_check_hint(self.bad_images.root)}"
                    ) from None
                self.bad_images.skipped(path, reason)
                continue
            return (self.transform(image) if self.transform else image), target
        raise DataError(f"no image under {self.root} decodes; {_check_hint(self.bad_images.root)}")


def image_files(folders: Iterable[Path]) -> list[str]:
    """The files `ImageFiles` of each folder reads (its extensions, class folders, no directory
    symlink followed)."""
    paths: list[str] = []
    for folder in folders:
        _, class_to_idx = datasets.folder.find_classes(str(folder))
        paths += [path for path, _ in class_files(str(folder), class_to_idx, datasets.folder.IMG_EXTENSIONS)]
    return paths
