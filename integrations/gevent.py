"""gevent: the sockets of gevent's monkey-patched ``socket`` module are recorded too.

``gevent.monkey.patch_all()`` (or ``patch_socket()``) rebinds ``socket.socket``
to gevent's own class, which does not derive from the standard one, so the hook
on ``socket.socket.__init__`` never sees its sockets when leakguard was imported
before the patch (as under ``leakguard run``, or a gunicorn gevent worker that
patches after the application imported leakguard).  This integration hooks
gevent's class as well:

- at once, when gevent has already patched ``socket`` by the time it is applied;
- otherwise when gevent announces the patch: a subscriber to ``gevent.events``
  (gevent's own plugin interface, zope.event) hooks the class on
  ``GeventDidPatchModuleEvent`` for ``socket``.

gevent's sockets then carry the application's creation stack like any other.
"""

from __future__ import annotations

import sys
from typing import Any

from leakguard import _sockets

from ._attribution import contained

__all__ = ["REQUIRES", "instrument", "uninstrument"]

REQUIRES = "gevent >= 20.9"


def _hook_patched_socket() -> None:
    mod = sys.modules.get("socket")
    cls = getattr(mod, "socket", None)
    if isinstance(cls, type) and cls.__module__.startswith("gevent"):
        _sockets.hook_class(cls)


def _on_event(event: Any) -> None:
    with contained:  # gevent's patching goes on exactly as without us
        from gevent import events

        if isinstance(event, events.GeventDidPatchModuleEvent) and event.module_name == "socket":
            _hook_patched_socket()


def instrument() -> None:
    from gevent import events

    if _on_event not in events.subscribers:
        events.subscribers.append(_on_event)
    _hook_patched_socket()


def uninstrument() -> None:
    try:
        from gevent import events

        while _on_event in events.subscribers:
            events.subscribers.remove(_on_event)
    except ImportError:  # pragma: no cover - gevent gone from sys.modules
        pass
    _sockets._unhook_classes()
