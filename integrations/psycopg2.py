"""psycopg2: libpq opens the socket in C, so the socket hook never sees it.

``psycopg2.connect`` is wrapped: the application's stack is captured when it is
called (the creation site is the application's ``connect()`` line) and, once it
returns, the connection's descriptor (``conn.fileno()``) is adopted with origin
``psycopg2`` and the target ``postgresql://user:***@host:5432/db`` built from
the parameters libpq actually used (``conn.info``), never from the DSN text,
so no password or option can slip through.  The record lives as long as the
connection object reports that descriptor.

Inside a SQLAlchemy engine (or any other :func:`registry.scope`), the scope's
origin, target and stack win: such sockets show origin ``sqlalchemy``.

libpq may replace the descriptor (``conn.reset()``, a reconnect); only the
descriptor of the initial connect is covered.
"""

from __future__ import annotations

from typing import Any

from leakguard import registry, stacks
from leakguard._patch import Patches

from ._attribution import contained
from ._pools import capture
from ._redact import redact_dsn

__all__ = ["REQUIRES", "adopt_connection", "instrument", "pg_target", "uninstrument"]

# The distribution is "psycopg2" or "psycopg2-binary": without a "psycopg2" one the gate reads psycopg2.__version__.
REQUIRES = "psycopg2 >= 2.8, < 3"
ORIGIN = "psycopg2"

_patches = Patches()


def pg_target(conn: Any) -> str | None:
    """``postgresql://user:***@host:port/db`` from a psycopg2 / psycopg connection's ``info``."""
    info = conn.info
    return redact_dsn(
        {
            "host": info.host,
            "port": info.port,
            "user": info.user,
            "dbname": info.dbname,
            "password": "***" if info.password else None,
        }
    )


def adopt_connection(
    conn: Any, origin: str, frames: stacks.Frames, sc: registry.Scope | None = None
) -> None:
    """Record the libpq socket of *conn* (a connection that just opened); never raises.

    *sc* is the scope in effect when connect() was called (default: the current one).
    """
    with contained:
        fd = conn.fileno()
        if not isinstance(fd, int) or fd < 0:
            return
        if sc is None:
            sc = registry.current_scope()
        target = sc.target if sc is not None and sc.target else pg_target(conn)
        if sc is not None:
            origin = sc.origin or origin
            if sc.frames is not None:
                frames = sc.frames
        registry.adopt(fd, origin, target=target, frames=frames, owner=conn)


def _connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    frames = capture()
    conn = wrapped(*args, **kwargs)
    adopt_connection(conn, ORIGIN, frames)
    return conn


def instrument() -> None:
    import psycopg2

    _patches.wrap(psycopg2, "connect", _connect)


def uninstrument() -> None:
    _patches.undo()
