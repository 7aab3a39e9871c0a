"""Check a dataset before a long run: ``python launch/check_data.py dataset=imagenet dataset.root=DIR
[--workers=N]``.

Takes the same ``dataset=...`` overrides as ``launch/train.py`` (composed by Hydra from ``conf/``).
For an image-folder dataset (imagenet) every file of ``train/`` and ``val/`` is decoded as training
decodes it, in N processes (default: the CPUs) with a progress bar; the files that do not decode
are listed, one ``path: why`` line each, and the exit status is 1. Other datasets are opened,
which checks their files (CIFAR-10: shapes, label counts and ranges). The work is in
`stds.data.images`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from stds.cli.entry import print_error
from stds.data.images import check_files
from stds.data.vision import image_files
from stds.errors import StdsError
from stds.run.setup.config import instantiate_node, register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"


def _dataset(overrides: list[str]) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides).dataset


def _check_folders(root: Path, workers: int) -> int:
    paths = image_files([root / "train", root / "val"])
    print(f"decoding {len(paths)} image files under {root} in {workers} processes", flush=True)
    bad = check_files(paths, workers=workers, progress=sys.stderr.isatty())
    for path, reason in bad:
        print(f"{path}: {reason}")
    if bad:
        print(f"{len(bad)} of {len(paths)} image files do not decode; remove or replace them, or train "
              "with dataset.bad_images=skip")
        return 1
    print(f"all {len(paths)} image files decode")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Decode every file of a dataset and list the bad ones.")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="decoding processes (default: the CPUs this process may use)")
    args, overrides = parser.parse_known_args(argv)
    try:
        dataset = _dataset(overrides)
        if str(dataset.get("_target_", "")).rsplit(".", 1)[-1] == "imagenet":
            root = Path(str(dataset.root)).expanduser()
            if not (root / "train").is_dir() or not (root / "val").is_dir():
                raise StdsError(f"dataset.root={root} lacks train/ or val/; set dataset.root=<the image folders>")
            return _check_folders(root, max(args.workers, 1))
        splits = instantiate_node(dataset, "dataset")
        print(f"{dataset._target_}: {len(splits.train)} training and {len(splits.test)} test samples; "
              "the files are read and checked")
        return 0
    except Exception as exc:  # noqa: BLE001 - Hydra's composition errors and ours: one line
        print_error(exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
