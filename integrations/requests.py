"""requests: origin ``requests`` for the sockets urllib3 opens on its behalf.

requests opens no socket itself; urllib3 does, inside
``HTTPConnection._new_conn`` (see :mod:`leakguard.integrations.urllib3`).
That hook captures the application's stack once per new connection, and
requests' frames on it name the origin ``requests``.  Nothing runs per
request, so keep-alive requests through a ``Session`` cost nothing extra.
"""

from __future__ import annotations

from . import _common
from . import urllib3 as _urllib3

REQUIRES = "requests >= 2.26"


def instrument() -> None:
    import requests

    _common.register_package("requests", requests)
    _urllib3.acquire("requests")


def uninstrument() -> None:
    _urllib3.release("requests")
    _common.unregister_package("requests")
