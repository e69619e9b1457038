"""Live socket records: who created each socket, when, for which library and target.

Records are keyed by file descriptor.  A closed socket's fd is reused by the
kernel for the next one, which overwrites the record, so the table is bounded by
the process's peak number of descriptors and never grows with churn; stale
entries (socket closed, detached or garbage-collected) are recognised through a
weak reference and dropped by :func:`prune` and by every snapshot.  Nothing is
hooked on ``close()``: that keeps the hottest path of all untouched.

Integrations describe the sockets a library is about to open with
:func:`scope` (origin, redacted target, and optionally the application stack
captured once at the library's entry point), or adopt a descriptor created in C
(libpq) with :func:`adopt`.
"""

from __future__ import annotations

import _socket
import contextvars
import itertools
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import stacks

__all__ = [
    "PoolInfo",
    "Record",
    "Scope",
    "adopt",
    "adopt_fd",
    "all_records",
    "live_between",
    "live_sockets",
    "mark",
    "pop_scope",
    "push_scope",
    "annotate",
    "count_error",
    "entry",
    "clear",
    "continuation",
    "current_scope",
    "enter_continuation",
    "get",
    "live",
    "prune",
    "record_socket",
    "scope",
    "stack_here",
    "stats",
]


class PoolInfo:
    """What a connection pool knows about one pooled connection.

    ``checked_out`` is True while the application holds the connection; the
    checkout time and stack describe the last checkout.  ``idle_since`` is when it
    last went back to the pool (None before its first check-in).  ``owner`` names
    the object the pool belongs to (a ``requests.Session``), and ``holders`` are
    weak references to the pool and its owners, for "is this a process-wide pool?"
    """

    __slots__ = (
        "checked_out",
        "checkout_frames",
        "checkout_time",
        "holders",
        "idle_since",
        "name",
        "owner",
        "reported_at",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.checked_out = False
        self.checkout_time: float | None = None  # time.monotonic()
        self.checkout_frames: stacks.Frames = ()
        self.reported_at: float | None = None  # checkout_threshold bookkeeping
        self.idle_since: float | None = None  # time.monotonic() of the last check-in
        self.owner: str | None = None
        self.holders: tuple[Any, ...] = ()  # weakref.ref to the pool, its manager, its owner

    def check_out(self, frames: stacks.Frames) -> None:
        self.checked_out = True
        self.checkout_time = time.monotonic()
        self.checkout_frames = frames
        self.reported_at = None

    def check_in(self) -> None:
        self.checked_out = False
        self.idle_since = time.monotonic()

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        return {
            "name": self.name,
            "checked_out": self.checked_out,
            "checkout_age_s": (
                round(now - self.checkout_time, 3)
                if self.checked_out and self.checkout_time is not None
                else None
            ),
            "checkout_stack": [f.to_dict() for f in stacks.frames(self.checkout_frames)]
            if self.checked_out
            else [],
            "idle_s": round(now - self.idle_since, 3)
            if not self.checked_out and self.idle_since is not None
            else None,
            "owner": self.owner,
        }


class Scope:
    """What an integration tells the socket hook about sockets opened inside it.

    ``cont`` (a :class:`stacks.Continuation`) is set inside a task, thread or executor job
    that library code created: a capture there that holds no application frame goes on
    with the stack that created it.  A scope with ``origin`` None carries only that (or
    only frames): :func:`current_scope` does not show it, and its sockets keep origin
    ``socket``.
    """

    __slots__ = ("cont", "frames", "origin", "target")

    def __init__(
        self,
        origin: str | None,
        target: str | None,
        frames: stacks.Frames | None,
        cont: stacks.Continuation | stacks.PerTask | None = None,
    ) -> None:
        self.origin = origin
        self.target = target
        self.frames = frames
        self.cont = cont


class Record:
    """One socket leakguard saw created (or a descriptor an integration adopted).

    The socket hook stores only a tuple ``(ref, created, seq, frames, scope)`` (see ``Entry``);
    a Record is the view built from it on first use, so creating a socket pays
    for one small tuple.  A Record stays valid while its entry is the current
    one for its descriptor.
    """

    __slots__ = (
        "__weakref__",
        "_resolved",
        "addrs",
        "created",
        "entry",
        "fd",
        "frames",
        "origin",
        "pool",
        "ref",
        "seq",
        "target",
    )

    def __init__(self, fd: int, entry: Entry) -> None:
        ref, created, seq, frames, sc = entry[:5]
        if frames is None:  # the compiled hook's entry: the frames follow the five fields
            frames = entry[5:]
        self.entry = entry
        self.fd = fd
        self.ref = ref  # weakref to the socket (or the driver connection owning the fd), or None
        self.created: float = created  # time.monotonic()
        self.seq: int = seq  # increases with every record: "created after X" is seq > X.seq
        self.frames: stacks.Frames = frames
        self.origin: str = sc.origin if sc is not None and sc.origin is not None else "socket"
        self.target: str | None = sc.target if sc is not None else None
        self.pool: PoolInfo | None = None
        #: (local, remote, family, type) once the kernel showed them settled: they never change again
        self.addrs: tuple[str | None, str | None, int, int] | None = None
        self._resolved: tuple[stacks.Frame, ...] | None = None

    def alive(self) -> bool:
        """Is the recorded socket (or owner) still open on the same descriptor?"""
        return _alive(self.fd, self.ref)

    def stack(self) -> list[stacks.Frame]:
        return list(self.resolved())

    def resolved(self) -> tuple[stacks.Frame, ...]:
        """The creation stack, outermost first, resolved once per record (equal stacks share one tuple)."""
        r = self._resolved
        if r is None:
            r = self._resolved = stacks.resolve(self.frames)
        return r

    def __repr__(self) -> str:
        site = stacks.format_site(stacks.creation_site(self.stack()))
        return f"<Record fd={self.fd} origin={self.origin} created at {site}>"


# (weakref or None, time.monotonic(), seq, frames, Scope or None), or from the compiled
# hook (weakref, time.monotonic(), seq, None, None, code, offset, code, offset, ...): the
# frames inline, one tuple per socket instead of two.  Record() reads both.
Entry = tuple[Any, ...]

_next_seq = itertools.count(1).__next__  # the compiled counter replaces it when built (shared with the hook)
_records: dict[int, Entry] = {}  # written by the socket hook, lock-free
_views: dict[int, Record] = {}  # Record views of entries, built on demand
_views_lock = threading.Lock()
_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("leakguard_scope", default=None)
_errors = [0]  # failures contained inside hooks, for stats() and tests
depth = [48]  # frames captured per socket; set by install(stack_depth=...)


def after_fork_in_child() -> None:
    """Called first by the at-fork handler (:data:`leakguard._state.FORK_ORDER`)."""
    global _views_lock
    _views_lock = threading.Lock()  # another thread may have held it at fork time: it never unlocks here


def set_depth(n: int) -> None:
    """Most frames captured per socket (install(stack_depth=...))."""
    depth[0] = n
    if _speedups is not None:
        _speedups.set_depth(n)


def _load_speedups() -> Any:
    """The compiled hot path, or None (not built, or LEAKGUARD_PURE_PYTHON=1)."""
    global _next_seq
    if os.environ.get("LEAKGUARD_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from . import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        _speedups.configure(_records, stacks._app_files, stacks.is_app_file, 0, _scope, depth[0], stacks.CONTEXT)
        capture, _, next_seq = _speedups.capture, _speedups.record, _speedups.next_seq
    except Exception:  # a stale or mismatched build: the pure-Python path, never a failed import
        return None
    # Integrations capture the application's stack at their entry points: same walk, compiled.
    stacks.capture = capture
    _next_seq = next_seq
    if hasattr(_speedups, "clear_app_cache"):
        stacks.on_app_change.append(_speedups.clear_app_cache)
    return _speedups


_speedups = _load_speedups()
#: ``fast_record(sock) -> bool``: the compiled record_socket for unscoped new sockets, or None.
fast_record = _speedups.record if _speedups is not None else None


def _holder(fd: int, ref: Any) -> Any:
    """The live object holding *fd* (socket or owner), True for an adopted fd without owner, None if stale."""
    if ref is None:
        return True  # adopted descriptor without owner: the kernel view decides
    obj = ref()
    if obj is None:
        return None
    try:
        return obj if _fileno_of(obj) == fd else None
    except AttributeError:
        return obj  # an owner without fileno(): alive while the owner is
    except Exception:
        return None  # closed sockets and connections raise or return -1


_sock_fileno = _socket.socket.fileno
_is_raw_socket = _socket.socket.__instancecheck__


def _fileno_of(obj: Any) -> int:
    """A socket's own descriptor, whatever a subclass's ``fileno()`` does; an owner's ``fileno()``."""
    if isinstance(obj, _socket.socket):
        return int(_sock_fileno(obj))
    return int(obj.fileno())


def _alive(fd: int, ref: Any) -> bool:
    return _holder(fd, ref) is not None


def record_socket(sock: Any, inherit: bool = False) -> None:
    """Record a freshly created Python socket.  Called by the socket hook.

    With *inherit* (the socket was built on an existing descriptor, as
    ``ssl.SSLContext.wrap_socket`` does), a live record of another socket object
    holding the same descriptor is carried over so the TLS socket keeps the
    original creation stack.
    """
    fd = _fileno_of(sock)
    if fd < 0:
        return
    if inherit:
        old = _records.get(fd)
        if old is not None and old[0] is not None:
            other = old[0]()
            if other is not None and other is not sock and _holder(fd, old[0]) is other:
                _handover(fd, old, sock)
                return
    sc = _scope.get()
    if sc is None:
        _records[fd] = (_ref(sock), _monotonic(), _next_seq(), stacks.capture(2, depth[0]), None)
    else:
        frames = sc.frames
        if frames is None:
            frames = stacks.capture(2, depth[0])
            if sc.cont is not None:
                frames = stacks.continued(frames, sc.cont, depth[0])
        _records[fd] = (_ref(sock), _monotonic(), _next_seq(), frames, sc if sc.origin is not None else None)


_ref = weakref.ref
_monotonic = time.monotonic


def _handover(fd: int, old: Entry, sock: Any) -> None:
    new: Entry = (weakref.ref(sock), *old[1:])
    with _views_lock:
        _records[fd] = new
        view = _views.get(fd)
        if view is not None and view.entry is old:
            view.entry, view.ref = new, new[0]


def _view(fd: int, entry: Entry) -> Record:
    view = _views.get(fd)
    if view is not None and view.entry is entry:
        return view
    with _views_lock:
        view = _views.get(fd)
        if view is None or view.entry is not entry:
            view = _views[fd] = Record(fd, entry)
        return view


def adopt(
    fd: int,
    origin: str,
    target: str | None = None,
    frames: stacks.Frames | None = None,
    owner: Any = None,
) -> Record:
    """Record a descriptor opened outside Python's ``socket`` (e.g. by libpq).

    *frames* default to the caller's stack.  *owner*, when given, is the object
    whose lifetime bounds the record (the driver's connection); when it has a
    ``fileno()`` method, the record lives while that still returns *fd*.
    """
    if frames is None:
        frames = stacks.capture(2, depth[0])
    return _view(fd, _adopted(fd, origin, target, frames, owner))


def adopt_fd(fd: int, origin: str, target: str | None, frames: stacks.Frames, owner: Any = None) -> None:
    """:func:`adopt` with the frames given, building no :class:`Record` view (one is made when
    first read): for a path that adopts every connection and reads nothing back (a C loop's)."""
    _adopted(fd, origin, target, frames, owner)


def _adopted(fd: int, origin: str, target: str | None, frames: stacks.Frames, owner: Any) -> Entry:
    sc = _scope.get()
    if sc is not None and sc.cont is not None:
        frames = stacks.continued(frames, sc.cont, depth[0])
    ref = None
    if owner is not None:
        try:
            ref = _ref(owner)
        except TypeError:
            ref = None
    entry = _records[fd] = (ref, _monotonic(), _next_seq(), frames, Scope(origin, target, None))
    return entry


def annotate(fd: int, origin: str | None = None, target: str | None = None) -> Record | None:
    """Set origin/target of the live record of *fd* (used after a driver connects)."""
    rec = get(fd)
    if rec is None:
        return None
    if origin is not None:
        rec.origin = origin
    if target is not None:
        rec.target = target
    return rec


def push_scope(origin: str, target: str | None = None, frames: stacks.Frames | None = None) -> Any:
    """Open a :func:`scope` without a context manager (cheaper on a wrapper's path).

    Returns the token to give :func:`pop_scope`.  The new scope is
    ``current_scope()`` until then.
    """
    outer = _scope.get()
    if outer is None:
        return _scope.set(Scope(origin, target, frames))
    cont = stacks.own_continuation(outer.cont)  # the running task's own, for a context shared between tasks
    if outer.frames is not None:
        frames = outer.frames
    elif frames is not None and cont is not None:
        frames = stacks.continued(frames, cont, depth[0])
    if outer.origin is None:  # a continuation only: this is the first integration scope
        return _scope.set(Scope(origin, target, frames, cont))
    return _scope.set(Scope(outer.origin, outer.target or target, frames, cont))


def pop_scope(token: Any) -> None:
    _scope.reset(token)


@contextmanager
def scope(origin: str, target: str | None = None, frames: stacks.Frames | None = None) -> Iterator[Scope]:
    """Sockets created inside this block belong to *origin* and *target*.

    Nested scopes keep the outermost origin (requests wins over the urllib3 it
    calls) unless the inner one adds a target the outer one lacked.
    """
    token = push_scope(origin, target, frames)
    try:
        yield _scope.get()  # type: ignore[misc]
    finally:
        pop_scope(token)


def current_scope() -> Scope | None:
    """The innermost integration scope (a continuation-only scope is not one), or None."""
    sc = _scope.get()
    return sc if sc is None or sc.origin is not None else None


def continuation(skip: int = 1, boundary: Any = None, inherits: bool = True) -> stacks.Continuation | None:
    """What a task, thread or job created here continues with (see :class:`Scope`), or None.

    Captures the caller's stack (*skip* as in ``stacks.capture``), itself continued when
    this code runs in such a task.  Inside an integration scope that has its frames, a
    new task (*inherits*: it gets a copy of this context) needs nothing: None; a thread
    or job continues with those frames.
    """
    sc = _scope.get()
    if sc is not None and sc.frames is not None:
        return None if inherits else stacks.Continuation(boundary, sc.frames, None)
    outer = stacks.own_continuation(sc.cont) if sc is not None else None
    return stacks.Continuation(boundary, stacks.capture(skip + 1, depth[0]), outer, depth[0])


def stack_here(skip: int = 1) -> stacks.Frames:
    """The caller's stack (*skip* as in ``stacks.capture``): the current scope's frames when it
    has them, else a capture continued across the task or thread boundary it runs in."""
    sc = _scope.get()
    if sc is not None and sc.frames is not None:
        return sc.frames
    frames = stacks.capture(skip + 1, depth[0])
    if sc is not None and sc.cont is not None:
        frames = stacks.continued(frames, sc.cont, depth[0])
    return frames


def enter_continuation(cont: stacks.Continuation) -> Any:
    """Make *cont* the continuation of the current context (a thread or job starting); the token for :func:`pop_scope`."""
    sc = _scope.get()
    if sc is not None and sc.origin is not None:
        return _scope.set(Scope(sc.origin, sc.target, sc.frames, cont))
    return _scope.set(Scope(None, None, None, cont))


def get(fd: int) -> Record | None:
    """The live record for *fd*, or None."""
    entry = _records.get(fd)
    if entry is None:
        return None
    if _alive(fd, entry[0]):
        return _view(fd, entry)
    _drop(fd, entry)
    return None


def _drop(fd: int, entry: Entry) -> None:
    """Forget a stale entry, unless a newer socket has taken the descriptor meanwhile."""
    if _records.get(fd) is entry:
        popped = _records.pop(fd, None)
        if popped is not None and popped is not entry:
            # A new socket got this fd between the check and the pop: put it back.
            _records.setdefault(fd, popped)
    view = _views.get(fd)
    if view is not None and view.entry is entry:
        _views.pop(fd, None)


def _entries() -> Any:
    """The table's items, copied in one step.

    ``dict.copy()`` runs no Python code while it copies; ``list(d.items())``
    allocates a tuple per item, and a garbage collection triggered by one can
    run a gc callback or finalizer that opens a socket (or, without the GIL,
    another thread does): "dictionary changed size during iteration" would
    reach the host.
    """
    return _records.copy().items()


def live() -> dict[int, Record]:
    """All live records by fd; drops stale ones on the way."""
    out: dict[int, Record] = {}
    for fd, entry in _entries():
        if _alive(fd, entry[0]):
            out[fd] = _view(fd, entry)
        else:
            _drop(fd, entry)
    return out


def live_sockets(
    sock_type: type,
) -> tuple[dict[int, Record], dict[int, Any], dict[int, tuple[str | None, str | None, int, int]]]:
    """For the kernel reader, in one pass: the live records by fd (as :func:`live`),
    the live *sock_type* objects holding their descriptors, and the settled
    addresses (``Record.addrs``) known for those."""
    records: dict[int, Record] = {}
    objects: dict[int, Any] = {}
    known: dict[int, tuple[str | None, str | None, int, int]] = {}
    views = _views.get
    holder, is_raw, raw_fileno = _holder, _is_raw_socket, _sock_fileno
    for fd, entry in _entries():
        ref = entry[0]
        obj = ref() if ref is not None else None
        if obj is None or not is_raw(obj) or raw_fileno(obj) != fd:  # not the common case: a socket on its fd
            obj = holder(fd, ref)
            if obj is None:
                _drop(fd, entry)
                continue
        view = views(fd)
        if view is None or view.entry is not entry:
            view = _view(fd, entry)
        records[fd] = view
        if isinstance(obj, sock_type):
            objects[fd] = obj
            addrs = view.addrs
            if addrs is not None:
                known[fd] = addrs
    return records, objects, known


def entry(fd: int) -> Entry | None:
    """The raw entry for *fd* (``(ref, created, seq, ...)``, see ``Entry``), stale or not, without building a view."""
    return _records.get(fd)


def count_error() -> None:
    """Count a failure contained inside one of leakguard's hooks (see :func:`stats`)."""
    _errors[0] += 1


def mark() -> int:
    """A sequence number: every record created after this call has a greater ``seq``."""
    return _next_seq()


def live_between(after: int, before: int | None = None, exclude: Any = ()) -> list[Record]:
    """Live records with ``after < seq < before`` whose seq is not in *exclude*.

    Older records cost one integer comparison each (no view, no liveness check):
    the pytest plugin asks this after every test.
    """
    top = before if before is not None else float("inf")
    return [
        _view(fd, e) for fd, e in _entries() if after < e[2] < top and e[2] not in exclude and _alive(fd, e[0])
    ]


def all_records(after: int = 0) -> list[Record]:
    """Every record still in the table with ``seq > after``, stale ones included (for churn accounting).

    Older entries cost one comparison each: no view is built for them.
    """
    return [_view(fd, entry) for fd, entry in _entries() if entry[2] > after]


def prune() -> int:
    """Drop stale records; returns how many are left."""
    return len(live())


def clear() -> None:
    with _views_lock:
        _records.clear()
        _views.clear()


def stats() -> dict[str, int]:
    return {"records": len(_records), "hook_errors": _errors[0]}
