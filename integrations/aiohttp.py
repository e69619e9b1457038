"""aiohttp: origin ``aiohttp``.

``TCPConnector._create_connection`` runs once per new connection (direct or
through a proxy), never for a request on a pooled keep-alive one.  The socket
itself may be created in a task aiohappyeyeballs starts; the scope is a
context variable, which asyncio copies into such tasks.

A ``ClientSession`` never closed, or a response never released, keeps its
connection open: when the server hangs up, the socket sits in CLOSE_WAIT
with origin ``aiohttp`` and the application line that made the request.
"""

from __future__ import annotations

from typing import Any

from leakguard._patch import Patches

from ._attribution import app_scope, contained, register_package, unregister_package
from ._redact import http_target

REQUIRES = "aiohttp >= 3.8"

_patches = Patches()


def _target(req: Any) -> str | None:
    url = req.url  # yarl.URL: keep scheme, host and port only
    return http_target(url.scheme, url.host, url.port)


async def _create_connection(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    # An async wrapper: the scope must be open while the coroutine runs, not when it is made.
    target = None
    with contained:
        target = _target(args[0] if args else kwargs["req"])
    with app_scope("aiohttp", target):
        return await wrapped(*args, **kwargs)


def instrument() -> None:
    import aiohttp
    import aiohttp.connector

    register_package("aiohttp", aiohttp)
    _patches.wrap(aiohttp.connector, "TCPConnector._create_connection", _create_connection)


def uninstrument() -> None:
    _patches.undo()
    unregister_package("aiohttp")
