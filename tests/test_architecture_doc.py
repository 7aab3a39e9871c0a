"""``docs/architecture.md`` matches the code: every module it names exists, and every package of
``stds/`` is in its drawing."""

from __future__ import annotations

import importlib.util
import re

from tests.conftest import REPO

DOC = (REPO / "docs" / "architecture.md").read_text()


def _named_modules() -> list[str]:
    """``stds.a.b`` in backticks, and the short names listed after one in a table cell
    (``stds.run.measure.evaluate``, ``synops`` -> ``stds.run.measure.synops``)."""
    names = []
    for cell in re.findall(r"^\| (`stds[^|]*?) \|", DOC, flags=re.M):
        parts = re.findall(r"`([\w.]+)`", cell)
        names.append(parts[0])
        package = parts[0].rsplit(".", 1)[0]
        names += [f"{package}.{short}" for short in parts[1:]]
    names += re.findall(r"`(stds(?:\.\w+)+)[`(.]", DOC)
    return sorted(set(names))


def _is_module_or_attribute(name: str) -> bool:
    """``name`` is a module, or an attribute of one (``stds.method.sparse.Reparam``)."""
    module, _, attr = name.rpartition(".")
    try:
        if importlib.util.find_spec(name) is not None:
            return True
    except ModuleNotFoundError:  # a parent of ``name`` is a module, not a package
        pass
    return importlib.util.find_spec(module) is not None and hasattr(importlib.import_module(module), attr)


def test_every_module_the_doc_names_exists():
    names = _named_modules()
    assert len(names) > 30
    assert [n for n in names if not _is_module_or_attribute(n)] == []


def test_every_package_is_drawn():
    drawing = DOC.split("```")[1]
    packages = sorted(p.relative_to(REPO / "stds") for p in (REPO / "stds").rglob("__init__.py"))
    missing = [str(p.parent) for p in packages if str(p.parent) != "." and
               not re.search(rf"(stds/{p.parent}/|^\s+{p.parent.name}/)", drawing, flags=re.M)]
    assert missing == []
