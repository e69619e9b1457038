"""psycopg_pool: which pooled connection is checked out, where, for how long.

- ``ConnectionPool.__init__`` (and the async pool's) captures the application's
  stack: the pool's connections are opened later by its worker threads, where no
  application frame exists, so their creation site is the line that made the pool.
- ``_connect`` runs in a :func:`registry.scope` with that stack (origin
  ``psycopg``; the psycopg integration adopts the libpq socket), and the new
  connection is marked idle in the pool.
- ``getconn`` (which ``connection()`` calls) marks the connection checked out,
  with the checkout stack; ``putconn`` marks it back in (and reports it under
  ``checkout_threshold`` when it was held too long).

Pool names read ``psycopg_pool <pool.name>`` (``pool-1`` unless named).
"""

from __future__ import annotations

import weakref
from typing import Any

from leakguard import registry, stacks
from leakguard._patch import Patches

from . import _pools
from ._attribution import contained, scope
from ._pools import capture
from .psycopg2 import pg_target

__all__ = ["REQUIRES", "instrument", "uninstrument"]

REQUIRES = "psycopg-pool >= 3.1, < 4"
ORIGIN = "psycopg"

_patches = Patches()
_pool_frames: weakref.WeakKeyDictionary[Any, stacks.Frames] = weakref.WeakKeyDictionary()


def _name(pool: Any) -> str:
    return f"psycopg_pool {getattr(pool, 'name', None) or type(pool).__name__}"


def _init(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    with contained:
        _pool_frames[instance] = capture()
    return wrapped(*args, **kwargs)


def _pooled(conn: Any, pool: Any) -> None:
    _pools.mark_pooled(conn, _name(pool), ORIGIN, _pool_frames.get(pool, ()), pg_target)


# --------------------------------------------------------------------------- sync pool


def _connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    with scope(ORIGIN, None, _pool_frames.get(instance)):
        conn = wrapped(*args, **kwargs)
    _pooled(conn, instance)
    return conn


def _getconn(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    frames = capture()
    conn = wrapped(*args, **kwargs)
    _pools.mark_out(conn, _name(instance), ORIGIN, frames)
    return conn


def _putconn(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    _pools.mark_in(args[0] if args else kwargs.get("conn"))
    return wrapped(*args, **kwargs)


# --------------------------------------------------------------------------- async pool


async def _aconnect_run(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    with scope(ORIGIN, None, _pool_frames.get(instance)):  # inside the coroutine: the task's scope
        conn = await wrapped(*args, **kwargs)
    _pooled(conn, instance)
    return conn


def _aconnect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return _aconnect_run(wrapped, instance, args, kwargs)


async def _agetconn_run(wrapped: Any, instance: Any, args: Any, kwargs: Any, frames: stacks.Frames) -> Any:
    conn = await wrapped(*args, **kwargs)
    _pools.mark_out(conn, _name(instance), ORIGIN, frames)
    return conn


def _agetconn(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return _agetconn_run(wrapped, instance, args, kwargs, capture())


def instrument() -> None:
    import psycopg_pool.pool
    import psycopg_pool.pool_async

    _patches.wrap(psycopg_pool.pool, "ConnectionPool.__init__", _init)
    _patches.wrap(psycopg_pool.pool, "ConnectionPool._connect", _connect)
    _patches.wrap(psycopg_pool.pool, "ConnectionPool.getconn", _getconn)
    _patches.wrap(psycopg_pool.pool, "ConnectionPool.putconn", _putconn)
    _patches.wrap(psycopg_pool.pool_async, "AsyncConnectionPool.__init__", _init)
    _patches.wrap(psycopg_pool.pool_async, "AsyncConnectionPool._connect", _aconnect)
    _patches.wrap(psycopg_pool.pool_async, "AsyncConnectionPool.getconn", _agetconn)
    _patches.wrap(psycopg_pool.pool_async, "AsyncConnectionPool.putconn", _putconn)
    # The null pools have their own __init__ (and nothing else we need).
    import psycopg_pool.null_pool
    import psycopg_pool.null_pool_async

    _patches.wrap(psycopg_pool.null_pool, "NullConnectionPool.__init__", _init)
    _patches.wrap(psycopg_pool.null_pool_async, "AsyncNullConnectionPool.__init__", _init)


def uninstrument() -> None:
    _patches.undo()
    _pools.stop()
