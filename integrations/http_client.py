"""http.client (and urllib.request, which uses it): origin ``http.client``.

``HTTPConnection.connect`` is where the standard library opens its socket
(``HTTPSConnection.connect`` calls it before wrapping TLS); it runs once per
connection, never for a request on an open keep-alive connection.
"""

from __future__ import annotations

from typing import Any

from leakguard._patch import Patches

from ._attribution import app_scope, contained, register_package, unregister_package
from ._redact import http_target

REQUIRES = None  # standard library

_patches = Patches()


def _target(conn: Any) -> str | None:
    import http.client

    scheme = "https" if isinstance(conn, http.client.HTTPSConnection) else "http"
    host = getattr(conn, "_tunnel_host", None)  # through a proxy: where the app is going
    if host:
        return http_target(scheme, host, getattr(conn, "_tunnel_port", None))
    return http_target(scheme, conn.host, conn.port)


def _connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    target = None
    with contained:
        target = _target(instance)
    with app_scope("http.client", target):
        return wrapped(*args, **kwargs)


def instrument() -> None:
    import http.client

    register_package("http.client", http.client)
    _patches.wrap(http.client, "HTTPConnection.connect", _connect)


def uninstrument() -> None:
    _patches.undo()
    unregister_package("http.client")
