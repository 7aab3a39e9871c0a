"""Datasets of the ``dataset`` config group; each function returns `DatasetSplits(train, test)`.

Every item is ``(float image tensor [C, H, W], int label)``. The keyword arguments
``num_classes``, ``in_channels`` and ``image_size`` are the meta keys the model configs read
(``${dataset.num_classes}`` ...); each function checks them against the data it loads and raises
`stds.errors.ConfigError` naming the key when they do not fit. Missing files raise
`stds.errors.DatasetNotFoundError` with a one-line message naming the path and the fix.
Relative roots are resolved by the caller.

- `digits`: the 1,797 8x8 handwritten digits bundled with scikit-learn (no download).
- `cifar10`: torchvision's CIFAR-10 files (``root/cifar-10-batches-py``).
- `imagenet`: ``ImageFolder`` trees ``root/train`` and ``root/val``.
- `fake`: torchvision ``FakeData``, seeded, of any shape and size.
"""

from __future__ import annotations

import codecs
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from stds.data.images import BadImages
from stds.errors import ConfigError, DatasetNotFoundError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSplits:
    """The training and test (validation) datasets of one dataset config."""

    train: Dataset
    test: Dataset
    bad_images: Any = None  # `stds.data.images.BadImages` of image folders: skipped files, limit


class TensorImages(Dataset):
    """Images ``[N, C, H, W]`` (float) and labels ``[N]`` held in memory; items ``(image, int)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.float()
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def _check_meta(name: str, given: dict[str, int], data: dict[str, int]) -> None:
    """Raise `ConfigError` for the first meta key whose config value differs from the data's."""
    for key, value in given.items():
        if value != data[key]:
            raise ConfigError(
                f"dataset.{key}={value} does not fit {name}, which has {key}={data[key]}; "
                f"set dataset.{key}={data[key]}"
            )


def digits(
    root: str | None = None,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 8,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> DatasetSplits:
    """The 1,797 8x8 grey-level digits of scikit-learn, scaled to [0, 1], split train/test.

    The split is stratified by class and fixed by ``split_seed``; ``test_fraction`` of the
    images (rounded up: 360 of 1,797 at 0.2) are the test set. ``root`` is unused (the data ship
    with scikit-learn).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    given = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    _check_meta("digits", given, dict(num_classes=10, in_channels=1, image_size=8))
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(
            f"dataset.test_fraction={test_fraction} is not valid; use a value in (0, 1)"
        )
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div(16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=split_seed,
        stratify=labels.numpy(),
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return DatasetSplits(
        TensorImages(images[train_idx], labels[train_idx]),
        TensorImages(images[test_idx], labels[test_idx]),
    )


class _ArrayClass:
    """What a batch's ``numpy.ndarray`` global unpickles to: only a token naming the class for
    `_empty_array`, never the class itself (``ndarray(shape)`` allocates any size uninitialised)."""


_ARRAY_CLASS = _ArrayClass()
_DTYPE_CODES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1"})


def _empty_array(subclass: Any, shape: Any, code: Any) -> np.ndarray:
    """numpy pickles every array as ``_reconstruct(ndarray, (0,), b'b')`` and then sets its state:
    the shape with the bytes themselves, which numpy refuses unless they are all there. Only that
    empty placeholder is built here, so an array's size is bounded by the file's bytes."""
    if subclass is not _ARRAY_CLASS or tuple(shape) != (0,) or code not in (b"b", "b"):
        raise pickle.UnpicklingError(f"it builds an array of shape {shape!r}, not numpy's placeholder; not loaded")
    return np.empty((0,), dtype=np.int8)


def _plain_dtype(code: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """A numeric dtype (``u1``, ``i8``, ...): no object, structured or void dtype is built."""
    if not isinstance(code, str) or code not in _DTYPE_CODES:
        raise pickle.UnpicklingError(f"it names the dtype {code!r}, which a batch never holds; not loaded")
    return np.dtype(code)


def _from_bytes(buffer: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    """An array of protocol 5 (``_frombuffer``): its bytes must be exactly ``shape`` x itemsize."""
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or dtype.kind == "O" \
            or not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape) \
            or math.prod(shape) * dtype.itemsize != len(buffer) or order not in ("C", "F"):
        raise pickle.UnpicklingError("it builds an array whose shape does not match its bytes; not loaded")
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape, order=order)


def _scalar(dtype: Any, data: Any) -> Any:
    """A numpy scalar (a label saved as ``np.int64``) from exactly its itemsize of bytes."""
    return _from_bytes(data, dtype, (1,))[0]


CIFAR10_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _ARRAY_CLASS, ("numpy", "dtype"): _plain_dtype, ("_codecs", "encode"): codecs.encode,
    ("numpy.core.multiarray", "_reconstruct"): _empty_array,
    ("numpy._core.multiarray", "_reconstruct"): _empty_array,
    ("numpy.core.multiarray", "scalar"): _scalar, ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _from_bytes, ("numpy._core.numeric", "_frombuffer"): _from_bytes,
}
"""The only globals a CIFAR-10 batch file may name, each mapped to what it unpickles to: numpy
arrays are built only as an empty placeholder whose state must carry all its bytes (no callable
allocates from the pickle's numbers), numeric dtypes only, and the byte-string helper of
protocol-2 pickles. Everything else is refused before it is looked up."""

_BATCH_MAX_BYTES = 64 * 2**20  # a published batch is 31 MB


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain builtins and numeric numpy arrays only: the CIFAR-10 batch format IS a
    pickle, and `pickle.load` (as torchvision's reader uses) runs whatever a planted file names."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in CIFAR10_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a batch never holds; not loaded")
        return CIFAR10_PICKLE_GLOBALS[module, name]


class CIFAR10BatchError(DatasetNotFoundError):
    """A CIFAR-10 file that is not a batch (why: ``reason``), found when the dataset is opened."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(
            f"{path} is not a CIFAR-10 batch ({reason}); delete {path.parent} and set "
            "dataset.download=true, or set dataset.root=<a good copy>"
        )


def _unpickle_batch(path: Path) -> Any:
    """The object in ``path``, read by `_BatchUnpickler` (latin1 for the published files,
    written by Python 2); `CIFAR10BatchError` if it cannot be read that way."""
    size = path.stat().st_size
    if size == 0:
        raise CIFAR10BatchError(path, "an empty file")
    if size > _BATCH_MAX_BYTES:
        raise CIFAR10BatchError(path, f"{size} bytes, more than a batch holds")
    try:
        with open(path, "rb") as handle:
            return _BatchUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        reason = str(exc) if str(exc).startswith("it ") else "not a pickle: UnpicklingError"
        raise CIFAR10BatchError(path, reason) from None
    except Exception as exc:  # any other failure of the unpickler means the file is damaged
        raise CIFAR10BatchError(path, f"not a pickle: {type(exc).__name__}") from None


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """Images ``[n, 32, 32, 3]`` (uint8, HWC) and labels of one batch file, checked: a dict with
    ``data`` (uint8 ``[n, 3072]``) and ``labels`` (n integers in 0..9); else `CIFAR10BatchError`."""
    batch = _unpickle_batch(path)
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise CIFAR10BatchError(path, "a pickle without the data and labels of a batch")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise CIFAR10BatchError(path, f"data of shape {shape} and dtype {getattr(data, 'dtype', type(data).__name__)}, "
                                      "not [n, 3072] uint8 (3x32x32 images)")
    labels = np.asarray(batch["labels"])
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise CIFAR10BatchError(path, "labels that are not a list of integers")
    if len(labels) != len(data):
        raise CIFAR10BatchError(path, f"{len(labels)} labels for {len(data)} images")
    bad = labels[(labels < 0) | (labels >= 10)]
    if bad.size:
        raise CIFAR10BatchError(path, f"label {int(bad[0])} outside 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), [int(v) for v in labels]


def read_cifar10_classes(path: Path) -> list[str]:
    """The ten class names of ``batches.meta`` (``label_names``), checked like a batch."""
    meta = _unpickle_batch(path)
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != 10 or not all(isinstance(n, str) for n in names):
        raise CIFAR10BatchError(path, "a meta file without the ten label_names")
    return names


def cifar10(
    root: str,
    download: bool = False,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
) -> DatasetSplits:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (the python version of the dataset).

    Train: random crop 32 with padding 4, horizontal flip, normalisation with the CIFAR-10 mean
    (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010); test: normalisation only.
    ``download=True`` fetches the archive into ``root`` when the files are missing.
    """
    from torchvision import transforms

    from stds.data.vision import CIFAR10Files

    given = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    _check_meta("cifar10", given, dict(num_classes=10, in_channels=3, image_size=32))
    folder = Path(root) / CIFAR10Files.base_folder
    if Path(root).exists() and not Path(root).is_dir():
        raise DatasetNotFoundError(
            f"dataset.root={root} is a file, not a folder; set dataset.root=<folder holding "
            "cifar-10-batches-py> or dataset.download=true"
        )
    expected = [name for name, _ in CIFAR10Files.train_list + CIFAR10Files.test_list]
    missing = [name for name in expected + [CIFAR10Files.meta["filename"]]
               if not (folder / name).is_file()]
    if missing and not download:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}; "
            f"set dataset.root=<folder holding cifar-10-batches-py> or dataset.download=true"
        )
    normalise = [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    train = CIFAR10Files(root, train=True, transform=transforms.Compose(augment + normalise),
                          download=download)
    test = CIFAR10Files(root, train=False, transform=transforms.Compose(normalise))
    return DatasetSplits(train, test)


def _image_folder(folder: Path, transform: Any, bad_images: BadImages) -> Dataset:
    from stds.data.vision import ImageFiles

    fix = "set dataset.root=<folder holding train/<class>/*.JPEG and val/<class>/*.JPEG>"
    if not folder.is_dir():
        raise DatasetNotFoundError(f"ImageNet folder {folder} not found; {fix}")
    try:
        return ImageFiles(str(folder), transform, bad_images)
    except FileNotFoundError as exc:  # no class folder, or class folders without images
        raise DatasetNotFoundError(f"ImageNet folder {folder} holds no images ({exc}); {fix}") from None


def imagenet(
    root: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    bad_images: str = "error",
    max_bad_images: int = 100,
) -> DatasetSplits:
    """ImageNet as two ``ImageFolder`` trees: ``root/train/<class>/*`` and ``root/val/<class>/*``.

    An image that does not decode stops the run in one line naming it (``bad_images=error``), or
    is replaced by the next good one, named once in the log and in ``metrics.jsonl``
    (``bad_images=skip``), until more than ``max_bad_images`` were skipped (`stds.data.images`).

    Train: ``RandomResizedCrop(image_size)``, horizontal flip; val: resize the short side to
    ``image_size * 256 / 224`` (256 at 224), centre crop ``image_size``; both normalised with the
    ImageNet mean and std. The number of class folders must equal ``num_classes``, and the two
    trees must hold the same classes.
    """
    from torchvision import transforms

    if in_channels != 3:
        raise ConfigError(f"dataset.in_channels={in_channels} does not fit imagenet (RGB); set 3")
    normalise = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    val_tf = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    bad = BadImages(bad_images, max_bad_images, root)
    train = _image_folder(Path(root) / "train", transforms.Compose(train_tf + normalise), bad)
    val = _image_folder(Path(root) / "val", transforms.Compose(val_tf + normalise), bad)
    _check_meta("imagenet", dict(num_classes=num_classes), dict(num_classes=len(train.classes)))
    if val.classes != train.classes:
        raise ConfigError(
            f"dataset.root={root}: val/ holds other class folders than train/; use the same classes"
        )
    return DatasetSplits(train, val, bad)


def fake(
    train_size: int = 256,
    test_size: int = 64,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    seed: int = 0,
) -> DatasetSplits:
    """Random images (torchvision ``FakeData``) for benchmarks and smoke runs.

    Image ``i`` and its label depend only on ``seed`` and ``i`` (the test images are seeded past
    the training ones), so every call gives the same data. ``ToTensor`` only: pixels in [0, 1].
    """
    from torchvision import datasets, transforms

    shape = (in_channels, image_size, image_size)

    def split(size: int, offset: int) -> Dataset:
        return datasets.FakeData(size=size, image_size=shape, num_classes=num_classes,
                                 transform=transforms.ToTensor(), random_offset=offset)

    return DatasetSplits(split(train_size, seed), split(test_size, seed + train_size))
