"""urllib3: origin ``urllib3`` (or ``requests`` when requests asked for the connection), and pool state.

``urllib3.connection.HTTPConnection._new_conn`` opens the socket for plain,
TLS and proxied connections alike, once per connection; reused keep-alive
connections never pass through it.

Pools: ``HTTPConnectionPool._get_conn`` / ``_put_conn`` (HTTPS pools inherit them)
mark a connection checked out (with the checkout stack) or idle in its pool, so a
keep-alive connection the server closed while it sat in the pool (the common
CLOSE_WAIT of every urllib3 user: requests, boto3, elasticsearch, ...) says
"idle in pool ``urllib3 HTTPConnectionPool(http://host:80, maxsize=10)`` for 30 s",
and a response read with ``preload_content=False`` and never released says
"checked out" with the line that asked for it.  ``PoolManager._new_pool`` tells
which manager a pool belongs to, and the requests integration which
``requests.Session`` owns that manager (:func:`set_owner`).  urllib3 1.25 to 2.x
name these methods alike.  The connection is checked out before it has a socket
(urllib3 connects lazily): its socket is linked to the pool slot when
``_new_conn`` opens it.  ``HTTPConnection.close`` ends a checkout: a connection
closed and dropped (``HTTPResponse.close()``, urllib3's error paths put ``None``
back) is not reported as held past ``checkout_threshold``.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

from leakguard import registry, stacks
from leakguard._patch import Patches

from . import _pools
from ._attribution import app_scope, contained, register_package, unregister_package
from ._pools import capture
from ._redact import http_target

REQUIRES = "urllib3 >= 1.25, < 3"
ORIGIN = "urllib3"

_patches = Patches()


class _Meta(NamedTuple):
    """What every connection of one pool shares: its name, owner and holders."""

    name: str
    owner: str | None
    holders: tuple[Any, ...]


#: pool -> its _Meta, computed at the pool's first checkout
_metas: weakref.WeakKeyDictionary[Any, _Meta] = weakref.WeakKeyDictionary()
#: pool -> weakref to the PoolManager that made it
_managers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
#: PoolManager -> (weakref to its owner, owner's label, owner's creation frames)
_owners: weakref.WeakKeyDictionary[Any, tuple[Any, str, stacks.Frames]] = weakref.WeakKeyDictionary()


def _target(conn: Any) -> str | None:
    scheme = "https" if getattr(conn, "default_port", 80) == 443 else "http"
    host = getattr(conn, "_tunnel_host", None)  # through a proxy: where the app is going
    if host:
        return http_target(scheme, host, getattr(conn, "_tunnel_port", None))
    return http_target(scheme, conn.host, conn.port)


def _new_conn(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    target = None
    with contained:
        target = _target(instance)
    with app_scope("urllib3", target):
        sock = wrapped(*args, **kwargs)
    _pools.attach(instance, ORIGIN, sock)  # checked out of its pool before it had a socket
    return sock


def set_owner(manager: Any, owner: Any, label: str, frames: stacks.Frames) -> None:
    """*owner* (labelled *label*, created at *frames*) holds PoolManager *manager*."""
    try:
        _owners[manager] = (weakref.ref(owner), label, frames)
    except TypeError:  # not weakly referenceable
        pass


def pool_name(pool: Any) -> str:
    """``urllib3 HTTPConnectionPool(http://127.0.0.1:8080, maxsize=10)``."""
    target = http_target(getattr(pool, "scheme", "http"), pool.host, pool.port)
    queue = getattr(pool, "pool", None)
    size = getattr(queue, "maxsize", None)
    return f"urllib3 {type(pool).__name__}({target}" + (f", maxsize={size})" if size is not None else ")")


def _describe(pool: Any) -> _Meta:
    holders: list[Any] = [weakref.ref(pool)]
    owner = None
    mref = _managers.get(pool)
    manager = mref() if mref is not None else None
    if manager is not None:
        holders.append(mref)
        held = _owners.get(manager)
        if held is not None and held[0]() is not None:
            holders.append(held[0])
            site = stacks.creation_site(stacks.frames(held[2]))
            owner = held[1] + (f" created at {stacks.format_site(site)}" if site is not None else "")
    return _Meta(pool_name(pool), owner, tuple(holders))


def _meta(pool: Any) -> _Meta:
    meta = _metas.get(pool)
    if meta is None:
        meta = _metas[pool] = _describe(pool)
    return meta


def _get_conn(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    frames = capture()
    conn = wrapped(*args, **kwargs)
    try:
        meta = _meta(instance)
        info = _pools.checked_out(conn, meta.name, ORIGIN, frames, getattr(conn, "sock", None))
        if info.holders is not meta.holders:
            info.holders, info.owner = meta.holders, meta.owner
    except Exception:
        registry.count_error()
    return conn


def _put_conn(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    # Before the call: a connection the pool cannot keep (full, closed) is closed by it.
    _pools.mark_in(args[0] if args else kwargs.get("conn"))
    return wrapped(*args, **kwargs)


def _close(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    # A connection closed while checked out (``HTTPResponse.close()``, urllib3's own error paths, which
    # then put ``None`` back) is not held any more: its checkout ends here, not at a check-in that never comes.
    _pools.mark_in(instance)
    return wrapped(*args, **kwargs)


def _new_pool(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    pool = wrapped(*args, **kwargs)
    with contained:
        _managers[pool] = weakref.ref(instance)
    return pool


_users: set[str] = set()  # integrations that need the hook: "urllib3", "requests"


def acquire(user: str) -> None:
    """Put the hooks on for *user* (requests needs them even when urllib3's integration is off)."""
    import urllib3.connection
    import urllib3.connectionpool
    import urllib3.poolmanager

    if not _users:
        _patches.wrap(urllib3.connection, "HTTPConnection._new_conn", _new_conn)
        _patches.wrap(urllib3.connection, "HTTPConnection.close", _close)
        _patches.wrap(urllib3.connectionpool, "HTTPConnectionPool._get_conn", _get_conn)
        _patches.wrap(urllib3.connectionpool, "HTTPConnectionPool._put_conn", _put_conn)
        _patches.wrap(urllib3.poolmanager, "PoolManager._new_pool", _new_pool)
    _users.add(user)


def release(user: str) -> None:
    """Take *user*'s claim back; the hooks come off with the last one."""
    _users.discard(user)
    if not _users:
        _patches.undo()
        _pools.stop()


def instrument() -> None:
    import urllib3

    register_package("urllib3", urllib3)
    acquire("urllib3")


def uninstrument() -> None:
    release("urllib3")
    unregister_package("urllib3")
