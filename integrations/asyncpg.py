"""asyncpg: sockets are opened by asyncio (Python), inside ``asyncpg.connect``.

``asyncpg.connect`` (also as ``asyncpg.connection.connect``, which asyncpg's pool
calls) is wrapped: the application's stack is captured when connect() is
*called*, and the coroutine runs inside a :func:`registry.scope` so the socket
asyncio creates gets origin ``asyncpg``, that stack and a redacted target from
the arguments (``postgresql://user:***@host:5432/db``).  Once connected, the
target is refined from what asyncpg actually used (address, user, database).
A scope in effect at call time (SQLAlchemy) keeps its origin, target and stack.
"""

from __future__ import annotations

from typing import Any

from leakguard import registry, stacks
from leakguard._patch import Patches

from ._attribution import contained, scope
from ._pools import capture, fd_of
from ._redact import redact_dsn

__all__ = ["REQUIRES", "instrument", "resolved_target", "uninstrument"]

REQUIRES = "asyncpg >= 0.27, < 1"
ORIGIN = "asyncpg"

_patches = Patches()
_KEYS = ("host", "port", "user", "password", "database")


def _target(args: Any, kwargs: Any) -> str | None:
    dsn = args[0] if args else kwargs.get("dsn")
    extra = {k: kwargs[k] for k in _KEYS if kwargs.get(k) is not None}
    if isinstance(extra.get("host"), (list, tuple)):
        extra["host"] = ",".join(map(str, extra["host"]))
    if isinstance(extra.get("port"), (list, tuple)):
        extra["port"] = ",".join(map(str, extra["port"]))
    return redact_dsn(dsn if isinstance(dsn, str) else None, **extra)


def resolved_target(conn: Any) -> str | None:
    """The target from what asyncpg connected to (private attributes, best effort)."""
    addr, params = conn._addr, conn._params
    host, port = (addr, None) if isinstance(addr, str) else (addr[0], addr[1])
    return redact_dsn(
        {
            "host": host,
            "port": port,
            "user": params.user,
            "database": params.database,
            "password": "***" if params.password else None,
        }
    )


async def _run(
    wrapped: Any,
    args: Any,
    kwargs: Any,
    origin: str,
    target: str | None,
    frames: stacks.Frames,
    refine: bool,
) -> Any:
    with scope(origin, target, frames):
        conn = await wrapped(*args, **kwargs)
    if refine:
        with contained:
            fd = fd_of(conn)
            if fd is not None:
                registry.annotate(fd, target=resolved_target(conn))
    return conn


def _connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    frames = capture()
    origin, target, refine = ORIGIN, None, False
    with contained:
        sc = registry.current_scope()
        if sc is not None:  # SQLAlchemy's greenlet bridge: the scope is visible here only
            origin, target = sc.origin or origin, sc.target
            frames = sc.frames if sc.frames is not None else frames
        if target is None:
            target, refine = _target(args, kwargs), True
    return _run(wrapped, args, kwargs, origin, target, frames, refine)


def instrument() -> None:
    import asyncpg
    import asyncpg.connection

    _patches.wrap(asyncpg.connection, "connect", _connect)
    if vars(asyncpg).get("connect") is not None:
        _patches.wrap(asyncpg, "connect", _connect)


def uninstrument() -> None:
    _patches.undo()
