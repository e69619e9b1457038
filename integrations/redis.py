"""redis-py, sync and asyncio: connections, and the connection pool.

Connections: ``_connect`` of each connection class (TCP, TLS, unix socket; sync
and asyncio), the one place a connection opens its socket, runs inside a
:func:`registry.scope`: origin ``redis``, the application's stack (captured once
there; a connection opened for a command is attributed to the command's line)
and the target ``redis://user:***@host:6379/0`` (``rediss://`` with TLS,
``unix:///path.sock?db=0`` for a unix socket).  ``_connect`` runs only when a
socket is really opened, never on the per-command ``connect()`` check.

Pool: ``ConnectionPool.get_connection`` / ``release`` (and BlockingConnectionPool's,
sync and asyncio) mark the connection checked out (with the checkout stack) or
idle.  redis-py checks a connection out for each command and releases it right
after, so a connection idle in the pool is the normal state; one held by a
PubSub, a pipeline or an explicit ``get_connection()`` shows as checked out.
"""

from __future__ import annotations

from typing import Any

from leakguard import registry, stacks
from leakguard._patch import Patches

from . import _pools
from ._attribution import contained, scope
from ._pools import capture
from ._redact import redact_dsn

__all__ = ["REQUIRES", "instrument", "redis_target", "uninstrument"]

REQUIRES = "redis >= 3.5, < 9"
ORIGIN = "redis"

_patches = Patches()


def redis_target(conn: Any) -> str | None:
    """The redacted address a redis-py connection talks to."""
    db = getattr(conn, "db", 0)
    password = getattr(conn, "password", None) or getattr(conn, "credential_provider", None)
    user = getattr(conn, "username", None)
    path = getattr(conn, "path", None)
    if path:
        auth = f"{user or ''}{':***' if password else ''}@" if (user or password) else ""
        return f"unix://{auth}{path}?db={db}"
    scheme = "rediss" if "SSL" in type(conn).__name__ else "redis"
    return redact_dsn(
        {
            "host": getattr(conn, "host", None),
            "port": getattr(conn, "port", None),
            "user": user,
            "db": db,
            "password": "***" if password else None,
        },
        scheme=scheme,
    )


def _scope(instance: Any, frames: stacks.Frames) -> scope:
    target = None
    with contained:
        target = redis_target(instance)
    return scope(ORIGIN, target, frames)


def _connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    with _scope(instance, capture()):
        return wrapped(*args, **kwargs)


def _aconnect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    # The scope is opened when the coroutine runs (in the task's context), not here.
    return _aconnect_scoped(wrapped, instance, args, kwargs, capture())


async def _aconnect_scoped(wrapped: Any, instance: Any, args: Any, kwargs: Any, frames: stacks.Frames) -> Any:
    with _scope(instance, frames):
        return await wrapped(*args, **kwargs)


def _pool_name(pool: Any) -> str:
    return f"redis {type(pool).__name__}"


def _checked_out(conn: Any, pool: Any, frames: stacks.Frames) -> None:
    try:
        _pools.checked_out(conn, _pool_name(pool), ORIGIN, frames)
    except Exception:
        registry.count_error()


def _get_connection(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    frames = capture()
    conn = wrapped(*args, **kwargs)
    _checked_out(conn, instance, frames)
    return conn


def _release(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    try:
        _pools.checked_in(args[0] if args else kwargs["connection"])
    except Exception:
        registry.count_error()
    return wrapped(*args, **kwargs)


async def _aget_run(wrapped: Any, instance: Any, args: Any, kwargs: Any, frames: stacks.Frames) -> Any:
    conn = await wrapped(*args, **kwargs)
    _checked_out(conn, instance, frames)
    return conn


def _aget_connection(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return _aget_run(wrapped, instance, args, kwargs, capture())


def _wrap_defined(module: Any, classes: tuple[str, ...], method: str, wrapper: Any) -> None:
    """Wrap *method* on each class that defines it itself (subclasses override it)."""
    for name in classes:
        cls = getattr(module, name, None)
        if isinstance(cls, type) and method in vars(cls):
            _patches.wrap(module, f"{name}.{method}", wrapper)


def instrument() -> None:
    import redis.connection

    connections = ("Connection", "SSLConnection", "UnixDomainSocketConnection")
    _wrap_defined(redis.connection, connections, "_connect", _connect)
    pools = ("ConnectionPool", "BlockingConnectionPool")
    _wrap_defined(redis.connection, pools, "get_connection", _get_connection)
    _wrap_defined(redis.connection, pools, "release", _release)
    try:
        import redis.asyncio.connection as aio
    except ImportError:  # redis-py without asyncio support
        return
    _wrap_defined(aio, connections, "_connect", _aconnect)
    _wrap_defined(aio, pools, "get_connection", _aget_connection)
    # asyncio release() is a coroutine in redis-py >= 5: checking in before it is awaited is the same.
    _wrap_defined(aio, pools, "release", _release)


def uninstrument() -> None:
    _patches.undo()
    _pools.stop()
