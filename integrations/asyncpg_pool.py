"""asyncpg's Pool: which pooled connection is acquired, where, for how long.

- ``Pool.__init__`` (``asyncpg.create_pool(...)`` calls it) captures the
  application's stack: the pool opens connections in tasks of its own (the
  initial ones after the first, the ``min_size`` upkeep, lazily on ``acquire``
  under a timeout), where no application frame exists, so every connection it
  opens gets the line that made the pool as its creation site.
- ``Pool._get_new_connection`` (every connection the pool opens, also with a
  custom ``connect=``) runs in a :func:`registry.scope` with that stack (origin
  ``asyncpg``; the asyncpg integration records the socket, with the target) and
  marks the new connection idle in the pool.
- ``Pool._acquire``, which both ``await pool.acquire()`` and
  ``async with pool.acquire()`` call from the application's frame, captures the
  checkout stack and, once the connection is there, marks it checked out.
- ``Pool.release`` marks it back in (before the release runs: once the holder is
  back in the queue, another task may acquire it).

The pool state is kept for the driver connection (the holder's ``_con``), not
for the ``PoolConnectionProxy`` the application gets: a proxy is detached at
release, the connection stays.  ``Pool`` takes no weak references, so the
creation stacks are kept by ``id(pool)``, set anew by every pool's ``__init__``
and dropped by ``close()`` / ``terminate()``.

Pool names read ``asyncpg Pool`` (the pool's class).
"""

from __future__ import annotations

from typing import Any

from leakguard import registry, stacks
from leakguard._patch import Patches

from . import _pools
from ._attribution import contained, scope
from ._pools import capture
from .asyncpg import resolved_target

__all__ = ["REQUIRES", "instrument", "uninstrument"]

REQUIRES = "asyncpg >= 0.27, < 1"
ORIGIN = "asyncpg"

_patches = Patches()
#: id(pool) -> the stack that created it; a pool dropped without close() leaves its entry, so bounded
_pool_frames: dict[int, stacks.Frames] = {}
_MAX_POOLS = 1024
_proxy_class: list[type | None] = [None]  # asyncpg.pool.PoolConnectionProxy, once instrumented


def _name(pool: Any) -> str:
    return f"asyncpg {type(pool).__name__}"


def _init(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    with contained:
        frames = capture()
        key = id(instance)
        _pool_frames.pop(key, None)  # a dead pool's entry under a reused id: this one is the newest
        _pool_frames[key] = frames
        while len(_pool_frames) > _MAX_POOLS:
            _pool_frames.pop(next(iter(_pool_frames)), None)
    try:
        return wrapped(*args, **kwargs)
    except BaseException:
        _pool_frames.pop(id(instance), None)  # bad arguments: no pool
        raise


async def _new_connection_run(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    frames = _pool_frames.get(id(instance))
    with scope(ORIGIN, None, frames):  # inside the coroutine: the scope belongs to the task that connects
        conn = await wrapped(*args, **kwargs)
    _pools.mark_pooled(conn, _name(instance), ORIGIN, frames or (), resolved_target)
    return conn


def _new_connection(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return _new_connection_run(wrapped, instance, args, kwargs)


async def _acquire_run(wrapped: Any, instance: Any, args: Any, kwargs: Any, frames: stacks.Frames) -> Any:
    proxy = await wrapped(*args, **kwargs)
    _pools.mark_out(getattr(proxy, "_con", None), _name(instance), ORIGIN, frames)
    return proxy


def _acquire(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    # Called from the application's frame: PoolAcquireContext.__aenter__ / __await__.
    return _acquire_run(wrapped, instance, args, kwargs, capture())


def _release(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    try:
        proxy: Any = args[0] if args else kwargs.get("connection")
        is_proxy = type(proxy) is _proxy_class[0]
        holder = proxy._holder if is_proxy else None
        # The same test asyncpg makes: a connection of another pool is refused and stays out.
        if holder is not None and holder._pool is instance and proxy._con is not None:
            _pools.checked_in(proxy._con)
    except Exception:
        registry.count_error()
    return wrapped(*args, **kwargs)


def _closing(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    _pool_frames.pop(id(instance), None)  # the pool opens no more connections
    return wrapped(*args, **kwargs)


def instrument() -> None:
    import asyncpg.pool

    _proxy_class[0] = asyncpg.pool.PoolConnectionProxy
    _patches.wrap(asyncpg.pool, "Pool.__init__", _init)
    _patches.wrap(asyncpg.pool, "Pool._get_new_connection", _new_connection)
    _patches.wrap(asyncpg.pool, "Pool._acquire", _acquire)
    _patches.wrap(asyncpg.pool, "Pool.release", _release)
    _patches.wrap(asyncpg.pool, "Pool.close", _closing)
    _patches.wrap(asyncpg.pool, "Pool.terminate", _closing)


def uninstrument() -> None:
    _patches.undo()
    _pools.stop()
    _pool_frames.clear()
    _proxy_class[0] = None
