"""GC watch: sockets never closed but freed by the garbage collector (what ``ResourceWarning`` reports).

While a session watches, ``socket.socket.__del__`` is a property whose getter records the
socket (its registry entry, kind and peer) and returns the C finalizer, which then warns
and closes as without leakguard.  The checker takes the events at each test's teardown.
"""

from __future__ import annotations

import _socket
import socket
import time
from typing import Any

from leakguard import kernel, registry
from leakguard.snapshot import _type_name

__all__ = ["GcEvent", "events", "take_events", "unwatch", "watch"]


class GcEvent:
    """A socket that was never closed and was freed by the garbage collector."""

    __slots__ = ("at", "entry", "fd", "kind", "peer")

    def __init__(self, fd: int, entry: Any, kind: str, peer: str | None, at: float) -> None:
        self.fd = fd
        self.entry = entry  # the registry's raw entry: (ref, created, seq, frames, scope)
        self.kind = kind
        self.peer = peer
        self.at = at

    @property
    def seq(self) -> int:
        return int(self.entry[2])

    @property
    def rec(self) -> registry.Record:
        # A fresh view: the table's own may already describe a newer socket on this fd.
        return registry.Record(self.fd, self.entry)


events: list[GcEvent] = []
_orig_socket_del: Any = getattr(_socket.socket, "__del__")  # the C finalizer (warns, closes)


def _socket_del_get(self: Any) -> Any:
    # The finalizer of a socket freed while still open (close() and detach()
    # leave fd -1) is looked up here; the lookup records it and returns the C
    # finalizer bound to the socket, which CPython then calls.  Not a Python
    # __del__ calling the C one: that frame would be the one the finalizer's
    # ResourceWarning is attributed to (leakguard/pytest_plugin/_gcwatch.py instead of
    # the code that dropped the socket), which changes what filters by module
    # or location, once-per-location and a suite checking the warning's file
    # see.  This frame has returned before the finalizer warns.
    try:
        fd = _socket.socket.fileno(self)
        if fd >= 0:
            entry = registry.entry(fd)
            if entry is not None and entry[0] is not None:
                obj = entry[0]()
                if (obj is None or obj is self) and len(events) < 10_000:
                    try:
                        peer = kernel.format_address(self.family, self.getpeername())
                    except OSError:
                        peer = None
                    kind = _type_name(int(self.family), int(self.type))
                    events.append(GcEvent(fd, entry, kind, peer, time.monotonic()))
    except Exception:  # contained: freeing the socket must go on exactly as without us
        pass
    return _orig_socket_del.__get__(self, type(self))


#: ``socket.socket.__del__`` while watching: a property, so that only the lookup is Python code.
_socket_del = property(_socket_del_get, doc="the finalizer of socket objects (leakguard records GC-freed sockets)")


def take_events() -> list[GcEvent]:
    """The events recorded so far (taken off the list) whose socket is really gone.

    Reading ``sock.__del__`` by hand runs the lookup too; such a socket is still
    alive and is not reported (its real finalization records it again).
    """
    taken = events[:]
    del events[: len(taken)]
    out = []
    for ev in taken:
        ref = ev.entry[0]
        if ref is None or ref() is None:
            out.append(ev)
    return out


_watchers = [0]  # sessions watching (an in-process pytester run nests one in another)


def watch() -> None:
    _watchers[0] += 1
    if vars(socket.socket).get("__del__") is None:
        socket.socket.__del__ = _socket_del  # type: ignore[attr-defined]


def unwatch() -> None:
    _watchers[0] = max(_watchers[0] - 1, 0)
    if _watchers[0] == 0:
        if vars(socket.socket).get("__del__") is _socket_del:
            del socket.socket.__del__  # type: ignore[attr-defined]
        events.clear()
