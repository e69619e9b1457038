"""PyMySQL: the socket is a Python socket opened in ``Connection.connect``.

``pymysql.connections.Connection.connect`` is wrapped with a
:func:`registry.scope`: the socket gets origin ``pymysql``, the application's
stack (captured once, at the wrapper) and the target
``mysql://user:***@host:3306/db`` from the connection's own parameters.  A
surrounding scope (a SQLAlchemy engine) keeps its origin, target and stack.
"""

from __future__ import annotations

from typing import Any

from leakguard._patch import Patches

from ._attribution import contained, scope
from ._pools import capture
from ._redact import redact_dsn

__all__ = ["REQUIRES", "instrument", "mysql_target", "uninstrument"]

REQUIRES = "pymysql >= 0.9, < 2"
ORIGIN = "pymysql"

_patches = Patches()


def mysql_target(conn: Any) -> str | None:
    """``mysql://user:***@host:port/db`` (or ``mysql://user@/path/to/mysqld.sock``)."""
    unix = getattr(conn, "unix_socket", None)
    if unix:
        user = conn.user.decode("utf-8", "replace") if isinstance(conn.user, bytes) else conn.user
        auth = f"{user}{':***' if conn.password else ''}@" if user else ""
        db = conn.db.decode("utf-8", "replace") if isinstance(conn.db, bytes) else conn.db
        return f"mysql://{auth}{unix}" + (f"/{db}" if db else "")
    return redact_dsn(
        {
            "host": conn.host,
            "port": conn.port,
            "user": conn.user,
            "database": conn.db,
            "password": "***" if conn.password else None,
        },
        scheme="mysql",
    )


def _connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    frames = capture()
    target = None
    with contained:
        target = mysql_target(instance)
    with scope(ORIGIN, target, frames):
        return wrapped(*args, **kwargs)


def instrument() -> None:
    import pymysql.connections

    _patches.wrap(pymysql.connections, "Connection.connect", _connect)


def uninstrument() -> None:
    _patches.undo()
