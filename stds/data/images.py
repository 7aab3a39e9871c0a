"""Image files that do not decode: named in one line, or skipped and counted (``dataset.bad_images``).

Images are decoded as torchvision's ``ImageFolder`` decodes them (PIL, converted to RGB), so a
run's pixels do not change: `torchvision.io.decode_image` returns tensors, which the PIL
transforms of `stds.data.datasets.imagenet` (RandomResizedCrop, ToTensor) do not take, and it
would decode some files differently (CMYK, palette images). PIL refuses a truncated JPEG
(``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off) and names a garbage file, which is what is checked.

- `stds.data.vision.ImageFiles` (beside torchvision, which this module does not import): an
  ``ImageFolder`` whose decode failure is a `stds.errors.DataError` naming the file
  (``bad_images=error``), or whose bad file is replaced by the next good one and reported to its
  `BadImages` (``bad_images=skip``).
- `BadImages`: the policy, the limit ``max_bad_images``, and the files skipped, collected from
  the loader workers through a queue; `BadImages.drain` (training process) returns the files not
  named before, logs each once, and stops the run in one line past the limit.
- `check_files`: every file decoded in parallel with a progress bar (``launch/check_data.py``).
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image
from torch.utils.data import get_worker_info

from stds.errors import ConfigError, DataError, one_line

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")


def decode(path: str | Path) -> Image.Image:
    """The RGB image in ``path``, decoded as ``ImageFolder``'s default loader does."""
    with open(path, "rb") as handle:
        image = Image.open(handle)
        return image.convert("RGB")


def why_not_decoded(path: str | Path) -> str | None:
    """None if ``path`` decodes, else ``Type: message`` of the failure (one line)."""
    try:
        decode(path)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return f"{type(exc).__name__}: {one_line(exc)}"
    return None


def _check_hint(root: str | Path) -> str:
    return f"python launch/check_data.py dataset=imagenet dataset.root={root} lists every bad file"


class BadImages:
    """What to do with an image that does not decode, and the files skipped so far.

    Shared by a run's training and validation folders. Each process reports a file once
    (`skipped`): the training process to a list, a loader worker through a queue; `drain` (in the
    training process) gathers both.
    """

    def __init__(self, policy: str = "error", limit: int = 100, root: str | Path = "") -> None:
        if policy not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"dataset.bad_images={policy!r} is not valid; use {' or '.join(BAD_IMAGE_POLICIES)}")
        if limit < 0:
            raise ConfigError(f"dataset.max_bad_images={limit} must be >= 0")
        self.policy, self.limit, self.root = policy, limit, root
        self.seen: dict[str, str] = {}  # training process: every file skipped -> why
        self._queue = multiprocessing.SimpleQueue()  # loader workers -> training process
        self._here: list[tuple[str, str]] = []  # reported in the training process itself
        self._reported: set[str] = set()  # reported by this process (once each)

    def _too_many(self, count: int, path: str) -> DataError:
        return DataError(
            f"{count} images under {self.root} did not decode (the last {path}), more than "
            f"dataset.max_bad_images={self.limit}; the data looks damaged: {_check_hint(self.root)}, "
            "or raise dataset.max_bad_images"
        )

    def skipped(self, path: str, reason: str) -> None:
        """Report ``path`` (once per process); past the limit in this process alone, stop."""
        if path in self._reported:
            return
        self._reported.add(path)
        if get_worker_info() is None:
            self._here.append((path, reason))
        else:
            self._queue.put((path, reason))
        if len(self._reported) > self.limit:
            raise self._too_many(len(self._reported), path)

    def drain(self) -> list[str]:
        """The files skipped since the last call and never named before (each logged once);
        `DataError` once more than ``limit`` files were skipped in all."""
        reports, self._here = self._here, []
        while not self._queue.empty():
            reports.append(self._queue.get())
        new = []
        for path, reason in reports:
            if path not in self.seen:
                self.seen[path] = reason
                new.append(path)
                log.warning("skipped image %s, which does not decode (%s)", path, reason)
        if len(self.seen) > self.limit:
            raise self._too_many(len(self.seen), new[-1] if new else next(reversed(self.seen)))
        return new


def check_files(paths: list[str], workers: int = 1, progress: bool = True) -> list[tuple[str, str]]:
    """``(path, why)`` of every file in ``paths`` that does not decode, in the order given;
    decoded by ``workers`` processes, with a progress bar on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    chunk = max(1, min(256, len(paths) // (8 * max(workers, 1)) or 1))
    with bar, ProcessPoolExecutor(max_workers=max(workers, 1)) as pool:
        results = []
        for reason in pool.map(why_not_decoded, paths, chunksize=chunk):
            results.append(reason)
            bar.update(1)
    return [(path, reason) for path, reason in zip(paths, results) if reason is not None]
