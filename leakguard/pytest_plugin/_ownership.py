"""Ownership: which socket belongs to which fixture wider than function scope.

A socket opened while a class-, module-, package- or session-scoped fixture is set up
belongs to it (the checker claims those by sequence number); so does a socket opened
later that is reachable from the fixture's value (:func:`adopt_reachable`) and a
connection accepted on a listening socket it owns (:func:`adopt_accepted`).  A socket
idle in a pool a module global keeps belongs to the process (:func:`drop_process_wide`).
"""

from __future__ import annotations

import gc
import socket
import types
from collections.abc import Iterable
from typing import Any

from leakguard import kernel, registry
from leakguard.integrations import _pools

__all__ = ["Fixture", "adopt_accepted", "adopt_reachable", "drop_process_wide", "sock_of"]

_REACH_BUDGET = 200_000  # objects visited when looking for an owning fixture
_SKIP_MODULES = ("_pytest", "pluggy", "pytest", "leakguard", "xdist", "execnet")


class Fixture:
    """A fixture wider than function scope and the sockets it owns."""

    __slots__ = ("fixturedef", "name", "owned", "scope", "where")

    def __init__(self, fixturedef: Any, name: str, scope: str, where: str) -> None:
        self.fixturedef = fixturedef
        self.name = name
        self.scope = scope
        self.where = where  # the test whose setup created it
        self.owned: list[registry.Record] = []

    def label(self) -> str:
        return f"fixture '{self.name}' ({self.scope} scope)"

    def roots(self) -> list[Any]:
        """What the fixture's sockets may be reached from: its value and its pending teardown."""
        out: list[Any] = []
        cached = getattr(self.fixturedef, "cached_result", None)
        if cached is not None and cached[0] is not None:
            out.append(cached[0])
        out.extend(getattr(self.fixturedef, "_finalizers", ()) or ())
        return out


def _skip_object(obj: Any) -> bool:
    if isinstance(obj, (type, types.ModuleType, types.CodeType, str, bytes, int, float, types.BuiltinFunctionType)):
        return True
    mod = getattr(type(obj), "__module__", "") or ""
    return mod.startswith(_SKIP_MODULES)


def _reachable(roots: Iterable[Any], targets: dict[int, Any]) -> set[int]:
    """ids of *targets* reachable from *roots* through strong references (bounded walk).

    Modules, classes and function globals are not followed (everything is reachable
    from them), nor pytest's own objects.
    """
    found: set[int] = set()
    seen: set[int] = set()
    todo = list(roots)
    budget = _REACH_BUDGET
    while todo and budget > 0:
        obj = todo.pop()
        i = id(obj)
        if i in seen:
            continue
        seen.add(i)
        budget -= 1
        if i in targets:
            found.add(i)
            if len(found) == len(targets):
                break
            continue
        if isinstance(obj, types.FunctionType):
            if not (getattr(obj, "__module__", "") or "").startswith(_SKIP_MODULES):
                todo.extend(x for x in (obj.__closure__, obj.__defaults__, obj.__kwdefaults__) if x)
            continue
        if isinstance(obj, types.FrameType):
            todo.append(obj.f_locals)
            continue
        if _skip_object(obj):
            continue
        todo.extend(gc.get_referents(obj))
    return found


def _addr_key(family: int, addr: Any) -> Any:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return (str(addr[0]), int(addr[1]))
    if addr:
        return addr
    return None


_WILDCARDS = ("0.0.0.0", "::", "")


def _accepted(rec: registry.Record) -> bool:
    """Was this socket returned by ``socket.accept()`` (a server-side connection)?"""
    frames = rec.frames
    return bool(frames) and frames[0].co_name == "accept" and frames[0].co_filename == socket.__file__


def sock_of(rec: registry.Record) -> socket.socket | None:
    obj = rec.ref() if rec.ref is not None else None
    return obj if isinstance(obj, socket.socket) else None


def _local_key(sock: socket.socket) -> Any:
    try:
        return _addr_key(sock.family, sock.getsockname())
    except OSError:
        return None


def _find_listener(local: Any, records: Iterable[registry.Record]) -> tuple[bool, registry.Record | None]:
    """(a listening socket with this address exists, its record if leakguard has one)."""
    if local is None:
        return False, None
    wild = (("0.0.0.0", local[1]), ("::", local[1])) if isinstance(local, tuple) else ()
    for rec in records:
        sock = sock_of(rec)
        if sock is None:
            continue
        try:
            if sock.fileno() != rec.fd or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
        except OSError:
            continue
        key = _local_key(sock)
        if key == local or key in wild:
            return True, rec
    # A listener opened before leakguard was installed (conftest import time): ask the kernel.
    try:
        for ks in kernel.read_sockets({})[0]:
            if ks.state == "LISTEN" and ks.local is not None and isinstance(local, tuple):
                host, _, port = ks.local.rpartition(":")
                if port == str(local[1]) and host.strip("[]") in (local[0], *_WILDCARDS):
                    return True, None
    except Exception:
        pass
    return False, None



def _process_wide(rec: registry.Record) -> str | None:
    """The module global keeping the pool *rec* (or, for a server-side socket, its
    client end in this process) sits idle in, or None."""
    pool = rec.pool
    if pool is None and _accepted(rec):
        client = _client_end(rec)
        pool = client.pool if client is not None else None
    if pool is None or pool.checked_out:
        return None
    where: str | None = _pools.process_wide(pool)
    return where


def _client_end(rec: registry.Record) -> registry.Record | None:
    """The record of the socket at the other end of accepted connection *rec*, if in this process."""
    sock = sock_of(rec)
    if sock is None:
        return None
    try:
        peer = _addr_key(sock.family, sock.getpeername())
    except OSError:
        return None
    for other in registry.live().values():
        s = sock_of(other)
        if other is not rec and other.pool is not None and s is not None and _local_key(s) == peer:
            return other
    return None


def adopt_reachable(
    cands: list[registry.Record], fixtures: Iterable[Fixture], claimed: dict[int, Fixture]
) -> list[registry.Record]:
    """Hand sockets reachable from a fixture's value to that fixture (noted in *claimed*); return the rest."""
    left = list(cands)
    for fx in fixtures:
        if not left:
            break
        targets: dict[int, Any] = {}
        for rec in left:
            if rec.pool is not None and rec.pool.checked_out:
                continue  # checked out of a pool and never returned: the test holds it
            obj = rec.ref() if rec.ref is not None else None
            if obj is not None:
                targets[id(obj)] = obj
        if not targets:
            break
        found = _reachable(fx.roots(), targets)
        if not found:
            continue
        keep = []
        for rec in left:
            obj = rec.ref() if rec.ref is not None else None
            if obj is not None and id(obj) in found:
                fx.owned.append(rec)
                claimed[rec.seq] = fx
            else:
                keep.append(rec)
        left = keep
    return left


def drop_process_wide(recs: list[Any], kept: set[str], first: list[str]) -> list[Any]:
    """Sockets idle in a pool a module global keeps for the whole process
    (``urllib3._DEFAULT_POOL``), and the server ends of their connections, are
    nobody's leak: named once per run (*kept*: named already; *first*: gets those
    named now), not judged.  *recs*: records, or (fixture, record) pairs."""
    left = []
    for item in recs:
        where = _process_wide(item[1] if isinstance(item, tuple) else item)
        if where is None:
            left.append(item)
        elif where not in kept:
            kept.add(where)
            first.append(where)
    return left


def adopt_accepted(cands: list[registry.Record], mark: int, claimed: dict[int, Fixture]) -> list[registry.Record]:
    """Server-side connections belong to whoever owns the listening socket (noted in *claimed*);
    a listener opened after *mark* is the current test's own.  Returns the rest."""
    left = []
    records: list[registry.Record] | None = None
    for rec in cands:
        sock = sock_of(rec)
        if sock is None or not _accepted(rec):
            left.append(rec)
            continue
        if records is None:
            records = list(registry.live().values())
        exists, listener = _find_listener(_local_key(sock), records)
        if not exists:
            left.append(rec)  # its server is gone: nobody but the test can close it now
            continue
        if listener is not None and listener.seq > mark and listener.seq not in claimed:
            left.append(rec)  # the test's own server
            continue
        owner = claimed.get(listener.seq) if listener is not None else None
        if owner is not None:
            owner.owned.append(rec)
            claimed[rec.seq] = owner
        # else: a server older than this test that no fixture owns: not the test's
    return left

# -- judging
