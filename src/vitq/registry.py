"""Named entries of one kind (grids, observers, methods, add-ons, adapters, tasks, stages), with one error
format for a name that is not there: "unknown method 'x'; known: a, b (hint)".

A registry belongs to the floor that reads it; the floors above fill it (`@GRIDS.register("uniform")`).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")


def import_modules(package: str, path: Iterable[str]) -> list[str]:
    """Import every module of a package, in name order: each registers what it defines, so adding a method
    or a model family is adding its file (`from vitq.registry import import_modules` in the package's
    `__init__`, with `__name__, __path__`)."""
    names = sorted(m.name for m in pkgutil.iter_modules(list(path)))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


class UnknownName(ValueError):
    """A name that no entry of the registry answers to."""


class Registry(Generic[T]):
    def __init__(self, kind: str, hint: str = "", discover: Callable[[], None] | None = None) -> None:
        self.kind = kind  # what an entry is, in messages: "method", "quantizer", ...
        self.hint = hint  # how to add one, appended to the error
        self._discover = discover  # called before the first miss is reported (e.g. loading entry points)
        self._discovered = False
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
        """`REG.register(name, entry)`, or `@REG.register(name)` as a decorator; a name registered again
        takes the newer entry (a module reloaded, a method overriding a built-in)."""
        if entry is not None:
            self._entries[name] = entry
            return entry

        def add(item: T) -> T:
            self._entries[name] = item
            return item
        return add

    def get(self, name: str) -> T:
        if name not in self._entries and self._discover is not None and not self._discovered:
            self._discovered = True
            self._discover()
        if name not in self._entries:
            raise UnknownName(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: object) -> str:
        return (f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries)) or '(none)'}"
                + (f" ({self.hint})" if self.hint else ""))

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def values(self) -> list[T]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def pop(self, name: str, default: T | None = None) -> T | None:
        """Remove an entry (tests that register a throw-away one clean up with this)."""
        return self._entries.pop(name, default)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"
