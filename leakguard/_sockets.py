"""The hook on ``socket.socket.__init__``: every Python socket passes through it.

``socket.create_connection``, ``socketpair``, ``fromfd``, ``accept()``,
``ssl.SSLContext.wrap_socket`` and asyncio's transports all construct a
``socket.socket`` (or subclass), so one hook records them all.  It is not a
wrapt proxy because it runs for every socket: a wrapt bound wrapper alone
(about 1.3 µs per call, measured on a 2-core machine) costs as much as the
whole hook (``benchmarks/bench_core.py`` measures the hook, side by side with
plain sockets).  With the compiled extension built, the hook is a compiled
callable that binds like a function (``_speedups.make_init``): no Python frame
of its own per socket; otherwise the plain function below does the same.
Either shows introspection the original's name, module, doc and signature.
Nothing is hooked on ``close()``; see :mod:`leakguard.registry`.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from ._patch import Patches
from . import registry
from .registry import _errors, record_socket

__all__ = ["hook_class", "instrument", "uninstrument"]

_patches = Patches()
# The class and its __init__ as they were when leakguard was imported: if a library
# (gevent's monkey.patch_all) later rebinds socket.socket, the hook stays on the class
# whose __init__ it calls; hooking the new class with the old __init__ breaks every socket.
_socket_class = socket.socket
_original_init = _socket_class.__init__
_fast = registry.fast_record  # compiled path for the common case, None in pure Python


def __init__(self: Any, family: Any = -1, type: Any = -1, proto: Any = -1, fileno: Any = None) -> None:
    _original_init(self, family, type, proto, fileno)
    try:
        if fileno is not None or _fast is None or not _fast(self):
            record_socket(self, fileno is not None)
    except Exception:  # contained: the host's socket is fine, only our record is missing
        _errors[0] += 1


def _looks_like_original(hook: Any) -> Any:
    """What introspection reads of the original ``__init__``, on *hook*: name, qualname,
    module, doc, and ``__wrapped__`` (``inspect.signature`` follows it to the original's)."""
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(hook, attr, getattr(_original_init, attr, None))
    hook.__wrapped__ = _original_init
    return hook


if sys.version_info >= (3, 11):  # a misuse's TypeError names the code's qualname
    __init__.__code__ = __init__.__code__.replace(co_qualname=_original_init.__code__.co_qualname)
_hook = _looks_like_original(__init__)
del __init__


def _slow(sock: Any, inherit: bool) -> None:
    """What the compiled hook calls when the fast path does not apply (looked up at call time)."""
    record_socket(sock, inherit)


def _compiled_hook() -> Any:
    """The same hook compiled (no Python frame per socket), or None in pure Python."""
    sp = registry._speedups
    if _fast is None or sp is None or not hasattr(sp, "make_init"):
        return None
    try:
        hook = sp.make_init(
            _socket_class, _original_init, None if _fast is registry.fast_record else _fast, _slow, _errors, registry._views
        )
        return _looks_like_original(hook)
    except Exception:  # a stale build: the Python hook does the same
        return None


_installed: list[Any] = [None, None]  # the hook instrument() set last, and the _fast it was built with


def instrument() -> None:
    """Put the hook on ``socket.socket.__init__``: the compiled one when it is built and the
    compiled record is in use (``_fast``), else the Python one.  Called again after ``_fast``
    changed (tests switch paths that way), it swaps one for the other."""
    current = vars(_socket_class).get("__init__")
    ours = current is not None and current is _installed[0]
    if ours and _installed[1] is _fast:
        return
    if ours:
        _patches.undo()
    hook = _compiled_hook() or _hook
    _installed[:] = [hook, _fast]
    _patches.set(_socket_class, "__init__", hook)


def hook_class(cls: type) -> bool:
    """Record the sockets of another socket class too: one that does not derive from
    ``socket.socket`` but stands in for it (gevent's, after ``monkey.patch_all()``).

    Its ``__init__`` gets the Python hook around its own original.  True if hooked now,
    False if it is ``socket.socket``'s own class or was hooked already.  Undone by
    :func:`uninstrument`.
    """
    if cls is _socket_class or issubclass(cls, _socket_class) or cls in _extra:
        return False
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        try:
            fileno = kwargs.get("fileno", args[3] if len(args) > 3 else None)
            if fileno is not None or _fast is None or not _fast(self):
                record_socket(self, fileno is not None)
        except Exception:  # contained, as in the main hook
            _errors[0] += 1

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = original.__doc__
    stored = vars(cls).get("__init__")
    _extra[cls] = stored
    try:
        setattr(cls, "__init__", __init__)
    except (TypeError, AttributeError):  # a class that cannot be patched: its sockets go unrecorded
        del _extra[cls]
        return False
    return True


_extra: dict[type, Any] = {}  # class -> the __init__ it stored itself (None: inherited)


def _unhook_classes() -> None:
    for cls, stored in list(_extra.items()):
        try:
            if stored is None:
                delattr(cls, "__init__")
            else:
                setattr(cls, "__init__", stored)
        except (TypeError, AttributeError):
            pass
        del _extra[cls]


def uninstrument() -> None:
    _unhook_classes()
    _patches.undo()
