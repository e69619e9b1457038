"""``Value``: what ``@dataclass`` generates for leakguard's small record classes, written once.

Compared by value and shown with a dataclass's repr.  Building dataclasses (and
importing :mod:`dataclasses` with the :mod:`inspect` it needs) costs a program more
than the rest of ``import leakguard``, and these classes need nothing else from it.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["Value"]


class Value:
    """Subclasses annotate their fields, in order, in the class body and set them in ``__init__``."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The names, in order (the values stay text); getattr where annotations are made lazily (3.14).
        cls._fields = tuple(vars(cls).get("__annotations__") or getattr(cls, "__annotations__", {}))

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value, as a dataclass

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({', '.join(f'{n}={v!r}' for n, v in zip(self._fields, self._values()))})"
