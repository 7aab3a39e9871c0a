"""The one way `stds` reads a file from a run or sweep directory, and opens one to append or lock.

Run and sweep directories sit on shared file systems, so a file in one may be a planted symlink, a
FIFO, a huge or half-written file, or hold interpolations. A read here:

- opens the file with ``O_NOFOLLOW`` (a symlink at the name is refused, never followed), and
  refuses a file whose folder resolves outside ``root`` (a symlinked ``.hydra/`` or ``.submitit/``);
- reads only a regular file (``fstat`` on the open descriptor: no FIFO, device or directory),
  of at most ``limit`` bytes (`READ_LIMIT`; logs are read by their tail);
- parses JSON and YAML as plain data (`yaml.safe_load`: no tags, no OmegaConf, so no resolver can
  run), with `interpolation_in` to find any ``${`` a caller must refuse.

A refusal is an `UnsafeFileError` (a `StdsError`): one line naming the file and why. Appends and
lock files are opened with ``O_NOFOLLOW`` and must be one regular file with one link
(`open_append`, `open_lock`); everything else is written by `stds.run.files.atomic.write_atomic`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import sys
from pathlib import Path
from typing import IO, Any, Iterator

import yaml

from stds.errors import StdsError, one_line

READ_LIMIT = 64 * 2**20
"""The largest file a reader takes whole (a long run's ``metrics.jsonl`` is a few MB)."""

_MAX_NODES = 200_000  # a YAML alias bomb expands to more nodes than any config holds


class UnsafeFileError(StdsError, OSError):
    """A file of a run or sweep directory that is refused or damaged (names it and why)."""


def inside(path: Path | str, root: Path | str) -> bool:
    """Whether ``path``, with every symlink resolved, lies in ``root`` (resolved likewise)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _open_regular(path: Path, root: Path | str) -> int:
    """A read descriptor on ``path``: a regular file inside ``root`` that is no symlink."""
    if not inside(path.parent, root):
        raise UnsafeFileError(f"{path}: its folder leads outside {root} through a symlink; not read")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeFileError(f"{path} is a symlink; files of a run directory are read only as "
                                  "regular files: replace it with the file itself") from None
        raise UnsafeFileError(f"{path} cannot be read ({exc.strerror or one_line(exc)})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFileError(f"{path} is not a regular file; not read")
    return fd


def read_bytes(path: Path | str, root: Path | str, limit: int = READ_LIMIT) -> bytes:
    """The bytes of ``path`` (see the module doc); `FileNotFoundError` if it is missing,
    `UnsafeFileError` if it is refused or larger than ``limit``."""
    path = Path(path)
    fd = _open_regular(path, root)
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UnsafeFileError(f"{path} holds {size} bytes, more than the {limit} a reader takes; not read")
        return handle.read(limit + 1)[:limit]


def open_binary(path: Path | str, root: Path | str) -> IO[bytes]:
    """``path`` opened to read bytes of any size (a checkpoint, for ``torch.load`` or streamed to a
    copy): a regular file inside ``root`` that is no symlink, as `read_bytes` checks it, without
    its size limit."""
    fd = _open_regular(Path(path), root)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_text(path: Path | str, root: Path | str, limit: int = READ_LIMIT) -> str:
    """`read_bytes` decoded as UTF-8 (undecodable bytes replaced)."""
    return read_bytes(path, root, limit).decode("utf-8", errors="replace")


def read_tail(path: Path | str, root: Path | str, size: int) -> str:
    """The last ``size`` bytes of ``path`` as text (a log of any length), checked as `read_bytes`."""
    path = Path(path)
    with os.fdopen(_open_regular(path, root), "rb") as handle:
        handle.seek(max(os.fstat(handle.fileno()).st_size - size, 0))
        return handle.read(size).decode("utf-8", errors="replace")


def first_line(path: Path | str, root: Path | str) -> str | None:
    """The first non-blank line of a text file (``error.txt``), stripped; None if missing or blank.
    A refused file gives its one-line refusal instead, so the reason is never the file's content."""
    try:
        text = read_text(path, root, limit=2**20)
    except FileNotFoundError:
        return None
    except UnsafeFileError as exc:
        return str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else None


def read_json(path: Path | str, root: Path | str) -> Any:
    """The JSON value of ``path``; `UnsafeFileError` if it is refused, cut or not JSON."""
    text = read_text(path, root)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UnsafeFileError(f"{path} is not complete JSON ({getattr(exc, 'msg', exc)} at line "
                              f"{getattr(exc, 'lineno', '?')}); it was cut while written or altered") from None
    except RecursionError:
        raise UnsafeFileError(f"{path} nests deeper than any stds file; not read") from None


def read_yaml(path: Path | str, root: Path | str) -> Any:
    """The YAML of ``path`` as plain Python values; interpolations stay their literal text."""
    text = read_text(path, root)
    try:
        loaded = yaml.safe_load(text)
    except RecursionError:
        raise UnsafeFileError(f"{path} nests deeper than any stds file; not read") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UnsafeFileError(f"{path} is not YAML ({getattr(exc, 'problem', None) or 'parse error'}{at})") from None
    if sum(1 for _ in walk(loaded)) > _MAX_NODES:
        raise UnsafeFileError(f"{path} expands to more than {_MAX_NODES} values; not read")
    return loaded


def walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, key, value) of every item of nested dicts and lists, parents first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        yield path, key, value
        yield from walk(value, path)


def interpolation_in(node: Any) -> str | None:
    """The dotted path of the first key or string value of ``node`` that holds ``${`` (an
    interpolation of any shape: ``${x}``, ``${oc.env:X}``, ``${${r}:X}``); None if none does."""
    if isinstance(node, str):
        return "(the value)" if "${" in node else None
    for path, key, value in walk(node):
        if (isinstance(key, str) and "${" in key) or (isinstance(value, str) and "${" in value):
            return path
    return None


_REFERENCE = re.compile(r"^\$\{([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\}$")
"""The one interpolation read from a file: a whole value naming another key of the same file
(``${T}``, ``${hydra.job.num}``), as Hydra writes ``.hydra/*.yaml`` unresolved; it is followed by
`plain_value`, never by OmegaConf."""


def select(tree: Any, dotted: str) -> Any:
    """``dotted`` key of nested dicts (``"hydra.job.id"``), as it is in the file; None if absent."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def plain_value(tree: Any, dotted: str, source: Path | str) -> Any:
    """`select` of ``dotted``, checked by `checked_value`."""
    return checked_value(tree, select(tree, dotted), source, dotted)


def checked_value(tree: Any, value: Any, source: Path | str, where: str, seen: tuple[str, ...] = ()) -> Any:
    """``value`` (read at key ``where`` of ``tree``) with a whole-value reference to another key of
    ``tree`` followed (cycles refused); any other ``${`` in it or below it is refused
    (`UnsafeFileError` naming the key and ``source``)."""
    match = _REFERENCE.match(value) if isinstance(value, str) else None
    if match is not None:
        name = match.group(1)
        if name in seen or len(seen) > 32:
            raise UnsafeFileError(f"{source}: key {where} refers to itself through {name}; not read")
        parent, _, last = name.rpartition(".")
        holder = select(tree, parent) if parent else tree
        if not isinstance(holder, dict) or last not in holder:
            raise UnsafeFileError(f"{source}: key {where} refers to {name}, which the file does not hold; not read")
        return checked_value(tree, select(tree, name), source, where, (*seen, name))
    inner = interpolation_in(value)
    if inner is not None:
        at = "" if inner == "(the value)" else f" (at {inner})"
        raise UnsafeFileError(f"{source}: key {where}{at} holds an interpolation; nothing is resolved "
                              "from a file: use a file you trust")
    return value


def _open_single(path: Path, flags: int) -> int:
    """``os.open`` with ``O_NOFOLLOW``; refuses (`UnsafeFileError`) a symlink, a non-regular file
    or a file with a second hard link (writing it would change another name's content)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError:
        if os.path.islink(path):
            raise UnsafeFileError(f"{path} is a symlink; it is never written through: remove it") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise UnsafeFileError(f"{path} is not a plain file of its own (a FIFO, device or hard link); "
                              "it is never written: remove it")
    os.set_blocking(fd, True)
    return fd


def open_append(path: Path | str) -> IO[str]:
    """``path`` opened to append text (``metrics.jsonl``), made if missing; see `_open_single`."""
    fd = _open_single(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding="utf-8")


def open_lock(path: Path | str) -> IO[str]:
    """``path`` opened to read and write (a lock file: ``.lock``, ``.search.lock``), made if
    missing, never truncated on open; see `_open_single`."""
    fd = _open_single(Path(path), os.O_RDWR | os.O_CREAT)
    return os.fdopen(fd, "r+", encoding="utf-8")


class LogFile(logging.FileHandler):
    """``logging.FileHandler`` for Hydra's ``train.log`` that opens its file by `_open_single`: a
    planted symlink (or FIFO, hard link) is refused with one warning line on stderr, and the log
    goes to the console only."""

    def _open(self) -> IO[str]:
        try:
            fd = _open_single(Path(self.baseFilename), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except UnsafeFileError as exc:  # a read-only directory still fails, in one line (stds.cli.entry)
            sys.stderr.write(f"warning: {one_line(exc)}; the log is written to the console only\n")
            return open(os.devnull, "w", encoding="utf-8")
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)
