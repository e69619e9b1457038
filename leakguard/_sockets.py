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
from .registry import _errors, record_socket

__all__ = ["instrument", "uninstrument"]

_patches = Patches()
_original_init = socket.socket.__init__


def __init__(self: Any, family: Any = -1, type: Any = -1, proto: Any = -1, fileno: Any = None) -> None:
    _original_init(self, family, type, proto, fileno)
    try:
        record_socket(self, fileno is not None)
    except Exception:  # contained: the host's socket is fine, only our record is missing
        _errors[0] += 1


__init__.__qualname__ = "socket.__init__"
__init__.__doc__ = _original_init.__doc__
_hook = __init__
del __init__


def instrument() -> None:
    if vars(socket.socket).get("__init__") is not _hook:
        _patches.set(socket.socket, "__init__", _hook)


def uninstrument() -> None:
    _patches.undo()
