"""The layout holds: the method needs torch only, and imports run one way between packages
(``docs/architecture.md``): cli -> results -> run -> models, data -> method -> errors. The scripts
under ``launch/`` and ``benchmarks/`` import only what exists and never the tests."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, at_once

PACKAGE = REPO / "stds"
SCRIPTS = sorted([*(REPO / "launch").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")])
LAYER = {"errors": 0, "registry": 0, "method": 1, "models": 2, "data": 2, "run": 3, "results": 4, "cli": 5}
"""Each package may import those of a lower layer (and itself); models and data not each other."""


def _package(module: str) -> str | None:
    """``stds.run.life.loop`` -> ``run``; ``stds`` itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "stds" else None


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports, at any depth (function bodies too), with its line."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(f"{node.module}.{alias.name}" if node.module == "stds" else node.module, node.lineno)
                      for alias in node.names]
    return found


def _own_package(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def test_every_import_points_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        own = _own_package(path)
        for module, line in _imports(path):
            other = _package(module)
            if other is None or other == own:
                continue
            if LAYER[other] >= LAYER[own]:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {module} ({own} -> {other})")
    assert wrong == []


def test_every_module_is_in_a_layer():
    assert {_own_package(p) for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"} == set(LAYER)


def test_the_method_imports_torch_and_the_standard_library_only():
    allowed = {"torch", "numpy", "stds"} | set(sys.stdlib_module_names)
    used = {module.split(".")[0] for path in (PACKAGE / "method").glob("*.py") for module, _ in _imports(path)}
    assert used <= allowed, used - allowed
    inner = {_package(m) for path in (PACKAGE / "method").glob("*.py") for m, _ in _imports(path)}
    assert inner <= {None, "method", "errors", "registry"}


FRESH = {
    # `import stds` gives the method without Hydra, OmegaConf or SpikingJelly
    "method": ("import sys, stds",
               "from stds import sparsify, sparsity, ThresholdSchedule, TargetSparsitySchedule, attach_gradr_prior",
               "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'spikingjelly'})",
               "print(','.join(loaded) or 'none')"),
    # a digits run's modules, and the digits themselves, without torchvision
    "digits": ("import sys, stds.cli.entry, stds.run.life.trainer, stds.results.sweep, stds.models, stds.data",
               "stds.data.digits()",
               "print('torchvision' in sys.modules)"),
}


@pytest.fixture(scope="module")
def printed_by_fresh_python() -> dict[str, str]:
    """What a fresh interpreter prints running each of `FRESH` (each must succeed); the
    interpreters run at once."""
    procs = at_once(*[[sys.executable, "-c", "\n".join(lines)] for lines in FRESH.values()])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
    return {name: proc.stdout.strip() for name, proc in zip(FRESH, procs)}


def test_import_stds_gives_the_method_without_hydra(printed_by_fresh_python):
    assert printed_by_fresh_python["method"] == "none"


def test_a_run_on_the_digits_does_not_import_torchvision(printed_by_fresh_python):
    """torchvision's import (it loads ``torch._dynamo``) is paid only by the datasets that use it:
    every run, error line and test subprocess on the digits starts without it."""
    assert printed_by_fresh_python["digits"] == "False"


def test_the_method_prunes_a_plain_torch_model():
    import torch
    from torch import nn

    import stds

    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -0.1, 0.3], [-0.7, 0.05, 0.0]]))
    assert stds.sparsify(model, "stmod", d=0.2) == ["0"]  # θ = sign(w)(|w| + 0.2); θ = 0 stays 0
    schedule = stds.ThresholdSchedule(final=0.3, total_steps=4, kind="linear").attach(model)
    assert schedule.step(2) == pytest.approx(0.15)  # |θ| - 0.15 > 0 but for θ = 0
    assert stds.sparsity(model)["zeros"] == 1
    schedule.step(4)  # d = 0.3: |θ| = 0.7, 0.3, 0.5 / 0.9, 0.25, 0
    expected = torch.tensor([[0.4, 0.0, 0.2], [-0.6, 0.0, 0.0]])
    torch.testing.assert_close(model[0].weight.detach(), expected)
    assert stds.sparsity(model)["zeros"] == 3


@pytest.mark.parametrize("name", ["sparsify", "sparsity", "ThresholdSchedule", "TargetSparsitySchedule",
                                  "attach_gradr_prior"])
def test_the_public_names_are_the_methods_own(name):
    import stds
    import stds.method as method

    assert getattr(stds, name) is getattr(method, name)


def _parameters(path: Path) -> list[tuple[str, int]]:
    """Every function parameter of ``path`` with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            found += [(arg.arg, node.lineno) for arg in args]
    return found


@pytest.mark.parametrize("package", ["method", "models", "data"])
def test_the_config_stops_at_the_run(package):
    """The method, the models and the data get plain arguments: no Hydra or OmegaConf import, no
    ``cfg`` parameter (the config is read in ``stds.run``)."""
    wrong = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        wrong += [f"{path.name}:{line} imports {m}" for m, line in _imports(path)
                  if m.split(".")[0] in ("hydra", "omegaconf")]
        wrong += [f"{path.name}:{line} takes {name}" for name, line in _parameters(path) if name == "cfg"]
    assert wrong == []


def _imported_names(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None for ``import module``, line) of every absolute import."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
    return found


def _top_level_names(path: Path) -> set[str]:
    """The names a module defines or imports at its top level."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _missing(path: Path, module: str, name: str | None) -> str | None:
    """Why ``from module import name`` (or ``import module``) in the script ``path`` would fail, or None:
    ``stds`` modules are imported, a sibling module (the script's folder is first on its path) is read."""
    sibling = path.parent / f"{module}.py"
    if sibling.is_file():
        return None if name is None or name in _top_level_names(sibling) else f"{sibling.name} defines no {name}"
    if module.split(".")[0] != "stds":
        return None
    try:
        imported = importlib.import_module(module)
    except ImportError as error:
        return str(error)
    if name is None or hasattr(imported, name):
        return None
    try:
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return f"{module} has no {name}"
    return None


def test_scripts_import_only_what_exists():
    # every stds module and name, and every sibling module, that launch/ and benchmarks/ import
    # (function bodies too), checked without running the scripts
    wrong = []
    for path in SCRIPTS:
        for module, name, line in _imported_names(path):
            why = _missing(path, module, name)
            if why:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {why}")
    assert wrong == []


def test_scripts_do_not_import_the_tests():
    wrong = [f"{path.relative_to(REPO)}:{line} imports {module}" for path in SCRIPTS
             for module, _, line in _imported_names(path) if module.split(".")[0] == "tests"]
    assert wrong == []


def test_the_script_import_check_finds_a_moved_module_and_a_missing_name(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("def f():\n    from stds import accel\n    from stds.run.setup.accel import nothing_here\n"
                      "from stds.run.setup import accel\nfrom helper import X, Y\n")
    (tmp_path / "helper.py").write_text("X = 1\n")
    why = [(line, name, _missing(script, module, name)) for module, name, line in _imported_names(script)]
    assert sorted(why) == [(2, "accel", "stds has no accel"),
                           (3, "nothing_here", "stds.run.setup.accel has no nothing_here"),
                           (4, "accel", None), (5, "X", None), (5, "Y", "helper.py defines no Y")]


def test_no_module_over_400_lines_and_no_function_over_50():
    """Modules with one job each: the limits the layout was drawn to (``docs/architecture.md``)."""
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_modules.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert long_modules == [] and long_functions == []
