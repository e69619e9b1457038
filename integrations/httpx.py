"""httpx (sync and async): origin ``httpx``.

httpx opens connections through httpcore: ``HTTPConnection._connect`` (sync)
and ``AsyncHTTPConnection._connect`` (async) run once per new connection,
never for a request on a pooled keep-alive one (httpcore < 0.14, httpx
0.18-0.20: ``SyncHTTPConnection._open_socket`` / ``AsyncHTTPConnection._open_socket``).  In the async case the socket
may be created in a task the backend starts for happy eyeballs; the scope is
a context variable, which asyncio, anyio and trio copy into such tasks.
"""

from __future__ import annotations

from typing import Any

from leakguard._patch import Patches

from ._attribution import app_scope, contained, register_package, unregister_package
from ._redact import http_target

REQUIRES = "httpx >= 0.18"

_patches = Patches()


def _target(conn: Any) -> str | None:
    origin = getattr(conn, "_origin", None)  # httpcore.Origin(scheme=b"https", host=b"...", port=443)
    if origin is None:  # httpcore < 0.14: conn.origin is a (scheme, host, port) tuple
        scheme, host, port = conn.origin
        return http_target(scheme, host, port)
    return http_target(origin.scheme, origin.host, origin.port)


# Where each httpcore opens a connection's socket, newest first: (sync class, async class, method).
_OPENERS = (
    ("HTTPConnection", "AsyncHTTPConnection", "_connect"),  # httpcore >= 0.14
    ("SyncHTTPConnection", "AsyncHTTPConnection", "_open_socket"),  # httpcore 0.13 (httpx 0.18-0.20)
)


def _connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    target = None
    with contained:
        target = _target(instance)
    with app_scope("httpx", target):
        return wrapped(*args, **kwargs)


async def _aconnect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    # An async wrapper: the scope must be open while the coroutine runs, not when it is made.
    target = None
    with contained:
        target = _target(instance)
    with app_scope("httpx", target):
        return await wrapped(*args, **kwargs)


def instrument() -> None:
    import httpcore._async.connection
    import httpcore._sync.connection
    import httpx

    register_package("httpx", httpx)
    sync, async_ = httpcore._sync.connection, httpcore._async.connection
    for sync_class, async_class, method in _OPENERS:
        if method in vars(getattr(sync, sync_class, object)):
            _patches.wrap(sync, f"{sync_class}.{method}", _connect)
            _patches.wrap(async_, f"{async_class}.{method}", _aconnect)
            return
    raise RuntimeError(f"httpcore {getattr(httpcore, '__version__', '?')}: no connection opener known to leakguard")


def uninstrument() -> None:
    _patches.undo()
    unregister_package("httpx")
