"""httpx (sync and async): origin ``httpx``.

httpx opens connections through httpcore: ``HTTPConnection._connect`` (sync)
and ``AsyncHTTPConnection._connect`` (async) run once per new connection,
never for a request on a pooled keep-alive one.  In the async case the socket
may be created in a task the backend starts for happy eyeballs; the scope is
a context variable, which asyncio, anyio and trio copy into such tasks.
"""

from __future__ import annotations

from typing import Any

from leakguard._patch import Patches

from . import _common

REQUIRES = "httpx >= 0.23"

_patches = Patches()


def _target(conn: Any) -> str | None:
    origin = conn._origin  # httpcore.Origin(scheme=b"https", host=b"...", port=443)
    return _common.http_target(origin.scheme, origin.host, origin.port)


def _connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    try:
        target = _target(instance)
    except Exception:
        target = None
    entered = _common.enter("httpx", target)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _common.leave(entered)


async def _aconnect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    # An async wrapper: the scope must be open while the coroutine runs, not when it is made.
    try:
        target = _target(instance)
    except Exception:
        target = None
    entered = _common.enter("httpx", target)
    try:
        return await wrapped(*args, **kwargs)
    finally:
        _common.leave(entered)


def instrument() -> None:
    import httpcore._async.connection
    import httpcore._sync.connection
    import httpx

    _common.register_package("httpx", httpx)
    _patches.wrap(httpcore._sync.connection, "HTTPConnection._connect", _connect)
    _patches.wrap(httpcore._async.connection, "AsyncHTTPConnection._connect", _aconnect)


def uninstrument() -> None:
    _patches.undo()
    _common.unregister_package("httpx")
