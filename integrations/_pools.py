"""Pool tracking shared by the pool integrations (SQLAlchemy, psycopg_pool, psycopg2.pool, asyncpg, redis-py).

A pool integration calls :func:`mark_pooled` when its pool opens a connection (it is
then idle in the pool), :func:`checked_out` when the application takes one and
:func:`checked_in` when it gives it back.  The state lives in a
:class:`registry.PoolInfo` attached to the connection's socket record, so
``snapshot()`` shows for every pooled socket whether it is checked out (for how
long, and the checkout stack) or idle, and a CLOSE_WAIT reason says which.

``checkout_threshold`` (seconds, off by default; HikariCP's
``leakDetectionThreshold``): a connection held longer than that is reported
once as the structlog warning ``leakguard.checkout_threshold`` with its checkout
stack and creation site, and again as ``leakguard.checkout_returned`` ("returned
after 93 s") when it comes back.  Overdue checkouts are found by
:func:`check_thresholds`, which the watcher may call every tick; a light daemon
timer calls it as well while a threshold is set and connections are checked
out (so reports come within a quarter of the threshold, whatever the watcher's
interval).  Only checked-out connections are looked at, and only while a
threshold is set: without one, checkout and check-in cost a dict lookup and
three attribute stores.

Whether a checkout is overdue is the judge's rule (:func:`leakguard.judge.checkout_overdue`);
the threshold and the sink the events go to (structlog, as the watcher's reports) come
from ``install()`` through :func:`configure`: this module reads no global configuration
and writes no log of its own.  The timer is a thread of leakguard's own
(:mod:`leakguard._threads`): it ends before a fork while it waits and starts again after
it in the parent.
"""

from __future__ import annotations

import logging
import sys
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

from leakguard import _threads, judge, registry, stacks

from ._attribution import contained

__all__ = [
    "attach",
    "capture",
    "check_thresholds",
    "checked_in",
    "checked_out",
    "configure",
    "fd_of",
    "info_of",
    "mark_in",
    "mark_out",
    "mark_pooled",
    "process_wide",
    "stop",
    "threshold",
]

log = logging.getLogger("leakguard")

#: pool connection (driver connection, SQLAlchemy record, redis Connection) -> [PoolInfo, Record]
_links: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
#: checked-out connections watched for the threshold: id(info) -> (info, record)
_watched: dict[int, tuple[registry.PoolInfo, registry.Record | None]] = {}
_lock = _threads.api()[2]()  # shared with the timer, an interpreter thread: never gevent's lock
_timer: list[_Timer | None] = [None]
#: (checkout_threshold or None, where the events go), set by install() through configure()
_settings: tuple[float | None, Callable[[dict[str, Any]], None] | None] = (None, None)


def configure(limit: float | None, sink: Callable[[dict[str, Any]], None] | None) -> None:
    """``checkout_threshold`` (None: off) and the callable each event dict goes to (install() and
    uninstall() call this)."""
    global _settings
    _settings = (limit, sink)


def capture() -> stacks.Frames:
    """The application's stack as seen from an integration's wrapper; never raises.

    Leaves out this function and the wrapper that calls it (wrapt's C proxy adds
    no Python frame), so the innermost frame is the wrapped call's caller.
    """
    try:
        return stacks.capture(2, registry.depth[0])
    except Exception:
        registry.count_error()
        return ()


def mark_pooled(
    conn: Any, name: str, origin: str, frames: stacks.Frames, target: Callable[[Any], str | None]
) -> None:
    """*conn* was just opened by pool *name* and sits idle in it (from a pool's connect
    wrapper; contained).  Without the driver's own integration the socket is adopted
    here, with *frames*, and its target is ``target(conn)``."""
    with contained:
        info, rec = _link(conn, name, origin, None, frames)
        if not info.checked_out and info.idle_since is None:
            info.idle_since = time.monotonic()  # opened into the pool: idle from now
        if rec is not None and rec.target is None:
            rec.target = target(conn)


def attach(conn: Any, origin: str, source: Any) -> None:
    """*conn*, already known to a pool, just opened its socket (*source*): link that
    socket's record to the pool slot (from a connect wrapper; contained, and a dict
    lookup for a connection no pool knows)."""
    with contained:
        link = _links.get(conn)
        if link is not None:
            info, rec = _link(conn, link[0].name, origin, source)
            if id(info) in _watched:  # checked out before it had a socket: the watch follows the socket
                with _lock:
                    if id(info) in _watched:
                        _watched[id(info)] = (info, rec)


def mark_out(conn: Any, name: str, origin: str, frames: stacks.Frames) -> None:
    """:func:`checked_out`, from a wrapper: a failure of ours is counted, never raised."""
    try:
        checked_out(conn, name, origin, frames)
    except Exception:
        registry.count_error()


def mark_in(conn: Any) -> None:
    """:func:`checked_in`, from a wrapper: a failure of ours is counted, never raised."""
    try:
        if conn is not None:
            checked_in(conn)
    except Exception:
        registry.count_error()


def threshold() -> float | None:
    """The ``checkout_threshold`` in effect, or None (off, or leakguard not installed)."""
    return _settings[0]


def fd_of(conn: Any) -> int | None:
    """The socket descriptor behind a driver or pool connection, or None.

    Knows psycopg2 / psycopg (``fileno()``), pymysql and redis (``_sock``),
    asyncio drivers (``_transport`` / ``_writer``: the transport's socket) and
    SQLAlchemy's asyncio adapters (``driver_connection``).
    """
    return socket_of(conn)[0]


def socket_of(conn: Any) -> tuple[int | None, Any]:
    """``(fd, holder)``: the descriptor and the object whose ``fileno()`` reports it.

    The holder (the socket, or a libpq connection) is what an adopted record
    should follow: it stops reporting the descriptor once closed.
    """
    try:
        for _ in range(4):
            if conn is None:
                return None, None
            inner = getattr(conn, "driver_connection", None)
            if inner is not None and inner is not conn:
                conn = inner
                continue
            sock = getattr(conn, "_sock", None)  # redis, pymysql, asyncio's TransportSocket
            if sock is not None and sock is not conn:
                conn = sock
                continue
            fileno = getattr(conn, "fileno", None)
            if callable(fileno):
                fd = fileno()
                return (fd, conn) if isinstance(fd, int) and fd >= 0 else (None, None)
            for attr in ("_transport", "_writer"):
                t = getattr(conn, attr, None)
                if t is not None:
                    t = getattr(t, "transport", t)  # StreamWriter -> transport
                    conn = t.get_extra_info("socket")
                    break
            else:
                return None, None
    except Exception:
        return None, None
    return None, None


def process_wide(info: registry.PoolInfo) -> str | None:
    """The module global that keeps *info*'s pool alive for the whole process, or None.

    ``urllib3._DEFAULT_POOL`` (the PoolManager behind ``urllib3.request()``), or
    ``app.clients.session`` (an attribute of a module-level object): a pool
    reachable from a module global, directly or one attribute down, lives as long
    as the process, so a connection idle in it is nobody's leak.  Looks at the
    pool and the objects that own it (``info.holders``: its manager, its
    ``requests.Session``) by identity; one pass over the loaded modules' globals.
    """
    targets = {id(o): o for o in (ref() for ref in info.holders) if o is not None}
    if not targets:
        return None
    nested: list[tuple[str, Any]] = []
    for modname, module in list(sys.modules.items()):
        try:
            names = list(vars(module).items())
        except TypeError:
            continue
        for attr, value in names:
            if id(value) in targets:
                return f"{modname}.{attr}"
            if not isinstance(value, _OPAQUE):
                nested.append((f"{modname}.{attr}", value))
    for where, obj in nested:
        try:
            inner = object.__getattribute__(obj, "__dict__")
        except Exception:  # no instance dict (slots, builtins), or a proxy refusing
            continue
        if isinstance(inner, dict):
            for attr, value in list(inner.items()):
                if id(value) in targets:
                    return f"{where}.{attr}"
    return None


#: module globals not looked into for :func:`process_wide` (they hold no pool of their own)
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, str, bytes, int, float)


def _record(fd: int | None, origin: str, owner: Any, frames: stacks.Frames = ()) -> registry.Record | None:
    """The live record of *fd*; adopts the descriptor when leakguard never saw it created.

    Such a connection was opened before install() (or by code no integration
    covers): unless the pool knows better (*frames*), it gets an empty creation
    stack, which is the honest answer.
    """
    if fd is None:
        return None
    rec = registry.get(fd)
    if rec is None:
        rec = registry.adopt(fd, origin, frames=frames, owner=owner)
    return rec


def info_of(conn: Any) -> registry.PoolInfo | None:
    """The PoolInfo leakguard keeps for a pool connection, or None."""
    try:
        link = _links.get(conn)
    except TypeError:
        return None
    return link[0] if link is not None else None


def _link(conn: Any, name: str, origin: str, source: Any, frames: stacks.Frames = ()) -> list[Any]:
    """``[info, record]`` of a pool connection, linked: ``record.pool is info``.

    Fast path (every checkout of a busy pool): the cached record is still the
    current one for its descriptor (no reconnect, no new socket on that fd).
    """
    try:
        link = _links.get(conn)
    except TypeError:
        link = None
    if link is not None:
        rec = link[1]
        try:
            if rec is not None and registry.entry(rec.fd) is rec.entry and link[0].name == name:
                return link
        except AttributeError:  # the registry's internals changed: take the slow path
            pass
    info = link[0] if link is not None and link[0].name == name else registry.PoolInfo(name)
    source = conn if source is None else source
    fd, holder = socket_of(source)
    rec = _record(fd, origin, holder if holder is not None else source, frames)
    if rec is not None:
        rec.pool = info  # also after a reconnect: the new socket belongs to the same pool slot
    link = [info, rec]
    try:
        _links[conn] = link
    except TypeError:  # not weakly referenceable: the socket record alone holds the info
        pass
    return link


def checked_out(
    conn: Any,
    name: str,
    origin: str,
    frames: stacks.Frames,
    source: Any = None,
) -> registry.PoolInfo:
    """The application took *conn* from pool *name*; *frames* is the checkout stack."""
    info, rec = _link(conn, name, origin, source)
    info.check_out(frames)
    if threshold() is not None:
        with _lock:
            _watched[id(info)] = (info, rec)
        _ensure_timer()
    return info  # type: ignore[no-any-return]


def checked_in(conn: Any) -> registry.PoolInfo | None:
    """*conn* went back to its pool (or was discarded by it)."""
    try:
        link = _links.get(conn)
    except TypeError:
        return None
    if link is None:
        return None
    info: registry.PoolInfo = link[0]
    if not info.checked_out:
        return info
    limit = threshold()
    if limit is None and not _watched:  # the common case: nothing to time
        info.check_in()
        return info
    held = judge.checkout_overdue(info, limit)
    info.check_in()
    watched = _watched.pop(id(info), None)
    if held is not None and limit is not None:
        rec = watched[1] if watched is not None else link[1]
        if info.reported_at is None:  # returned before any tick saw it overdue
            _emit(_event("leakguard.checkout_threshold", info, rec, held, limit))
        event = _event("leakguard.checkout_returned", info, rec, held, limit)
        event["message"] = f"connection of pool {info.name} returned after {_secs(held)}"
        _emit(event)
    return info


def _secs(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def _event(
    name: str,
    info: registry.PoolInfo,
    rec: registry.Record | None,
    held: float,
    limit: float,
) -> dict[str, Any]:
    checkout_stack = stacks.frames(info.checkout_frames)
    created = rec.stack() if rec is not None else []
    event: dict[str, Any] = {
        "event": name,
        "pool": info.name,
        "held_s": round(held, 3),
        "threshold_s": limit,
        "checkout_site": stacks.format_site(stacks.creation_site(checkout_stack)) if checkout_stack else None,
        "checkout_stack": [str(f) for f in checkout_stack],
        "created_at": stacks.format_site(stacks.creation_site(created)) if created else None,
        "origin": rec.origin if rec is not None else None,
        "target": rec.target if rec is not None else None,
        "fd": rec.fd if rec is not None else None,
    }
    if name == "leakguard.checkout_threshold":
        event["message"] = (
            f"connection of pool {info.name} checked out for {_secs(held)}"
            f" (threshold {_secs(limit)}) at {event['checkout_site']}: not returned yet"
        )
    return event


def _emit(event: dict[str, Any]) -> None:
    sink = _settings[1]
    if sink is None:
        return
    try:
        sink(event)
    except Exception:
        registry.count_error()
        log.debug("leakguard: checkout report failed", exc_info=True)


def check_thresholds(now: float | None = None) -> list[dict[str, Any]]:
    """Report (once each) connections checked out longer than ``checkout_threshold``.

    Returns the events emitted (dicts with ``event``, ``pool``, ``held_s``,
    ``checkout_site``, ``checkout_stack``, ``created_at``, ...).  Cheap: looks
    only at checked-out connections, and at nothing when no threshold is set.
    Never raises.
    """
    out: list[dict[str, Any]] = []
    try:
        limit = threshold()
        if limit is None or not _watched:
            return out
        now = time.monotonic() if now is None else now
        with _lock:
            items = list(_watched.items())
        for key, (info, rec) in items:
            if not info.checked_out or info.checkout_time is None:
                _watched.pop(key, None)
                continue
            current = registry.get(rec.fd) if rec is not None else None
            if rec is not None and (current is None or current.entry is not rec.entry):
                _watched.pop(key, None)  # closed (or gone) without a check-in: nothing to return
                continue
            held = judge.checkout_overdue(info, limit, now)
            if held is not None and info.reported_at is None:
                info.reported_at = now
                event = _event("leakguard.checkout_threshold", info, rec, held, limit)
                _emit(event)
                out.append(event)
    except Exception:
        registry.count_error()
        log.debug("leakguard: check_thresholds failed", exc_info=True)
    return out


class _Timer:
    """The thread calling :func:`check_thresholds` every quarter threshold.

    Exits by itself when leakguard is uninstalled, the threshold is turned off
    or nothing is checked out any more; the next checkout starts a new one.
    Before a fork it ends if it is waiting (:func:`before_fork`).
    """

    def __init__(self) -> None:
        self.stopped = False
        self.parked = False
        self.busy = False  # in check_thresholds (its events may block on output): a fork leaves it alone
        self.wake = _threads.Wake()
        self.thread = _threads.OSThread(self._run)

    def _ends(self) -> bool:  # under _lock
        if threshold() is None or not _watched or self.stopped or self.parked:
            if _timer[0] is self:
                _timer[0] = None
            return True
        return False

    def _run(self) -> None:
        try:
            while True:
                # Decide to exit under the lock: a checkout that adds to _watched after
                # that sees _timer[0] cleared and starts a new timer.
                with _lock:
                    if self._ends():
                        return
                    limit = threshold() or 1.0
                if self.wake.wait(min(max(limit / 4, 0.02), 5.0)):
                    continue
                with _lock:
                    if self._ends():
                        return
                    self.busy = True
                try:
                    check_thresholds()
                finally:
                    self.busy = False
        except BaseException:  # nothing of ours may surface in the host
            pass

    def end(self) -> None:
        """Stop for good (:func:`stop`)."""
        self.stopped = True
        self.wake.set()
        if self.thread.is_alive() and not self.thread.is_current():
            self.thread.join(2.0)

    def park(self) -> None:
        """Before a fork: end now unless busy (a busy timer ends after its check, at its next look)."""
        with _lock:
            self.parked = True
            busy = self.busy
        if not busy and not self.thread.is_current():
            self.wake.set()
            self.thread.end_wait()


def _ensure_timer() -> None:
    t = _timer[0]
    if t is not None and t.thread.is_alive():
        return
    with _lock:
        t = _timer[0]
        if t is not None and t.thread.is_alive():
            return
        try:
            _timer[0] = _Timer()
        except Exception:  # no thread to be had (a limit, or the interpreter shutting down)
            _timer[0] = None


# -- fork (called by the at-fork handler in leakguard._state) --------------------------------------

_parked = [False]  # the timer was ended by before_fork and is to start again in the parent


def before_fork() -> None:
    """End the waiting timer thread, so that the process forks without it."""
    t = _timer[0]
    if t is not None and t.thread.is_alive():
        _parked[0] = True
        t.park()


def after_fork_in_parent() -> None:
    if not _parked[0]:
        return
    _parked[0] = False
    with _lock:
        t = _timer[0]
        if t is not None:
            t.parked = False  # busy at the fork, so still running: it goes on
    if threshold() is not None and _watched:
        _ensure_timer()  # it ended before the fork: a new one


def after_fork_in_child() -> None:
    """The parent's timer thread is gone and may have held the lock at fork time; its checkouts are
    the parent's business (the child's registry starts empty)."""
    global _lock
    _lock = _threads.api()[2]()
    _timer[0] = None
    _parked[0] = False
    _watched.clear()


def stop() -> None:
    """Stop the timer (a pool integration's uninstrument); after uninstall(), forget all checkouts.

    While leakguard stays installed (one integration turned off), the next
    checkout starts a new timer for the connections still watched.
    """
    with _lock:
        t, _timer[0] = _timer[0], None
        if threshold() is None:
            _watched.clear()
    if t is not None:
        t.end()
