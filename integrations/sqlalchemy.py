"""SQLAlchemy: connections opened by an Engine's pool, and that pool's checkouts.

Origin: a socket opened by an Engine's pool shows origin ``sqlalchemy`` (not the
driver's), with the driver in the target's scheme:
``postgresql+psycopg2://app:***@db:5432/orders``.  In an application that uses
SQLAlchemy the engine is what the code asked for, and the pool is what decides
the connection's life; the driver integrations see the surrounding scope and
keep it.  Two wrappers open that scope:

- ``_ConnectionRecord.__connect`` (every connection a pool opens, also with a
  custom ``creator=``): origin and the application's stack, captured there;
- ``DefaultDialect.connect``: the target, from the dialect's name and driver and
  the connect arguments it passes to the DBAPI (passwords become ``***``).

Pool: class-level ``checkout`` / ``checkin`` listeners on ``sqlalchemy.pool.Pool``
(they reach every pool, existing or future) mark the connection checked out,
with the checkout stack (the application's ``engine.connect()`` /
``Session`` line), or idle in the pool.  Pool names read ``sqlalchemy QueuePool``.
Removing the listeners and unwrapping restores SQLAlchemy exactly.

asyncio engines run the pool in a greenlet whose frames do not lead back to the
application's coroutine: when the captured stack holds no application frame,
it is continued from the suspended parent greenlet (where ``greenlet_spawn``
waits), so creation and checkout sites are the application's ``await`` lines.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

from leakguard import registry, stacks
from leakguard._patch import Patches

from . import _pools
from ._attribution import contained, scope
from ._redact import DEFAULT_PORTS, redact_dsn

__all__ = ["REQUIRES", "instrument", "uninstrument"]

REQUIRES = "sqlalchemy >= 1.3, < 2.2"
ORIGIN = "sqlalchemy"

_patches = Patches()
_listeners: list[tuple[Any, str, Any]] = []


def dialect_target(dialect: Any, cargs: Any, cparams: Any) -> str | None:
    """``postgresql+psycopg2://user:***@host:5432/db`` from what the dialect hands its DBAPI."""
    name = getattr(dialect, "name", None) or "unknown"
    driver = getattr(dialect, "driver", None)
    scheme = f"{name}+{driver}" if driver and driver != name else name
    dsn = next((a for a in cargs if isinstance(a, str)), None) if cargs else None
    params = dict(cparams or {})
    if dsn is None and isinstance(params.get("dsn"), str):
        dsn = params.pop("dsn")
    target = redact_dsn(dsn, scheme=scheme, default_port=DEFAULT_PORTS.get(name), **params)
    if target is not None and dsn is not None and "://" in dsn:
        # A URL DSN names its own scheme; keep the dialect's, which names the driver.
        target = scheme + target[target.index("://") :]
    return target


def _walk(f: FrameType | None, depth: int) -> stacks.Frames:
    """``stacks.capture`` from a given frame (another greenlet's)."""
    out: list[Any] = []
    while f is not None and depth > 0:
        out.extend((f.f_code, f.f_lasti))
        depth -= 1
        app = stacks._is_app_code(f.f_code)
        f = f.f_back
        if app:
            n = min(stacks.CONTEXT, depth)
            while f is not None and n > 0:
                out.extend((f.f_code, f.f_lasti))
                f = f.f_back
                n -= 1
            break
    return tuple(out)


def app_stack(skip: int = 1) -> stacks.Frames:
    """The caller's stack (*skip* as in ``stacks.capture``), continued across SQLAlchemy's greenlet bridge."""
    frames = stacks.capture(skip + 1, registry.depth[0])
    try:
        greenlet = sys.modules.get("greenlet")
        if greenlet is None:
            return frames
        parent = greenlet.getcurrent().parent
        if parent is None:  # not inside a spawned greenlet: the stack is complete
            return frames
        # capture() stops CONTEXT frames past the first application frame: look there only.
        tail = range(max(0, len(frames) - 2 * (stacks.CONTEXT + 1)), len(frames), 2)
        if any(stacks._is_app_code(frames[i]) for i in tail):
            return frames
        return frames + _walk(parent.gr_frame, max(registry.depth[0] - len(frames) // 2, 1))
    except Exception:
        registry.count_error()
        return frames


def _record_connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """``_ConnectionRecord.__connect``: origin and the application's stack for the new connection."""
    with scope(ORIGIN, None, app_stack(1)):
        return wrapped(*args, **kwargs)


def _dialect_connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """``DefaultDialect.connect``: the target; adopts a C-level socket no driver integration took."""
    target = None
    with contained:
        target = dialect_target(instance, args, kwargs)
    with scope(ORIGIN, target, app_stack(1)) as sc:
        conn = wrapped(*args, **kwargs)
    if sc is None:
        return conn
    with contained:
        fd = _pools.fd_of(conn)
        if fd is not None and registry.get(fd) is None:
            # libpq & co. without their own integration (turned off, or an unknown driver)
            registry.adopt(fd, sc.origin or ORIGIN, target=sc.target, frames=sc.frames, owner=conn)
    return conn


def _pool_name(pool: Any) -> str:
    return f"sqlalchemy {type(pool).__name__}"


def _on_checkout(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    try:
        frames = app_stack(1)
        pool = getattr(connection_proxy, "_pool", None) or getattr(connection_record, "_ConnectionRecord__pool", None)
        _pools.checked_out(
            connection_record,
            _pool_name(pool),
            ORIGIN,
            frames,
            source=dbapi_connection,
        )
    except Exception:
        registry.count_error()


def _on_checkin(dbapi_connection: Any, connection_record: Any) -> None:
    try:
        _pools.checked_in(connection_record)
    except Exception:
        registry.count_error()


def instrument() -> None:
    import sqlalchemy.engine.default
    import sqlalchemy.pool.base
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    if "_ConnectionRecord__connect" in vars(sqlalchemy.pool.base._ConnectionRecord):
        _patches.wrap(sqlalchemy.pool.base, "_ConnectionRecord._ConnectionRecord__connect", _record_connect)
    _patches.wrap(sqlalchemy.engine.default, "DefaultDialect.connect", _dialect_connect)
    for name, fn in (("checkout", _on_checkout), ("checkin", _on_checkin)):
        if not event.contains(Pool, name, fn):
            event.listen(Pool, name, fn)
            _listeners.append((Pool, name, fn))


def uninstrument() -> None:
    from sqlalchemy import event

    while _listeners:
        target, name, fn = _listeners.pop()
        with contained:
            if event.contains(target, name, fn):
                event.remove(target, name, fn)
    _patches.undo()
    _pools.stop()
