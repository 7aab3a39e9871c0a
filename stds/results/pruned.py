"""Export a trained run as a plain pruned network: ``<run>/pruned.pt``.

``pruned.pt`` (``torch.load(path, weights_only=True)``) holds ``state_dict`` (the weights w with
their zeros, keys of the architecture built without `stds` reparameterizations), ``config`` (the
run's composed config as a plain dict: ``hydra.utils.instantiate(config["model"])`` builds the
plain model), ``sparsity`` (as `stds.method.sparse.sparsity`), ``storage`` (bytes, below), ``source``
(checkpoint file, epoch, step) and ``format_version``. Loading it::

    model = instantiate(OmegaConf.create(blob["config"]["model"]))
    model.load_state_dict(blob["state_dict"])

Sizes of the pruned weights stored sparsely, each weight viewed as a matrix [out, fan-in]:
dense = numel x value bytes; CSR = nnz x (value bytes + index bytes) + (rows + 1) x index
bytes; bitmask = ceil(numel / 8) + nnz x value bytes. Index bytes: 4 (int32) while the indices
fit, else 8. Other tensors (BatchNorm, biases, unpruned layers) are counted dense.
"""

from __future__ import annotations

import math
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from stds.errors import CheckpointError, ExportError, StdsError, one_line
from stds.method.sparse import dense_state_dict, pruned_layers, sparsity
from stds.run.files import checkpoint as ckpt
from stds.run.files.atomic import write_atomic
from stds.run.files.rebuild import build_model, load_saved_yaml, sparsified_model

__all__ = [
    "EXPORT_NAME", "TrainedNetwork", "export_finished", "export_run", "format_storage",
    "trained_network", "weight_storage", "write_output",
]

EXPORT_NAME = "pruned.pt"
CHECKPOINTS = {"last": ckpt.LAST, "best": ckpt.BEST}


def weight_storage(weight: Tensor) -> dict[str, Any]:
    """Bytes of one weight stored dense, as CSR and as a bitmask + values (see module doc)."""
    numel = weight.numel()
    rows = weight.shape[0] if weight.dim() > 0 else 1
    nonzero = int(torch.count_nonzero(weight))
    value_bytes = weight.element_size()
    index_bytes = 4 if max(numel, rows + 1) < 2**31 else 8
    return {
        "shape": list(weight.shape),
        "numel": numel,
        "nonzero": nonzero,
        "dense_bytes": numel * value_bytes,
        "csr_bytes": nonzero * (value_bytes + index_bytes) + (rows + 1) * index_bytes,
        "bitmask_bytes": math.ceil(numel / 8) + nonzero * value_bytes,
    }


def storage(state_dict: dict[str, Tensor], layers: Iterable[str]) -> dict[str, Any]:
    """Per pruned layer and in total: dense, CSR and bitmask bytes; the other tensors, dense."""
    keys = {(f"{name}.weight" if name else "weight"): name for name in layers}
    per_layer = {keys[key]: weight_storage(t) for key, t in state_dict.items() if key in keys}
    totals = {k: sum(v[k] for v in per_layer.values())
              for k in ("numel", "nonzero", "dense_bytes", "csr_bytes", "bitmask_bytes")}
    other = sum(t.numel() * t.element_size() for key, t in state_dict.items()
                if key not in keys and torch.is_tensor(t))
    return {"layers": per_layer, "pruned": totals, "other_bytes": other}


def _size(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{int(n_bytes)} B"


def format_storage(info: dict[str, Any]) -> str:
    """Per-layer sparsity and sizes as a text table, then the totals."""
    columns = ("sparsity", "non-zero", "dense", "CSR", "bitmask")
    header = f"{'layer':<28} {'shape':<18} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, (9, 11, 11, 11, 11)))
    lines = [header]

    def row(name: str, shape: str, s: dict[str, Any]) -> str:
        zeros = 1 - s["nonzero"] / s["numel"] if s["numel"] else 0.0
        return (f"{name:<28} {shape:<18} {100 * zeros:>8.2f}% {s['nonzero']:>11,} "
                f"{_size(s['dense_bytes']):>11} {_size(s['csr_bytes']):>11} {_size(s['bitmask_bytes']):>11}")

    for name, s in info["layers"].items():
        lines.append(row(name or "(root)", "x".join(map(str, s["shape"])), s))
    pruned, other = info["pruned"], info["other_bytes"]
    lines.append(row("pruned layers", f"{pruned['numel']:,} w", pruned))
    dense_all = pruned["dense_bytes"] + other
    lines.append(
        f"whole network: {_size(dense_all)} dense; {_size(pruned['csr_bytes'] + other)} with CSR "
        f"weights, {_size(pruned['bitmask_bytes'] + other)} with bitmask weights "
        f"(other tensors, kept dense: {_size(other)})"
    )
    return "\n".join(lines)


def write_output(target: Path, content: Any) -> None:
    """An export's file, by `write_atomic` (a symlink at ``target`` is replaced, never followed;
    nothing is left behind on failure); `ExportError` in one line if it cannot be written."""
    try:
        write_atomic(target, content)
    except OSError as exc:
        raise ExportError(f"cannot write {target} ({exc.strerror or one_line(exc)}); give --out "
                          "<a writable file path> or make its folder writable") from None


def _config(run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's resolved config, or else the run's ``.hydra/config.yaml`` with its
    references to its own keys resolved (a resolver call such as ``${oc.env:...}`` is refused)."""
    config = state.get("config")
    if isinstance(config, dict) and "model" in config:
        return config
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        raise StdsError(f"{run_dir} has no config (neither in the checkpoint nor in {path})")
    return load_saved_yaml(path, root=run_dir)


def _checkpoint(run_dir: Path, which: str) -> Path:
    if which not in CHECKPOINTS:
        raise StdsError(f"which={which!r} is not valid; use one of {', '.join(CHECKPOINTS)}")
    if not run_dir.is_dir():
        raise StdsError(f"{run_dir} is not a directory; give a run directory")
    path = run_dir / "checkpoints" / CHECKPOINTS[which]
    if not path.exists():
        raise StdsError(f"{path} does not exist; the run has not saved a checkpoint yet")
    return path


@dataclass(frozen=True)
class TrainedNetwork:
    """A run's network as `export_run` and the NIR export read it from one checkpoint.

    ``model``: the plain architecture (no reparameterizations) holding ``weights``, in eval
    mode; ``layers``: the pruned layers' qualified names; ``sparsity``: as
    `stds.method.sparse.sparsity` of the trained model; ``config``: the run's resolved config;
    ``source``: checkpoint file name, epoch and step.
    """

    model: nn.Module
    weights: dict[str, Tensor]
    layers: list[str]
    sparsity: dict[str, Any]
    config: dict[str, Any]
    source: dict[str, Any]


def trained_network(run_dir: Path | str, which: str = "last") -> TrainedNetwork:
    """The network of ``<run_dir>/checkpoints/<which>.pt`` with its zeros, as a plain model."""
    run_dir = Path(run_dir)
    path = _checkpoint(run_dir, which)
    state = ckpt.load(path, run_dir)
    config = _config(run_dir, state)
    model = sparsified_model(config, path)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit its config's model: {first}") from None
    weights = dense_state_dict(model)
    plain = build_model(config, path)
    plain.load_state_dict(weights)  # loads into the plain model, or raises here
    source = {"checkpoint": path.name, "epoch": state.get("epoch"), "step": state.get("step")}
    return TrainedNetwork(plain.eval(), weights, list(pruned_layers(model)), sparsity(model),
                          config, source)


def export_run(
    run_dir: Path | str, which: str = "last", out: Path | str | None = None, verbose: bool = True
) -> Path:
    """Write the plain pruned network of ``checkpoints/<which>.pt`` to ``out`` (default
    ``<run_dir>/pruned.pt``); print the per-layer sparsity and sizes if ``verbose``."""
    target, net, info = _write_export(run_dir, which, out)
    if verbose:
        source = net.source
        print(f"{target}: {source['checkpoint']}, epoch {source['epoch']}, step {source['step']}")
        print(format_storage(info))
    return target


def _write_export(run_dir: Path | str, which: str, out: Path | str | None) -> tuple[Path, TrainedNetwork, dict]:
    """`export_run`'s work: the file written, the network and its storage counts."""
    net = trained_network(run_dir, which)
    info = storage(net.weights, net.layers)
    blob = {
        "format_version": ckpt.PRUNED_FORMAT_VERSION,
        "state_dict": net.weights,
        "config": net.config,
        "sparsity": net.sparsity,
        "storage": info,
        "source": net.source,
    }
    target = Path(out) if out is not None else Path(run_dir) / EXPORT_NAME
    write_output(target, lambda handle: torch.save(blob, handle))
    return target, net, info


def _plain_mtime(path: Path) -> float:
    """The modification time of ``path`` if it is a regular file (not followed if a link), else -1."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return -1.0
    return info.st_mtime if stat.S_ISREG(info.st_mode) else -1.0


def export_finished(runs: Iterable[Any], which: str = "last") -> list[Path]:
    """`export_run` for every finished run (a `stds.results.collect.RunRecord`) with a checkpoint whose
    ``pruned.pt`` is missing or older; one line per run, a failing run is reported and skipped."""
    written = []
    for run in runs:
        source = Path(run.path) / "checkpoints" / CHECKPOINTS[which]
        target = Path(run.path) / EXPORT_NAME
        if run.status != "finished" or not source.exists():
            continue
        # lstat: a planted link is never followed; it counts as missing and the export replaces it
        if _plain_mtime(target) >= max(_plain_mtime(source), 0.0):
            continue
        try:
            info = _write_export(run.path, which, None)[2]["pruned"]
        except StdsError as exc:
            print(f"warning: not exported: {exc}", file=sys.stderr)
            continue
        print(f"{target}: {info['nonzero']:,} of {info['numel']:,} weights kept, "
              f"CSR {_size(info['csr_bytes'])}, bitmask {_size(info['bitmask_bytes'])}, "
              f"dense {_size(info['dense_bytes'])}")
        written.append(target)
    return written
