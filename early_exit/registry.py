"""One registry shape for everything users plug in by name: architectures, head types and confidence metrics.

A `Registry` maps names to objects. Registering a name that is taken is an error (an accidental overwrite would
silently change what a saved config means); looking up an unknown name raises an error that lists the known ones
and says how to add one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from .errors import DuplicateNameError, UnknownNameError

Item = TypeVar("Item")
Registered = TypeVar("Registered")


class Registry(Mapping[str, Item], Generic[Item]):
    """Named objects of one kind, read like a dict.

    Args:
        kind: what the names name, for messages (e.g. "confidence metric").
        how_to_add: how a user registers one, for the unknown-name message.
        unknown_error: the error class raised for an unknown name (a subclass of `UnknownNameError`).
    """

    def __init__(self, kind: str, how_to_add: str, unknown_error: type[UnknownNameError] = UnknownNameError) -> None:
        self.kind = kind
        self.how_to_add = how_to_add
        self.unknown_error = unknown_error
        self._items: dict[str, Item] = {}

    def add(self, name: str, item: Item) -> Item:
        """Register `item` as `name`.

        Raises:
            DuplicateNameError: `name` is taken (call `unregister` first to replace it on purpose).
            TypeError: `name` is not a non-empty string.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"A {self.kind} name must be a non-empty string, got {name!r}.")
        if name in self._items:
            raise DuplicateNameError(
                f"A {self.kind} named {name!r} is already registered ({self._items[name]!r}); choose another name, "
                f"or unregister the old one first."
            )
        self._items[name] = item
        return item

    def register(self, *names: str) -> Callable[[Registered], Registered]:
        """Decorator: register the decorated object under each of `names`."""

        def decorator(item: Registered) -> Registered:
            for name in names:
                self.add(name, item)
            return item

        return decorator

    def unregister(self, name: str) -> Item:
        """Remove `name` and return what it named."""
        return self._items.pop(self._check(name))

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def _check(self, name: str) -> str:
        if name not in self._items:
            known = ", ".join(self.names()) or "(none)"
            raise self.unknown_error(f"Unknown {self.kind} {name!r}. Known {self.kind}s: {known}; {self.how_to_add}")
        return name

    def __getitem__(self, name: str) -> Item:
        return self._items[self._check(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
