"""Named registries: one per concept (methods, solvers, smoothers, statistics, importance kinds, kernels, checkpoint
formats), all filled the same way, by ``REGISTRY.register`` (a decorator on a class or function, or a call on an
instance) next to the thing registered.

``TLQConfig``'s allowed values and the command line's choices are read from these registries, so adding a method,
a solver or a format is one file plus one registration.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Entries of one ``concept``, each under its own ``key`` attribute (e.g. ``name``), in registration order.

    With ``instantiate`` a registered class is stored as one instance of it (stateless strategy objects such as
    kernels), while ``register`` still returns the class. A lookup of an unknown name raises ``KeyError`` naming the
    concept and the registered names.
    """

    def __init__(self, concept: str, key: str = "name", instantiate: bool = False) -> None:
        self.concept, self.key, self.instantiate = concept, key, instantiate
        self._entries: dict[str, T] = {}

    def register(self, entry: Any) -> Any:
        """Add ``entry`` under ``getattr(entry, key)`` and return it (so it also works as a decorator).

        Raises ``ValueError`` if another entry has that name: names are the public vocabulary (config values,
        command-line choices, report fields), so a clash is a bug, not an override.
        """
        stored = entry() if self.instantiate and isinstance(entry, type) else entry
        name = getattr(stored, self.key, None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.concept} needs a non-empty string {self.key!r} to be registered: {entry!r}")
        old = self._entries.get(name)
        again = old is stored or (self.instantiate and type(old) is type(stored))  # the same entry, once more
        if old is not None and not again:
            raise ValueError(f"{self.concept} {name!r} is registered twice ({old!r} and {entry!r})")
        self._entries[name] = stored
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (tests that register a temporary entry)."""
        return self._entries.pop(name)

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.concept} {name!r}: registered are {self.names()}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.concept!r}: {', '.join(self._entries)})"
