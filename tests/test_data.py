"""Datasets: the embedded digits, CIFAR-10 and ImageFolder files on disk, fake data, configs."""

import pickle
import random
from collections import Counter

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision import datasets

from tests.conftest import compose_train
from stds.data import datasets as data
from stds.errors import ConfigError, DatasetNotFoundError

# ---------------------------------------------------------------- digits


def test_digits_are_the_scikit_learn_images_split_80_20():
    splits = data.digits()
    assert (len(splits.train), len(splits.test)) == (1437, 360)  # 1,797 images, ceil(0.2 * 1797) test
    image, label = splits.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and isinstance(label, int)
    images = splits.train.images
    assert images.min() == 0.0 and images.max() == 1.0
    assert torch.all((images * 16) == (images * 16).round())  # grey levels 0..16 scaled by 1/16
    # stratified: each class holds 174..183 images, so 35..37 of them are test images
    test_counts = Counter(splits.test.labels.tolist())
    assert sorted(test_counts) == list(range(10)) and set(test_counts.values()) <= {35, 36, 37}


def test_digits_split_is_fixed_by_its_seed():
    first, again, other = data.digits(), data.digits(), data.digits(split_seed=1)
    assert torch.equal(first.test.images, again.test.images)
    assert not torch.equal(first.test.images, other.test.images)
    # the split is a partition: no test image is also in the training set
    train = {tuple(x.flatten().tolist()) for x in first.train.images}
    shared = sum(tuple(x.flatten().tolist()) in train for x in first.test.images)
    assert shared <= 2  # the digits hold a few exact duplicates, never more than that


@pytest.mark.parametrize("key, value", [("in_channels", 3), ("image_size", 32), ("num_classes", 100)])
def test_digits_refuse_meta_keys_that_do_not_fit(key, value):
    with pytest.raises(ConfigError, match=f"dataset.{key}={value}"):
        data.digits(**{key: value})


# ---------------------------------------------------------------- CIFAR-10 on disk


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_tiny_cifar10(root, per_batch=2, test=3):
    """CIFAR-10's python format: 5 training batches, a test batch, batches.meta (pickled dicts).

    Image k of the training set is one colour (R, G, B) = (k, 2k, 3k); label k % 10. Test image k
    is (255, 0, 128) with label 9 - k.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(5):
        ks = range(b * per_batch, (b + 1) * per_batch)
        rows = [np.repeat(np.array([k, 2 * k, 3 * k], dtype=np.uint8), 1024) for k in ks]
        _pickle(folder / f"data_batch_{b + 1}",
                {"batch_label": f"training batch {b + 1} of 5", "data": np.stack(rows),
                 "labels": [k % 10 for k in ks], "filenames": [f"{k}.png" for k in ks]})
    rows = [np.repeat(np.array([255, 0, 128], dtype=np.uint8), 1024) for _ in range(test)]
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": np.stack(rows),
                                    "labels": [9 - k for k in range(test)]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072, "num_cases_per_batch": 2})


def test_tiny_cifar10_loads_through_torchvision(tmp_path):
    write_tiny_cifar10(tmp_path)
    splits = data.cifar10(str(tmp_path))
    assert isinstance(splits.train, datasets.CIFAR10) and isinstance(splits.test, datasets.CIFAR10)
    assert (len(splits.train), len(splits.test)) == (10, 3)
    assert splits.train.targets == [k % 10 for k in range(10)] and splits.test.classes[9] == "truck"
    image, label = splits.test[1]
    assert image.shape == (3, 32, 32) and label == 8
    want = [(1.0 - 0.4914) / 0.2023, (0.0 - 0.4822) / 0.1994, (128 / 255 - 0.4465) / 0.2010]
    torch.testing.assert_close(image[:, 5, 7], torch.tensor(want))
    # training images are cropped with 4 pixels of zero padding: the colour, or black at the edge
    torch.manual_seed(0)
    image, label = splits.train[7]
    assert image.shape == (3, 32, 32) and label == 7
    colour = (torch.tensor([7.0, 14.0, 21.0]) / 255 - torch.tensor(data.CIFAR10_MEAN)) / torch.tensor(data.CIFAR10_STD)
    black = -torch.tensor(data.CIFAR10_MEAN) / torch.tensor(data.CIFAR10_STD)
    torch.testing.assert_close(image[:, 16, 16], colour)
    pixels = image.permute(1, 2, 0).reshape(-1, 3)
    is_colour = torch.isclose(pixels, colour).all(1)
    is_black = torch.isclose(pixels, black).all(1)
    assert torch.all(is_colour | is_black)


def test_missing_cifar10_is_one_line_naming_the_path_and_the_fix(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        data.cifar10(str(root))
    message = str(info.value)
    assert "\n" not in message and str(root / "cifar-10-batches-py") in message
    assert "dataset.root=" in message and "dataset.download=true" in message


@pytest.mark.parametrize("content, why", [
    (random.Random(0).randbytes(5000), "not a pickle: UnpicklingError"),
    (b"", "an empty file"),
    (b"not a pickle", "not a pickle: UnpicklingError"),
    (pickle.dumps({"batch_label": "x", "images": []}), "a pickle without the data and labels of a batch"),
    (pickle.dumps([1, 2, 3]), "a pickle without the data and labels of a batch"),
])
def test_damaged_cifar10_batch_is_one_line_naming_the_file(tmp_path, content, why):
    write_tiny_cifar10(tmp_path)
    damaged = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    damaged.write_bytes(content)
    with pytest.raises(DatasetNotFoundError) as info:
        data.cifar10(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{damaged} is not a CIFAR-10 batch ({why}); delete ")
    assert message.endswith("set dataset.download=true, or set dataset.root=<a good copy>")


def _batch(n=4, labels=None, data=None):
    rows = np.zeros((n, 3072), dtype=np.uint8) if data is None else data
    return {"batch_label": "x", "data": rows, "labels": list(range(n)) if labels is None else labels}


@pytest.mark.parametrize("batch, why", [
    (_batch(labels=[0, 1, 2]), "3 labels for 4 images"),
    (_batch(labels=[0, 1, 10, 2]), "label 10 outside 0..9"),
    (_batch(labels=[0, -1, 2, 3]), "label -1 outside 0..9"),
    (_batch(labels=["a", "b", "c", "d"]), "labels that are not a list of integers"),
    (_batch(data=np.zeros((4, 1024), dtype=np.uint8)), "data of shape (4, 1024) and dtype uint8, not [n, 3072] uint8"),
    (_batch(data=np.zeros((4, 3072), dtype=np.float32)), "data of shape (4, 3072) and dtype float32, not [n, 3072]"),
])
def test_cifar10_batch_content_is_checked_when_opened_naming_the_file(tmp_path, batch, why):
    write_tiny_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    _pickle(bad, batch)
    with pytest.raises(DatasetNotFoundError) as info:
        data.cifar10(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{bad} is not a CIFAR-10 batch (") and why in message


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("name", ["data_batch_1", "test_batch", "batches.meta"])
def test_a_malicious_cifar10_file_runs_no_code(tmp_path, name):
    write_tiny_cifar10(tmp_path)
    marker = tmp_path / "ran"
    path = tmp_path / "cifar-10-batches-py" / name
    _pickle(path, {"data": _Touch(marker), "labels": [0]})
    with pytest.raises(DatasetNotFoundError, match=r"it names (posix|os)\.system, which a batch never holds"):
        data.cifar10(str(tmp_path))
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Touch(marker)))  # the payload is real
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_batches_of_either_pickle_protocol_load(tmp_path, protocol):
    write_tiny_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    labels = np.array([3, 1, 4], dtype=np.int64)  # numpy labels (scalars on unpickling) load too
    rows = np.stack([np.full(3072, k, dtype=np.uint8) for k in (10, 20, 30)])
    with open(path, "wb") as f:
        pickle.dump({"data": rows, "labels": labels}, f, protocol=protocol)
    test = data.cifar10(str(tmp_path)).test
    assert test.targets == [3, 1, 4] and test.data.shape == (3, 32, 32, 3) and int(test.data[2, 5, 5, 1]) == 30


def test_cifar10_root_that_is_a_file_or_empty_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetNotFoundError, match=f"dataset.root={tmp_path / 'afile'} is a file, not a folder"):
        data.cifar10(str(tmp_path / "afile"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10 not found: .* lacks data_batch_1, "):
        data.cifar10(str(tmp_path / "empty"))


def test_cifar10_refuses_grey_images(tmp_path):
    with pytest.raises(ConfigError, match="dataset.in_channels=1"):
        data.cifar10(str(tmp_path), in_channels=1)


# ---------------------------------------------------------------- ImageFolder on disk


def write_tiny_imagenet(root, classes=("n01", "n02"), per_class=2):
    """root/{train,val}/<class>/<i>.JPEG, 48x40 RGB images of one colour per class."""
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (48, 40), (200 * c, 100, 50)).save(folder / f"{i}.JPEG", "JPEG")


def test_tiny_imagenet_tree_loads_with_its_transforms(tmp_path):
    write_tiny_imagenet(tmp_path)
    splits = data.imagenet(str(tmp_path), num_classes=2, image_size=32)
    assert isinstance(splits.train, datasets.ImageFolder) and splits.train.classes == ["n01", "n02"]
    assert (len(splits.train), len(splits.test)) == (4, 4)
    image, label = splits.test[3]
    assert image.shape == (3, 32, 32) and label == 1
    # a one-colour JPEG stays (nearly) one colour: (200, 100, 50) normalised with ImageNet's stats
    want = (torch.tensor([200.0, 100.0, 50.0]) / 255 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    torch.testing.assert_close(image.mean(dim=(1, 2)), want, atol=0.05, rtol=0)
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and label == 0
    val_resize = splits.test.transform.transforms[0]
    assert val_resize.size == 37  # 32 * 256 / 224, as 256 for 224


def test_imagenet_default_sizes_are_224_and_256(tmp_path):
    write_tiny_imagenet(tmp_path, classes=("a",), per_class=1)
    splits = data.imagenet(str(tmp_path), num_classes=1)
    assert splits.train[0][0].shape == (3, 224, 224) and splits.test[0][0].shape == (3, 224, 224)
    assert splits.test.transform.transforms[0].size == 256


def test_imagenet_names_the_missing_folder(tmp_path):
    write_tiny_imagenet(tmp_path)
    for path in (tmp_path / "val").rglob("*"):
        if path.is_file():
            path.unlink()
    for folder in sorted((tmp_path / "val").glob("*")):
        folder.rmdir()
    (tmp_path / "val").rmdir()
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'val'} not found.*dataset.root="):
        data.imagenet(str(tmp_path), num_classes=2)


def test_imagenet_class_count_must_fit_num_classes(tmp_path):
    write_tiny_imagenet(tmp_path)
    with pytest.raises(ConfigError, match="dataset.num_classes=1000.*set dataset.num_classes=2"):
        data.imagenet(str(tmp_path))


def test_imagenet_train_folder_missing_or_empty_is_one_line(tmp_path):
    write_tiny_imagenet(tmp_path)
    for path in (tmp_path / "train").rglob("*.JPEG"):
        path.unlink()  # class folders without images
    with pytest.raises(DatasetNotFoundError, match=f"ImageNet folder {tmp_path / 'train'} holds no images "
                                                   r"\(Found no valid file for the classes n01, n02"):
        data.imagenet(str(tmp_path), num_classes=2)
    for folder in (tmp_path / "train").iterdir():
        folder.rmdir()  # no class folder at all
    with pytest.raises(DatasetNotFoundError, match="holds no images .*set dataset.root=") as info:
        data.imagenet(str(tmp_path), num_classes=2)
    assert "\n" not in str(info.value)
    (tmp_path / "train").rmdir()
    with pytest.raises(DatasetNotFoundError, match=f"ImageNet folder {tmp_path / 'train'} not found"):
        data.imagenet(str(tmp_path), num_classes=2)


# ---------------------------------------------------------------- fake


def test_fake_data_has_the_configured_shape_and_is_seeded():
    splits = data.fake(train_size=5, test_size=3, num_classes=4, in_channels=1, image_size=12)
    assert (len(splits.train), len(splits.test)) == (5, 3)
    image, label = splits.train[2]
    assert image.shape == (1, 12, 12) and isinstance(label, int) and 0 <= label < 4
    assert image.min() >= 0 and image.max() <= 1
    again = data.fake(train_size=5, test_size=3, num_classes=4, in_channels=1, image_size=12)
    assert torch.equal(again.train[2][0], image)
    assert not torch.equal(splits.test[0][0], splits.train[0][0])
    other_seed = data.fake(train_size=5, test_size=3, in_channels=1, image_size=12, seed=9)
    assert not torch.equal(other_seed.train[2][0], image)
    assert data.fake(in_channels=3, image_size=40).train[0][0].shape == (3, 40, 40)


# ---------------------------------------------------------------- configs


def test_every_dataset_config_instantiates(tmp_path):
    write_tiny_cifar10(tmp_path / "cifar")
    write_tiny_imagenet(tmp_path / "imagenet")
    roots = {
        "digits": (),
        "fake": ("dataset.train_size=4", "dataset.test_size=2"),
        "cifar10": (f"dataset.root={tmp_path / 'cifar'}",),
        "imagenet": (f"dataset.root={tmp_path / 'imagenet'}", "dataset.num_classes=2",
                     "dataset.image_size=32"),
    }
    for name, overrides in roots.items():
        cfg = compose_train(f"dataset={name}", *overrides)
        splits = instantiate(cfg.dataset)
        image, label = splits.test[0]
        size = cfg.dataset.image_size
        assert image.shape == (cfg.dataset.in_channels, size, size), name
        assert 0 <= label < cfg.dataset.num_classes, name


def test_dataset_configs_hold_the_meta_keys_and_defaults():
    expect = {"digits": (10, 1, 8), "cifar10": (10, 3, 32), "imagenet": (1000, 3, 224), "fake": (10, 3, 32)}
    for name, meta in expect.items():
        cfg = compose_train(f"dataset={name}").dataset
        assert (cfg.num_classes, cfg.in_channels, cfg.image_size) == meta
    assert compose_train("dataset=cifar10").dataset.download is False
    assert compose_train("dataset=cifar10").dataset.root == "data/cifar10"
    assert compose_train("dataset=imagenet").dataset.root == "data/imagenet"
