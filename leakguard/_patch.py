"""Patching with a receipt: every patch can be undone exactly, and only if still ours."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._log import log

__all__ = ["Patches"]

_ABSENT = object()


class Patches:
    """The patches one integration applied, undone in reverse order by :meth:`undo`."""

    def __init__(self) -> None:
        self._done: list[tuple[Any, str, Any, Any]] = []  # (owner, attr, original, ours)

    def __len__(self) -> int:
        return len(self._done)

    def wrap(self, module: Any, name: str, wrapper: Callable[..., Any]) -> None:
        """``wrapt.wrap_function_wrapper(module, "Class.method", wrapper)``, remembered."""
        import wrapt  # only integrations need it: a bare install() stays cheap to import

        parent, attribute, original = wrapt.resolve_path(module, name)
        if isinstance(original, wrapt.ObjectProxy) and getattr(original, "_self_leakguard", False):
            return  # already ours (a second instrument() of the same module)
        # What the class itself stored (maybe nothing: an inherited method), to put back exactly.
        stored = vars(parent).get(attribute, _ABSENT) if isinstance(parent, type) else original
        proxy = wrapt.FunctionWrapper(original, wrapper)
        proxy._self_leakguard = True  # type: ignore[attr-defined]
        setattr(parent, attribute, proxy)
        self._done.append((parent, attribute, stored, proxy))

    def set(self, owner: Any, attribute: str, ours: Any) -> None:
        """Plain attribute replacement (for the hottest paths, where wrapt costs too much)."""
        stored = vars(owner)[attribute] if isinstance(owner, type) else getattr(owner, attribute)
        setattr(owner, attribute, ours)
        self._done.append((owner, attribute, stored, ours))

    def undo(self) -> None:
        while self._done:
            owner, attribute, original, ours = self._done.pop()
            current = vars(owner).get(attribute) if isinstance(owner, type) else getattr(owner, attribute, None)
            if current is ours:
                if original is _ABSENT:
                    delattr(owner, attribute)
                else:
                    setattr(owner, attribute, original)
            else:  # someone wrapped over us: leave their wrapper, ours turns into a pass-through
                log.debug("leakguard: %s.%s was re-patched by someone else; left in place", owner, attribute)

