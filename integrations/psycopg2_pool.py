"""psycopg2.pool: which pooled connection is checked out, where, for how long.

``SimpleConnectionPool`` and ``ThreadedConnectionPool`` share the key-based code
of ``AbstractConnectionPool``; that is what is wrapped, so subclasses built the
same way are covered too.

- ``__init__`` captures the application's stack.  The pool opens ``minconn``
  connections right there and more later, inside whatever ``getconn()`` finds the
  pool empty; every connection it opens gets the pool's creation line as its
  creation site (the ``getconn()`` line is the checkout stack's business).
- ``_connect`` runs in a :func:`registry.scope` with that stack (origin
  ``psycopg2``; the psycopg2 integration adopts the libpq socket) and marks the
  new connection idle in the pool.
- ``_getconn`` marks the connection checked out, with the checkout stack;
  ``_putconn`` (also with ``close=True``) marks it back in once the pool took it,
  and ``_closeall`` marks in what was still checked out (the pool closed it).
  ``ThreadedConnectionPool`` calls these under its lock, so a connection put
  back is never seen checked out by another thread before it is marked in.
  ``SimpleConnectionPool``'s public methods are the very same functions, bound
  under other names: those names are wrapped as well.

Pool names read ``psycopg2.pool ThreadedConnectionPool`` (the pool's class).
"""

from __future__ import annotations

import weakref
from typing import Any

from leakguard import stacks
from leakguard._patch import Patches

from . import _pools
from ._attribution import contained, scope
from ._pools import capture
from .psycopg2 import pg_target

__all__ = ["REQUIRES", "instrument", "uninstrument"]

# The distribution is "psycopg2" or "psycopg2-binary": without a "psycopg2" one the gate reads psycopg2.__version__.
REQUIRES = "psycopg2 >= 2.8, < 3"
ORIGIN = "psycopg2"

_patches = Patches()
_pool_frames: weakref.WeakKeyDictionary[Any, stacks.Frames] = weakref.WeakKeyDictionary()

#: AbstractConnectionPool's method -> the public name SimpleConnectionPool binds it to
_METHODS = (("_getconn", "getconn"), ("_putconn", "putconn"), ("_closeall", "closeall"))


def _name(pool: Any) -> str:
    return f"psycopg2.pool {type(pool).__name__}"


def _init(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    with contained:
        _pool_frames[instance] = capture()  # before the call: __init__ opens minconn connections
    return wrapped(*args, **kwargs)


def _connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    frames = _pool_frames.get(instance)
    if frames is None:  # a pool made before install(): the line that made it open one
        frames = capture()
    with scope(ORIGIN, None, frames):
        conn = wrapped(*args, **kwargs)
    _pools.mark_pooled(conn, _name(instance), ORIGIN, frames, pg_target)
    return conn


def _getconn(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    frames = capture()
    conn = wrapped(*args, **kwargs)
    _pools.mark_out(conn, _name(instance), ORIGIN, frames)
    return conn


def _putconn(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    result = wrapped(*args, **kwargs)
    # After the call: a connection the pool refused (not one of its own, pool closed) stays out.
    _pools.mark_in(args[0] if args else kwargs.get("conn"))
    return result


def _closeall(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    held: list[Any] = []
    with contained:
        held = list(instance._used.values())
    result = wrapped(*args, **kwargs)
    for conn in held:
        _pools.mark_in(conn)  # closed by the pool: nothing is out any more
    return result


_WRAPPERS = {"_getconn": _getconn, "_putconn": _putconn, "_closeall": _closeall}


def instrument() -> None:
    import psycopg2.pool

    module = psycopg2.pool
    base = module.AbstractConnectionPool
    _patches.wrap(module, "AbstractConnectionPool.__init__", _init)
    _patches.wrap(module, "AbstractConnectionPool._connect", _connect)
    for private, public in _METHODS:
        original = vars(base)[private]
        # Aliases (SimpleConnectionPool.getconn = AbstractConnectionPool._getconn) bypass the wrapped
        # name; a public method that calls the private one (ThreadedConnectionPool's) goes through it.
        aliases = [
            name
            for name in ("SimpleConnectionPool", "ThreadedConnectionPool")
            if vars(getattr(module, name)).get(public) is original
        ]
        _patches.wrap(module, f"AbstractConnectionPool.{private}", _WRAPPERS[private])
        for name in aliases:
            _patches.wrap(module, f"{name}.{public}", _WRAPPERS[private])


def uninstrument() -> None:
    _patches.undo()
    _pools.stop()
