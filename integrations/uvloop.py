"""uvloop: its loop connects and accepts in C, so no ``socket.socket`` is ever made.

``uvloop.Loop``'s ``create_connection`` / ``create_server`` (and unix variants,
``connect_accepted_socket``, ``sock_accept``, ``create_task``) are wrapped by
the asyncio integration's wrappers (:mod:`leakguard.integrations.asyncio`): each
transport's descriptor is adopted with the stack of the call that asked for it,
a server's connections with the handler and the line that started the server.
"""

from __future__ import annotations

from leakguard._patch import Patches

from .asyncio import wrap_loop_class

__all__ = ["REQUIRES", "instrument", "uninstrument"]

REQUIRES = "uvloop >= 0.15"

_patches = Patches()


def instrument() -> None:
    import uvloop

    wrap_loop_class(_patches, uvloop, "Loop")


def uninstrument() -> None:
    _patches.undo()
