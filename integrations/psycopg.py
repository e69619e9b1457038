"""psycopg (3): libpq opens the socket in C, so the socket hook never sees it.

``psycopg.Connection.connect`` and ``psycopg.AsyncConnection.connect`` (and the
``psycopg.connect`` alias, bound at import time) are wrapped the same way as
psycopg2's ``connect``: the application's stack is captured when connect() is
called, and the returned connection's ``fileno()`` is adopted with origin
``psycopg`` and a target built from ``conn.info`` (``postgresql://user:***@host:5432/db``).
A surrounding :func:`registry.scope` (SQLAlchemy, psycopg_pool) gives its origin,
target and stack instead; for the async variant the scope in effect when
connect() was *called* counts (SQLAlchemy's greenlet bridge runs the coroutine
in another context).
"""

from __future__ import annotations

from typing import Any

from leakguard import registry, stacks
from leakguard._patch import Patches

from ._pools import capture
from .psycopg2 import adopt_connection

__all__ = ["REQUIRES", "instrument", "uninstrument"]

REQUIRES = "psycopg >= 3.1, < 4"
ORIGIN = "psycopg"

_patches = Patches()


def _connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    frames = capture()
    conn = wrapped(*args, **kwargs)
    adopt_connection(conn, ORIGIN, frames)
    return conn


async def _connect_async(
    wrapped: Any, args: Any, kwargs: Any, frames: stacks.Frames, sc: registry.Scope | None
) -> Any:
    conn = await wrapped(*args, **kwargs)
    adopt_connection(conn, ORIGIN, frames, sc)
    return conn


def _aconnect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    frames = capture()
    return _connect_async(wrapped, args, kwargs, frames, registry.current_scope())


def instrument() -> None:
    import psycopg

    _patches.wrap(psycopg, "Connection.connect", _connect)
    _patches.wrap(psycopg, "AsyncConnection.connect", _aconnect)
    if getattr(psycopg, "connect", None) is not None and not isinstance(
        getattr(psycopg, "connect"), type
    ):
        _patches.wrap(psycopg, "connect", _connect)  # the alias bound at import: not the class attribute


def uninstrument() -> None:
    _patches.undo()
