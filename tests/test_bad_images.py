"""Image files that do not decode (`stds.data.images`): named in one line in training and in
evaluation, with and without loader workers; skipped and counted with ``dataset.bad_images=skip``;
listed by ``launch/check_data.py``. The epoch's checkpoint is written before its evaluation."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import stds.run.life.loop as loop_module
from tests.conftest import HANG_S, REPO, run_history
from stds.data import datasets as data
from stds.data.images import BadImages, check_files
from stds.data.vision import image_files
from stds.data.loaders import LoaderOptions, eval_loader, train_loader
from stds.errors import ConfigError, DataError
from stds.run.files import checkpoint as ckpt
from stds.run.life.trainer import train


def _all_batches(loader) -> list:
    """``list(loader)``, whose worker processes are ended as soon as a batch fails. Left to garbage
    collection, a failed iterator (held by its exception's traceback) is shut down only when the
    cycle is collected, in a later test, after its queues were finalized: torch then waits its
    5 s status interval for each worker that never gets the stop signal. ``_shutdown_workers`` is
    the method torch's own ``__del__`` calls."""
    iterator = iter(loader)
    try:
        return list(iterator)
    except BaseException:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # absent without worker processes
        if shutdown is not None:
            shutdown()
        raise


def _jpeg(size=(20, 16), colour=(200, 100, 50)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


def write_folder(root: Path, per_class: int = 4, bad_in: str | None = "train") -> dict[str, Path]:
    """root/{train,val}/{a,b}/<i>.JPEG of real JPEGs; in ``bad_in``, class a's image 1 is cut
    in half and class b's image 2 is random bytes. Returns those two paths."""
    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i}.JPEG").write_bytes(_jpeg(colour=(200 * c, 20 * i, 50)))
    if bad_in is None:
        return {}
    truncated, garbage = root / bad_in / "a" / "1.JPEG", root / bad_in / "b" / "2.JPEG"
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    garbage.write_bytes(bytes(range(256)) * 4)
    return {"truncated": truncated, "garbage": garbage}


def test_the_planted_files_really_do_not_decode(tmp_path):
    bad = write_folder(tmp_path)
    for path in bad.values():
        with pytest.raises(Exception):
            Image.open(path).convert("RGB")
    Image.open(tmp_path / "train" / "a" / "0.JPEG").convert("RGB")  # the others do


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("split", ["train", "val"])
def test_a_bad_image_is_one_line_naming_the_file(tmp_path, workers, split):
    bad = write_folder(tmp_path, bad_in=split)
    splits = data.imagenet(str(tmp_path), num_classes=2, image_size=8)
    dataset = splits.train if split == "train" else splits.test
    options = LoaderOptions(num_workers=workers)
    loader = (train_loader(dataset, 8, options, seed=0) if split == "train"
              else eval_loader(dataset, 8, options))
    with pytest.raises(DataError) as caught:
        _all_batches(loader)
    line = str(caught.value)
    assert "\n" not in line and "Traceback" not in line and len(line) < 600
    named = [p for p in bad.values() if str(p) in line]
    assert len(named) == 1 and "does not decode" in line and "dataset.bad_images=skip" in line


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_replaces_bad_images_and_names_each_once(tmp_path, workers, caplog):
    bad = write_folder(tmp_path)
    splits = data.imagenet(str(tmp_path), num_classes=2, image_size=8, bad_images="skip")
    loader = train_loader(splits.train, 8, LoaderOptions(num_workers=workers), seed=0)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches = _all_batches(loader)
        assert [images.shape for images, _ in batches] == [torch.Size([8, 3, 8, 8])]
        named = splits.bad_images.drain()
        assert sorted(named) == (sorted(str(p) for p in bad.values()) if epoch == 0 else [])
    warned = [r.getMessage() for r in caplog.records if "does not decode" in r.getMessage()]
    assert len(warned) == 2 and all(any(str(p) in w for w in warned) for p in bad.values())


def test_skip_uses_the_next_good_sample_of_the_folder(tmp_path):
    bad = write_folder(tmp_path)
    splits = data.imagenet(str(tmp_path), num_classes=2, image_size=8, bad_images="skip")
    samples = [path for path, _ in splits.train.samples]
    index = samples.index(str(bad["truncated"]))  # a/1 -> a/2; b/2 -> b/3
    torch.manual_seed(0)
    replaced, label = splits.train[index]
    torch.manual_seed(0)
    expected, expected_label = splits.train[index + 1]
    assert torch.equal(replaced, expected) and label == expected_label == 0


def test_more_bad_images_than_allowed_stop_in_one_line(tmp_path):
    write_folder(tmp_path)
    splits = data.imagenet(str(tmp_path), num_classes=2, image_size=8, bad_images="skip", max_bad_images=1)
    with pytest.raises(DataError, match=r"2 images under .* did not decode .* more than dataset.max_bad_images=1"):
        _all_batches(train_loader(splits.train, 8, LoaderOptions(), seed=0))
    splits = data.imagenet(str(tmp_path), num_classes=2, image_size=8, bad_images="skip", max_bad_images=1)
    with pytest.raises(DataError, match="more than dataset.max_bad_images=1"):
        # a worker that skipped both stops; workers that skipped one each are stopped by drain
        _all_batches(train_loader(splits.train, 4, LoaderOptions(num_workers=2), seed=0))
        splits.bad_images.drain()


def test_bad_image_settings_are_checked():
    with pytest.raises(ConfigError, match="dataset.bad_images='ignore'"):
        BadImages("ignore")
    with pytest.raises(ConfigError, match="dataset.max_bad_images=-1"):
        BadImages("skip", -1)


IMAGENET = ("dataset=imagenet", "dataset.num_classes=2", "dataset.image_size=8", "model=digits_net",
            "batch_size=4", "epochs=2", "logging.synops=false", "logging.log_every_steps=1")


@pytest.mark.slow
def test_skip_in_a_run_lists_the_files_in_the_epoch_record(tiny_cfg, tmp_path):
    bad = write_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    train(tiny_cfg(*IMAGENET, f"dataset.root={tmp_path / 'data'}", "dataset.bad_images=skip"), run_dir)
    records = run_history(run_dir)
    assert sorted(records[0]["bad_images"]) == sorted(str(p) for p in bad.values())
    assert records[1]["bad_images"] == []


@pytest.mark.slow
def test_a_bad_val_image_fails_after_the_checkpoint_and_resume_only_evaluates(tiny_cfg, tmp_path):
    bad = write_folder(tmp_path / "data", bad_in="val")
    cfg = tiny_cfg(*IMAGENET, f"dataset.root={tmp_path / 'data'}")
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=str(bad["truncated"]).replace(".", r"\.") + "|" + str(bad["garbage"])):
        train(cfg, run_dir)
    state = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["step"] == 2 and state["pending_eval"] is not None
    assert "DataError" in (run_dir / "error.txt").read_text()
    for path in bad.values():  # the user replaces the files
        path.write_bytes(_jpeg())
    calls = []
    real = loop_module.train_step
    loop_module.train_step = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        train(cfg, run_dir)
    finally:
        loop_module.train_step = real
    assert len(calls) == 2  # epoch 2 only: epoch 1 was evaluated, not trained again
    assert [(r["epoch"], r["step"]) for r in run_history(run_dir)] == [(1, 2), (2, 4)]


@pytest.mark.slow
def test_check_data_lists_the_bad_files(tmp_path):
    bad = write_folder(tmp_path / "data")
    done = subprocess.run([sys.executable, str(REPO / "launch" / "check_data.py"), "dataset=imagenet",
                           f"dataset.root={tmp_path / 'data'}", "--workers=2"],
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 1, done.stderr
    listed = [line for line in done.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert sorted(line.split(": ", 1)[0] for line in listed) == sorted(str(p) for p in bad.values())
    assert "2 of 16 image files do not decode" in done.stdout
    for path in bad.values():
        path.write_bytes(_jpeg())
    done = subprocess.run([sys.executable, str(REPO / "launch" / "check_data.py"), "dataset=imagenet",
                           f"dataset.root={tmp_path / 'data'}"], capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0 and "all 16 image files decode" in done.stdout


def test_check_files_in_parallel(tmp_path):
    bad = write_folder(tmp_path)
    paths = image_files([tmp_path / "train", tmp_path / "val"])
    assert len(paths) == 16
    found = check_files(paths, workers=2, progress=False)
    assert [p for p, _ in found] == sorted(str(p) for p in bad.values())
    assert all(reason for _, reason in found)
