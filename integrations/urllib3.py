"""urllib3: origin ``urllib3`` (or ``requests`` when requests asked for the connection).

``urllib3.connection.HTTPConnection._new_conn`` opens the socket for plain,
TLS and proxied connections alike, once per connection; reused keep-alive
connections never pass through it.  A response read with
``preload_content=False`` and never released keeps its connection checked out
of the pool: when the server hangs up, that socket shows in CLOSE_WAIT with
origin ``urllib3`` and the application line that opened it.
"""

from __future__ import annotations

from typing import Any

from leakguard._patch import Patches

from . import _common

REQUIRES = "urllib3 >= 1.26, < 3"

_patches = Patches()


def _target(conn: Any) -> str | None:
    scheme = "https" if getattr(conn, "default_port", 80) == 443 else "http"
    host = getattr(conn, "_tunnel_host", None)  # through a proxy: where the app is going
    if host:
        return _common.http_target(scheme, host, getattr(conn, "_tunnel_port", None))
    return _common.http_target(scheme, conn.host, conn.port)


def _new_conn(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    try:
        target = _target(instance)
    except Exception:
        target = None
    entered = _common.enter("urllib3", target)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _common.leave(entered)


_users: set[str] = set()  # integrations that need the hook: "urllib3", "requests"


def acquire(user: str) -> None:
    """Put the hook on for *user* (requests needs it even when urllib3's integration is off)."""
    import urllib3.connection

    if not _users:
        _patches.wrap(urllib3.connection, "HTTPConnection._new_conn", _new_conn)
    _users.add(user)


def release(user: str) -> None:
    """Take *user*'s claim back; the hook comes off with the last one."""
    _users.discard(user)
    if not _users:
        _patches.undo()


def instrument() -> None:
    import urllib3

    _common.register_package("urllib3", urllib3)
    acquire("urllib3")


def uninstrument() -> None:
    release("urllib3")
    _common.unregister_package("urllib3")
