"""requests: origin ``requests`` for the sockets urllib3 opens on its behalf, and the owning Session.

requests opens no socket itself; urllib3 does, inside
``HTTPConnection._new_conn`` (see :mod:`leakguard.integrations.urllib3`).
That hook captures the application's stack once per new connection, and
requests' frames on it name the origin ``requests``.  ``Session.mount`` (which
``Session()`` calls for its two default adapters) tells urllib3's integration
that the adapter's PoolManager belongs to this Session, so a pooled connection
names its owner: ``requests.Session created at app.py:12``.  Nothing runs per
request beyond urllib3's pool checkout, so keep-alive requests through a
``Session`` cost nothing extra here.
"""

from __future__ import annotations

from typing import Any

from leakguard._patch import Patches

from . import _pools
from ._attribution import contained, register_package, unregister_package
from . import urllib3 as _urllib3

REQUIRES = "requests >= 2.26"

_patches = Patches()


def _mount(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    result = wrapped(*args, **kwargs)
    with contained:
        adapter = args[1] if len(args) > 1 else kwargs.get("adapter")
        manager = getattr(adapter, "poolmanager", None)
        if manager is not None:
            label = f"{type(instance).__module__.partition('.')[0]}.{type(instance).__name__} {id(instance):#x}"
            _urllib3.set_owner(manager, instance, label, _pools.capture())
    return result


def instrument() -> None:
    import requests
    import requests.sessions

    register_package("requests", requests)
    _urllib3.acquire("requests")
    _patches.wrap(requests.sessions, "Session.mount", _mount)


def uninstrument() -> None:
    _patches.undo()
    _urllib3.release("requests")
    unregister_package("requests")
