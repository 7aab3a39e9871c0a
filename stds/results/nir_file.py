"""Write a trained run's NIR graph (`stds.results.nir`) to ``model.nir``, in a form every nir
release from 1.0.0 on reads: ``nir.write``, then the ``v_reset`` fields that are 0 are removed
(nir 1.0.4 cannot parse the field; nir 1.0.5 and later fill it with 0 when it is absent)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import nir
import numpy as np

from stds.errors import ExportError
from stds.results.nir import DT, model_graph
from stds.results.pruned import trained_network, write_output

__all__ = ["NIR_NAME", "NirExport", "export_nir", "write_graph", "zero_weights"]

NIR_NAME = "model.nir"


def write_graph(path: Path, graph: nir.NIRGraph) -> None:
    """``nir.write`` ``graph`` into memory, drop every node's ``v_reset`` that is all zeros, then
    write the file by `stds.results.pruned.write_output` (atomic: a symlink at ``path`` is
    replaced, never written through; nothing is left behind on failure; one line if it cannot be
    written). Hand-edited with h5py because ``nir.write`` writes the field that nir 1.0.8's
    LIF/IF always fill in."""
    buffer = io.BytesIO()
    nir.write(buffer, graph)
    with h5py.File(buffer, "r+") as f:
        for node in f["node/nodes"].values():
            if "v_reset" in node and not np.any(node["v_reset"][()]):
                del node["v_reset"]
    write_output(path, buffer.getvalue())


def zero_weights(graph: nir.NIRGraph, names: Iterable[str]) -> int:
    """Exactly-zero entries of the ``weight`` of the nodes ``names``."""
    return sum(int(np.count_nonzero(graph.nodes[name].weight == 0)) for name in names)


@dataclass(frozen=True)
class NirExport:
    """A written ``model.nir``: its path, graph, pruned-layer node names and zero counts."""

    path: Path
    graph: nir.NIRGraph
    pruned: list[str]
    zeros_in_file: int
    zeros_in_run: int


def image_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """``[C, H, W]`` of the run's images (``dataset.in_channels``, ``dataset.image_size``)."""
    dataset = config.get("dataset") or {}
    try:
        size = int(dataset["image_size"])
        return int(dataset["in_channels"]), size, size
    except (KeyError, TypeError, ValueError):
        raise ExportError("the run's config has no dataset.in_channels and dataset.image_size; "
                          "the NIR graph needs the image shape") from None


def export_nir(run_dir: Path | str, which: str = "last", out: Path | str | None = None,
               verbose: bool = True, dt: float = DT) -> NirExport:
    """Write the NIR graph of ``checkpoints/<which>.pt`` to ``out`` (default
    ``<run_dir>/model.nir``), neuron parameters for a step of ``dt`` seconds; print what it
    holds if ``verbose``."""
    net = trained_network(run_dir, which)
    metadata = {
        "source": json.dumps(net.source),
        "dataset": json.dumps(net.config.get("dataset")),
        "pruned_layers": ",".join(net.layers),
        "zero_weights": int(net.sparsity["zeros"]),
    }
    graph = model_graph(net.model, image_shape(net.config), metadata, dt)
    zeros = zero_weights(graph, net.layers)
    target = Path(out) if out is not None else Path(run_dir) / NIR_NAME
    write_graph(target, graph)
    result = NirExport(target, graph, net.layers, zeros, int(net.sparsity["zeros"]))
    if verbose:
        print(summary(result))
    return result


def summary(result: NirExport) -> str:
    """Two lines: the file and its nodes; the zero weights in the file against the run's."""
    kinds: dict[str, int] = {}
    for node in result.graph.nodes.values():
        kinds[type(node).__name__] = kinds.get(type(node).__name__, 0) + 1
    listing = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    numel = sum(result.graph.nodes[name].weight.size for name in result.pruned)
    same = "same as" if result.zeros_in_file == result.zeros_in_run else "DIFFERS from"
    return (f"{result.path}: {len(result.graph.nodes)} nodes ({listing}), "
            f"{len(result.graph.edges)} edges, neuron parameters for dt = "
            f"{result.graph.metadata['dt']} s (give this dt to the reader)\n"
            f"zero weights in the {len(result.pruned)} pruned layers: {result.zeros_in_file:,} of "
            f"{numel:,} ({100 * result.zeros_in_file / max(numel, 1):.2f}%), {same} the run's "
            f"{result.zeros_in_run:,}")
