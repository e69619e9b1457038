"""threading.Thread: a thread that library code starts continues with the stack that started it.

A socket made in such a thread (a client library's background thread, an
executor's worker) captures only the thread's own frames, down to
``threading._bootstrap``: no application frame.  ``Thread.start`` captures the
starting stack when the thread's target (or ``run``) is not application code, and
the new thread begins with it as its continuation (see
:class:`leakguard.registry.Scope`).  A thread running application code costs one
cache lookup at start.
"""

from __future__ import annotations

from typing import Any

from leakguard import registry, stacks
from leakguard._patch import Patches

from ._attribution import callable_code, contained

__all__ = ["REQUIRES", "instrument", "uninstrument"]

REQUIRES = None  # standard library

_patches = Patches()
_pending: dict[int, stacks.Continuation] = {}  # id(thread) -> its continuation, from start() to its first frame


def _start(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    key = None
    with contained:
        target = getattr(instance, "_target", None)
        code = callable_code(target if target is not None else type(instance).run)
        if code is None or not stacks._is_app_code(code):
            cont = registry.continuation(1, None, inherits=False)
            if cont is not None:
                key = id(instance)
                _pending[key] = cont
    try:
        return wrapped(*args, **kwargs)
    except BaseException:
        if key is not None:
            _pending.pop(key, None)
        raise


def _bootstrap_inner(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    with contained:
        cont = _pending.pop(id(instance), None)
        if cont is not None:
            registry.enter_continuation(cont)  # the thread's own context: nothing to reset at its end
    return wrapped(*args, **kwargs)


def instrument() -> None:
    import threading

    if not hasattr(threading.Thread, "_bootstrap_inner"):
        return
    _patches.wrap(threading, "Thread.start", _start)
    _patches.wrap(threading, "Thread._bootstrap_inner", _bootstrap_inner)


def uninstrument() -> None:
    _patches.undo()
    _pending.clear()
