"""The hook on ``socket.socket.__init__``: every Python socket passes through it.

``socket.create_connection``, ``socketpair``, ``fromfd``, ``accept()``,
``ssl.SSLContext.wrap_socket`` and asyncio's transports all construct a
``socket.socket`` (or subclass), so one hook records them all.  It is a plain
function rather than a wrapt proxy because it runs for every socket: a wrapt
bound wrapper alone costs about the whole budget (see MEASURED.md).  Nothing is
hooked on ``close()``; see :mod:`leakguard.registry`.
"""

from __future__ import annotations

import socket
from typing import Any

from ._patch import Patches
from . import registry
from .registry import _errors, record_socket

__all__ = ["instrument", "uninstrument"]

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


__init__.__qualname__ = "socket.__init__"
__init__.__doc__ = _original_init.__doc__
_hook = __init__
del __init__


def instrument() -> None:
    if vars(_socket_class).get("__init__") is not _hook:
        _patches.set(_socket_class, "__init__", _hook)


def uninstrument() -> None:
    _patches.undo()
