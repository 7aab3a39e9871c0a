"""Load an exported ``model.nir`` in other frameworks' public NIR readers, as the file is, and
compare each with `stds` on real images: predicted classes, class scores and spikes per layer.

Readers (`READERS`), each called as its documentation shows, with the file's ``dt``:

- SpikingJelly: ``spikingjelly.activation_based.nir_exchange.import_from_nir(path, dt=dt)``;
- Norse: ``norse.torch.from_nir(nir.read(path), dt=dt)``;
- snnTorch: ``snntorch.import_nir.import_from_nir(nir.read(path))`` (its dt is fixed at 1e-4).

Each returns a module called once per time step as ``out, state = module(images, state)``. A
reader passes when it loads the graph and predicts the class `stds` predicts on at least
``min_agreement`` of the images; the check fails (`CheckResult.passed`) otherwise. Where a
reader's executor runs a node before one of its inputs (Norse's ``from_nir`` walks the graph
depth first), the nodes are named (`out_of_order`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import nir
import torch
from omegaconf import OmegaConf
from spikingjelly.activation_based import functional
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stds.errors import ExportError
from stds.results.nir_file import NIR_NAME
from stds.results.pruned import trained_network
from stds.run.setup.config import instantiate_node

__all__ = [
    "READERS",
    "CheckResult",
    "ReaderResult",
    "check_graph",
    "check_run",
    "format_check",
    "graph_forward",
    "module_name",
    "neuron_nodes",
    "out_of_order",
    "stds_forward",
    "unmapped",
]


def _spikingjelly(path: Path, dt: float) -> nn.Module:
    from spikingjelly.activation_based.nir_exchange import import_from_nir
    return import_from_nir(path, dt=dt)


def _norse(path: Path, dt: float) -> nn.Module:
    with warnings.catch_warnings():  # Norse 1.1 scripts functions with the deprecated torch.jit
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # it calls nirtorch.load
        import norse.torch
        return norse.torch.from_nir(nir.read(path), dt=dt)


def _snntorch(path: Path, dt: float) -> nn.Module:
    from snntorch.import_nir import import_from_nir
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every LIF's rescaled threshold
        return import_from_nir(nir.read(path))


def _snntorch_reset(module: nn.Module) -> None:
    """snnTorch's neurons keep their membrane inside the module (``init_hidden``): reset it."""
    from snntorch.utils import reset
    reset(module)


@dataclass(frozen=True)
class Reader:
    """A public NIR reader: its package, how it is called, and how its own state is reset."""

    name: str
    package: str
    call: str
    load: Callable[[Path, float], nn.Module]
    reset: Callable[[nn.Module], None] = lambda module: None


READERS: dict[str, Reader] = {reader.name: reader for reader in (
    Reader("spikingjelly", "spikingjelly",
           "spikingjelly.activation_based.nir_exchange.import_from_nir(path, dt=dt)", _spikingjelly),
    Reader("norse", "norse", "norse.torch.from_nir(nir.read(path), dt=dt)", _norse),
    Reader("snntorch", "snntorch", "snntorch.import_nir.import_from_nir(nir.read(path))",
           _snntorch, _snntorch_reset),
)}
"""The public readers the check runs, by name (``--readers``)."""


def module_name(node: str) -> str:
    """The attribute name the readers give the module of NIR node ``node``."""
    return node.replace(".", "_")


def neuron_nodes(graph: nir.NIRGraph) -> list[str]:
    """Names of the graph's LIF and IF nodes, inputs before the nodes they feed (``nir.read``
    returns the nodes sorted by name)."""
    parents = {name: [s for s, t in graph.edges if t == name] for name in graph.nodes}
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(graph.nodes):
        ready = [n for n in graph.nodes if n not in placed and set(parents[n]) <= placed]
        if not ready:  # a cycle: the rest in file order
            ready = [n for n in graph.nodes if n not in placed]
        order += ready
        placed.update(ready)
    return [name for name in order if isinstance(graph.nodes[name], (nir.LIF, nir.IF))]


def out_of_order(module: nn.Module, graph: nir.NIRGraph) -> list[str]:
    """For a reader whose executor has a public ``execution_order`` (nirtorch's GraphExecutor,
    behind Norse's ``from_nir``): each node it runs before one of its inputs (the node then
    reads that input's value from the previous step) and each mapped node it never runs."""
    if not hasattr(module, "execution_order"):
        return []
    order = [getattr(node, "name", None) for node in module.execution_order]
    position = {name: i for i, name in enumerate(order) if name is not None}
    wrong = []
    for source, target in graph.edges:
        s, t = position.get(module_name(source)), position.get(module_name(target))
        if s is not None and t is not None and s > t:
            wrong.append(f"its executor runs {target} before its input {source}")
    for name in graph.nodes:
        mapped = isinstance(getattr(module, module_name(name), None), nn.Module)
        if mapped and module_name(name) not in position:
            wrong.append(f"its executor never runs {name}")
    return wrong


def unmapped(module: nn.Module, graph: nir.NIRGraph) -> list[str]:
    """``"no module for node <name> (<type>)"`` for each node a reader left without a module
    (Norse's ``from_nir`` maps no AvgPool2d, and its executor then skips the node)."""
    missing = []
    for name, node in graph.nodes.items():
        if isinstance(node, (nir.Input, nir.Output)):
            continue
        try:
            module.get_submodule(module_name(name))
        except AttributeError:
            missing.append(f"no module for node {name} ({type(node).__name__})")
    return missing


def _count_spikes(modules: dict[str, nn.Module], counts: dict[str, int]) -> list[Any]:
    """Forward hooks adding each module's output spikes (first element of a tuple) to ``counts``."""
    def hook(name: str, _module: nn.Module, _inputs: Any, output: Any) -> None:
        spikes = output[0] if isinstance(output, tuple) else output
        counts[name] += int(spikes.sum().item())

    return [m.register_forward_hook(partial(hook, name)) for name, m in modules.items()]


def graph_forward(module: nn.Module, graph: nir.NIRGraph, images: Tensor, T: int,
                  counts: dict[str, int] | None = None,
                  reset: Callable[[nn.Module], None] = lambda module: None) -> Tensor:
    """Class scores of an imported graph: ``images`` fed at each of ``T`` steps, the output
    averaged over the steps. Spikes of each LIF/IF node are added to ``counts`` if given."""
    modules = {name: module.get_submodule(module_name(name)) for name in neuron_nodes(graph)}
    hooks = _count_spikes(modules, counts) if counts is not None else []
    reset(module)
    try:
        state, total = None, 0.0
        with torch.no_grad():
            for _ in range(T):
                out, state = module(images, state)
                total = total + out
    finally:
        for handle in hooks:
            handle.remove()
        reset(module)
    return total / T


def stds_forward(model: nn.Module, images: Tensor, names: list[str],
                 counts: dict[str, int] | None = None) -> Tensor:
    """The model's class scores (eval mode); spikes of its neuron layers ``names`` (summed over
    steps) added to ``counts`` if given. A pooling neuron's name is the model's max pool, whose
    output is the same 0/1 spikes."""
    modules = {name: model.get_submodule(name) for name in names}
    hooks = _count_spikes(modules, counts) if counts is not None else []
    try:
        with torch.no_grad():
            scores = model(images)
    finally:
        for handle in hooks:
            handle.remove()
        functional.reset_net(model)
    return scores


@dataclass
class ReaderResult:
    """One reader on the images: whether it loaded (else ``error``), the agreement with `stds`
    and the spikes per neuron node."""

    reader: str
    version: str
    error: str | None = None
    same_class: int = 0
    correct: int = 0
    max_score_difference: float = float("nan")
    spikes: dict[str, int] = field(default_factory=dict)
    out_of_order: list[str] = field(default_factory=list)
    """Nodes the reader left out or runs before an input (`unmapped`, `out_of_order`)."""


@dataclass
class CheckResult:
    """All readers against `stds` on ``images`` test images; ``passed`` against ``min_agreement``."""

    images: int
    T: int
    dt: float
    min_agreement: float
    correct_stds: int
    spikes_stds: dict[str, int]
    readers: list[ReaderResult]

    def agreement(self, result: ReaderResult) -> float:
        return result.same_class / max(self.images, 1)

    def reader_passed(self, result: ReaderResult) -> bool:
        return result.error is None and self.agreement(result) >= self.min_agreement

    @property
    def passed(self) -> bool:
        return all(self.reader_passed(result) for result in self.readers)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _load(reader: Reader, path: Path, graph: nir.NIRGraph, dt: float
          ) -> tuple[nn.Module | None, ReaderResult]:
    result = ReaderResult(reader.name, _version(reader.package), spikes=dict.fromkeys(
        neuron_nodes(graph), 0))
    try:
        module = reader.load(path, dt)
    except Exception as exc:  # a third-party reader fails in its own ways: report, go on
        result.error = f"does not load: {_one_line(exc)}"
        return None, result
    result.out_of_order = unmapped(module, graph) + out_of_order(module, graph)
    return module, result


def check_graph(model: nn.Module, path: Path, batches: Any, readers: list[str],
                min_agreement: float = 1.0) -> CheckResult:
    """Run ``path`` in each of ``readers`` (names in `READERS`) and ``model`` on ``batches``
    of ``(images, labels)``; compare predicted classes, scores and spikes per neuron node."""
    graph = nir.read(path)
    if "dt" not in (graph.metadata or {}):
        raise ExportError(f"{path} has no metadata dt; check a model.nir that launch/export.py wrote")
    dt, T = float(graph.metadata["dt"]), int(model.T)
    names = neuron_nodes(graph)
    loaded = [_load(READERS[name], path, graph, dt) for name in readers]
    spikes_stds, images_seen, correct_stds = dict.fromkeys(names, 0), 0, 0
    for images, labels in batches:
        scores = stds_forward(model, images, names, spikes_stds)
        ours = scores.argmax(dim=1)
        images_seen += len(labels)
        correct_stds += int((ours == labels).sum())
        for (module, result), name in zip(loaded, readers):
            if result.error is None:
                _compare(READERS[name], module, graph, images, labels, scores, T, result)
    return CheckResult(images_seen, T, dt, min_agreement, correct_stds, spikes_stds,
                       [result for _, result in loaded])


def _compare(reader: Reader, module: nn.Module, graph: nir.NIRGraph, images: Tensor,
             labels: Tensor, scores: Tensor, T: int, result: ReaderResult) -> None:
    """Add one batch's agreement, accuracy, score difference and spikes to ``result``."""
    try:
        theirs = graph_forward(module, graph, images, T, result.spikes, reader.reset)
        difference = float((theirs.to(scores.dtype) - scores).abs().max())
    except Exception as exc:  # a third-party module fails in its own ways: report, go on
        result.error = f"does not run: {_one_line(exc)}"
        return
    predicted = theirs.argmax(dim=1)
    result.same_class += int((predicted == scores.argmax(dim=1)).sum())
    result.correct += int((predicted == labels).sum())
    known = result.max_score_difference
    result.max_score_difference = difference if known != known else max(known, difference)


def run_test_set(config: dict[str, Any]) -> Any:
    """The run's test dataset; only the datasets of `stds.data` are built from a saved config."""
    node = config.get("dataset") or {}
    target = str(node.get("_target_", ""))
    if not target.startswith("stds.data."):
        raise ExportError(f"dataset._target_={target!r} is not one of stds.data's datasets; the "
                          "check builds only those from a run's config")
    return instantiate_node(OmegaConf.create(node), "dataset").test


def check_run(run_dir: Path | str, path: Path | str | None = None, which: str = "last",
              readers: list[str] | None = None, limit: int | None = None,
              min_agreement: float = 1.0, batch_size: int = 256) -> CheckResult:
    """Check ``path`` (default ``<run_dir>/model.nir``) in ``readers`` (default all of
    `READERS`) against the run's model on its test set (the first ``limit`` images if given)."""
    unknown = sorted(set(readers or ()) - set(READERS))
    if unknown:
        raise ExportError(f"--readers {','.join(unknown)} is not valid; use some of "
                          f"{','.join(READERS)}")
    net = trained_network(run_dir, which)
    dataset = run_test_set(net.config)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    batches = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    target = Path(path) if path is not None else Path(run_dir) / NIR_NAME
    return check_graph(net.model.float(), target, batches, list(readers or READERS), min_agreement)


def format_check(result: CheckResult) -> str:
    """Per reader: loads or why not, class agreement, accuracy, score difference, PASS/FAIL;
    then spikes per neuron node (stds and each reader that ran)."""
    n = max(result.images, 1)
    lines = [f"check: {result.images} test images, T={result.T}, dt={result.dt} s, pass at "
             f">= {100 * result.min_agreement:.2f}% same class; stds accuracy "
             f"{100 * result.correct_stds / n:.2f}%"]
    for r in result.readers:
        verdict = "PASS" if result.reader_passed(r) else "FAIL"
        if r.error is not None:
            lines.append(f"{r.reader} {r.version}: {verdict}, {r.error}")
        else:
            lines.append(f"{r.reader} {r.version}: {verdict}, same class as stds on {r.same_class} "
                         f"of {result.images} images ({100 * r.same_class / n:.2f}%), accuracy "
                         f"{100 * r.correct / n:.2f}%, largest score difference "
                         f"{r.max_score_difference:.3g}")
        lines += [f"  {wrong}" for wrong in r.out_of_order]
    ran = [r for r in result.readers if r.error is None]
    lines.append(f"{'spikes':<24} {'stds':>12}" + "".join(f" {r.reader:>12}" for r in ran))
    for name, ours in result.spikes_stds.items():
        lines.append(f"{name:<24} {ours:>12,}" + "".join(f" {r.spikes[name]:>12,}" for r in ran))
    return "\n".join(lines)
