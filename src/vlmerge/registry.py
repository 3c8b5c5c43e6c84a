"""Name -> implementation registries whose entries are the modules of a package."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from vlmerge.errors import VlmergeError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries, each registered once: a second entry under a taken name is an error, and a
    failed lookup lists the known names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        if name not in self._entries:
            raise VlmergeError(f"unknown {self.kind} {name!r} (known: {', '.join(sorted(self._entries))})")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def with_defaults(owner: str, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """An entry's declared parameters: `defaults` overridden by `given`; an unknown one is an error."""
    unknown = set(given) - set(defaults)
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise VlmergeError(f"{owner}: unknown parameter {sorted(unknown)[0]!r} (allowed: {allowed})")
    return {**defaults, **given}


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of a package (each registers what it defines)."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
