"""One list per extension point: a `Registry` maps a name to what was registered under it.

Models (`stds.models.MODELS`), datasets (`stds.data.DATASETS`), reparameterizations
(`stds.method.sparse.REPARAMS`), threshold schedules (`stds.method.schedule.SCHEDULES`), optimizers
and learning-rate schedules (`stds.run.setup.optim_registry.OPTIMIZERS`, ``LR_SCHEDULES``) and
report columns (`stds.results.columns.COLUMNS`) are each one `Registry`; every other list that needs them
derives from it: the config's choices and Hydra config groups (`stds.run.setup.config`), the
allowlist of targets a saved config may name (`stds.run.files.rebuild`), the report's columns and
the NIR export's layer order. Adding a thing is one `add` call (or its decorator), nothing else.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, in registration order; a taken name raises (``replace=True`` to swap one)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T, replace: bool = False) -> T:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a {self.what} name must be a Python identifier, not {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`."""
        return lambda entry: self.add(name, entry)

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register a toy take it out again)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def values(self) -> list[T]:
        return list(self._entries.values())

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._entries.get(name, default)

    def choices(self) -> str:
        """The registered names, for an error line: ``a, b, c``."""
        return ", ".join(sorted(self._entries))

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r}; registered: {self.choices()}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class Buildable:
    """A registered thing a config builds through ``_target_`` (a model, a dataset): the class or
    function, and the config group node that selects it (None: a ``conf/<group>/<name>.yaml`` holds it)."""

    target: Callable[..., Any]
    config: dict[str, Any] | None = None

    @property
    def target_names(self) -> set[str]:
        """The spellings of the ``_target_`` a config may use (`target_spellings`)."""
        return target_spellings(self.target)


def target_spellings(target: Callable[..., Any]) -> set[str]:
    """``module.qualname`` and, where the package exports it, ``package.Name``
    (``stds.models.digits_net.DigitsNet`` and ``stds.models.DigitsNet``; ``torch.optim.adam.Adam``
    and ``torch.optim.Adam``)."""
    module, name = target.__module__, target.__qualname__
    names = {f"{module}.{name}"}
    package = sys.modules.get(module.rsplit(".", 1)[0])
    if package is not None and getattr(package, name, None) is target:
        names.add(f"{package.__name__}.{name}")
    return names


def config_node(target: Callable[..., Any], config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``config`` with ``_target_`` naming ``target`` (None stays None)."""
    if config is None:
        return None
    return {"_target_": f"{target.__module__}.{target.__qualname__}", **config}
