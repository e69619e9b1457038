"""Join the kernel's view with the records and judge what leaked."""

from __future__ import annotations

from operator import itemgetter as _itemgetter
import os
import socket
import time
from typing import Any

from . import diagnose, judge, kernel, registry, stacks
from ._value import Value

__all__ = ["Snapshot", "SocketInfo", "take"]

_STABLE = frozenset(("ESTABLISHED", "CLOSE_WAIT", "LISTEN"))
_FAMILY_TYPES = {
    getattr(socket, "AF_UNIX", -1): "unix",
    getattr(socket, "AF_NETLINK", -1): "netlink",
    getattr(socket, "AF_PACKET", -1): "packet",
}


def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return str(family)


def _type_name(family: int, kind: int) -> str:
    if family in (socket.AF_INET, socket.AF_INET6):
        if kind == socket.SOCK_STREAM:
            return "tcp"
        if kind == socket.SOCK_DGRAM:
            return "udp"
        if kind == socket.SOCK_RAW:
            return "raw"
    name = _FAMILY_TYPES.get(family)
    if name:
        return name
    try:
        return socket.SocketKind(kind).name.lower().removeprefix("sock_")
    except ValueError:
        return str(kind)


#: (family, type) -> (family name, type name), filled as they are met (a handful per process).
_NAMES: dict[tuple[int, int], tuple[str, str]] = {}


class SocketInfo(tuple):  # type: ignore[type-arg]
    """One socket of the process: kernel state joined with leakguard's record.

    An immutable record (a tuple underneath: a snapshot of thousands of sockets
    builds thousands of these).  The stack, pool view and leak reason are
    rendered on access.
    """

    __slots__ = ()

    def __new__(
        cls,
        fd: int | None,
        family: str,
        type: str,
        state: str | None,
        local: str | None,
        remote: str | None,
        age_s: float | None,
        origin: str,
        target: str | None,
        record: registry.Record | None = None,
        batch: diagnose.Batch | None = None,
    ) -> SocketInfo:
        return tuple.__new__(cls, (fd, family, type, state, local, remote, age_s, origin, target, record, batch))

    fd: int | None = property(_itemgetter(0), doc="file descriptor")  # type: ignore[assignment]
    family: str = property(_itemgetter(1), doc='"AF_INET", "AF_INET6", "AF_UNIX", ...')  # type: ignore[assignment]
    type: str = property(_itemgetter(2), doc='"tcp", "udp", "unix", ...')  # type: ignore[assignment]
    state: str | None = property(_itemgetter(3), doc="TCP state as netstat prints it")  # type: ignore[assignment]
    local: str | None = property(_itemgetter(4))  # type: ignore[assignment]
    remote: str | None = property(_itemgetter(5))  # type: ignore[assignment]
    age_s: float | None = property(_itemgetter(6), doc="seconds since leakguard saw it created")  # type: ignore[assignment]
    origin: str = property(_itemgetter(7))  # type: ignore[assignment]
    target: str | None = property(_itemgetter(8))  # type: ignore[assignment]
    record: registry.Record | None = property(_itemgetter(9))  # type: ignore[assignment]

    @property
    def leaked(self) -> bool:
        """Judged leaked (see :mod:`leakguard.judge`): it carries a diagnosis."""
        return self[10] is not None

    @property
    def diagnosis(self) -> diagnose.Diagnosis | None:
        """Verdict, holders and user of a leak (computed once per snapshot, on first use); None when not a leak."""
        batch = self[10]
        return batch.of(self) if batch is not None else None

    @property
    def verdict(self) -> str | None:
        """For a leak: "forgotten", "in_use", "idle_in_pool" or "unreachable"; None when not a leak."""
        d = self.diagnosis
        return d.verdict if d is not None else None

    @property
    def verdict_reason(self) -> str | None:
        """For a leak: why that verdict, in words (who holds it, where the code using it is now)."""
        d = self.diagnosis
        return d.why if d is not None else None

    @property
    def held_by(self) -> list[str]:
        """For a leak: up to 3 shortest reference paths from a root to it, as a person names them."""
        d = self.diagnosis
        return list(d.held_by) if d is not None else []

    @property
    def in_use(self) -> dict[str, Any] | None:
        """For verdict in_use: the thread (and task) whose live frame holds it, and where that code is now."""
        d = self.diagnosis
        return dict(d.in_use) if d is not None and d.in_use is not None else None

    @property
    def stack(self) -> list[stacks.Frame]:
        """Creation stack, outermost first; [] when leakguard did not see the socket created."""
        rec = self[9]
        return rec.stack() if rec is not None else []

    @property
    def pool(self) -> dict[str, Any] | None:
        """The owning pool's view (checked out or idle, checkout age and stack), if pooled."""
        rec = self.record
        return rec.pool.to_dict() if rec is not None and rec.pool is not None else None

    @property
    def reason(self) -> str | None:
        """Why this socket is judged leaked, in words; None when it is not."""
        return self._reason(None)

    def _reason(self, memo: dict[Any, str] | None) -> str | None:
        """:attr:`reason`, with *memo* as judge.leak_reason takes it (a renderer's, for one snapshot)."""
        # A check's leaks (still open at its end) carry a diagnosis too; a reason only where the kernel shows one.
        return judge.leak_reason(self, memo) if self[10] is not None and self[3] in judge.LEAK_STATES else None

    @property
    def site(self) -> stacks.Frame | None:
        """The creation site: innermost application frame of the stack."""
        rec = self[9]
        return stacks.creation_site(rec.resolved()) if rec is not None else None

    @property
    def site_str(self) -> str:
        return stacks.format_site(self.site)

    def to_dict(self) -> dict[str, Any]:
        """This socket in the shape of CONTRACT.md's ``Socket``."""
        from . import report

        return report.socket_dict(self)

    def __repr__(self) -> str:
        return (
            f"<SocketInfo fd={self.fd} {self.type} {self.state} local={self.local} remote={self.remote} "
            f"origin={self.origin} site={self.site_str if self.stack else None}>"
        )


class Snapshot(Value):
    """The process's sockets at one moment; :attr:`leaks` are those judged leaked."""

    pid: int
    taken_at: float
    counts: dict[str, int]
    fds_open: int
    fds_limit: int
    sockets: list[SocketInfo]
    leaks: list[SocketInfo]

    def __init__(
        self,
        pid: int,
        taken_at: float,
        counts: dict[str, int],
        fds_open: int,
        fds_limit: int,
        sockets: list[SocketInfo],
        leaks: list[SocketInfo],
    ) -> None:
        self.pid = pid
        self.taken_at = taken_at
        self.counts = counts
        self.fds_open = fds_open
        self.fds_limit = fds_limit
        self.sockets = sockets
        self.leaks = leaks

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, the shape of CONTRACT.md (see :func:`leakguard.report.snapshot_dict`)."""
        from . import report

        return report.snapshot_dict(self)

    def format(self, stack_limit: int = 8) -> str:
        """The human-readable report (what the demo and the CLI print)."""
        from . import fdlimit, report

        return report.format_snapshot(self, stack_limit=stack_limit, outlook=fdlimit.outlook(self))

    def __str__(self) -> str:
        return self.format()


_new = tuple.__new__  # SocketInfo without its Python-level __new__, in the loop below


def _name(fam: int, kind: int) -> tuple[str, str]:
    """(family name, type name), kept in :data:`_NAMES`."""
    name = _NAMES.get((fam, kind))
    if name is None:
        name = _NAMES[(fam, kind)] = (_family_name(fam), _type_name(fam, kind))
    return name


def _compiled_join() -> Any:
    from . import registry  # its loader honours LEAKGUARD_PURE_PYTHON

    return getattr(registry._speedups, "join", None)


#: take's loop compiled (``_speedups.join``), or None: :func:`_take_py` does the same.
_join = _compiled_join()


def _take_py(
    kernel_socks: list[kernel.KernelSocket],
    records: dict[int, registry.Record],
    now: float,
    close_seen: dict[tuple[Any, ...], float],
) -> tuple[list[SocketInfo], list[SocketInfo], dict[str, int]]:
    """take's join of the kernel's view with the records, judged: (sockets, leaks, counts by TCP state)."""
    sockets: list[SocketInfo] = []
    leaks: list[SocketInfo] = []
    counts: dict[str, int] = {}
    get, add, names, info_cls = records.get, sockets.append, _NAMES, SocketInfo
    leak_states, is_leak, always = judge.LEAK_STATES, judge.is_leak, judge.ALWAYS_LEAK
    batch: diagnose.Batch | None = None  # made with the first leak: a snapshot without leaks pays nothing
    # Nothing called that need not be: this loop runs once per socket of the process.
    for ks in kernel_socks:
        kfd, fam, kind, state, local, remote, obj = ks[:7]  # a slice is an exact tuple: it unpacks without an iterator
        family, type_name = names.get((fam, kind)) or _name(fam, kind)
        rec = get(kfd)  # type: ignore[arg-type]  # kfd None (psutil's view): no record either
        age = now - rec.created if rec is not None else None
        leak = None
        if (
            state in leak_states
            and type_name == "tcp"
            and (state == always or is_leak(state, type_name, kfd, (kfd, local, remote), age, now, close_seen))
        ):
            if batch is None:
                batch = diagnose.Batch()
            batch.add(kfd, state, rec)
            leak = batch
        if rec is None:
            info = _new(info_cls, (kfd, family, type_name, state, local, remote, None, "unknown", None, None, leak))
        else:
            if rec.addrs is None and obj is not None and state in _STABLE:
                rec.addrs = (local, remote, fam, kind)
            info = _new(info_cls, (kfd, family, type_name, state, local, remote, age, rec.origin, rec.target, rec, leak))
        add(info)
        if state and type_name == "tcp":
            counts[state] = counts.get(state, 0) + 1
            if leak is not None:
                leaks.append(info)
    return sockets, leaks, counts


def take(cache: kernel.StateCache | None = None) -> Snapshot:
    """Read the kernel's view of this process's sockets now and join the records.

    *cache*: the watcher's :class:`kernel.StateCache` (cheaper repeated scans).
    """
    records, objects, known = registry.live_sockets(socket.socket)
    kernel_socks, open_fds = kernel.read_sockets(objects, known, cache)
    now = time.monotonic()
    close_seen: dict[tuple[Any, ...], float] = {}
    if _join is not None:
        sockets, leaks, counts, ask, batch = _join(
            kernel_socks, records, now, SocketInfo, _NAMES, _name, judge.ALWAYS_LEAK, judge.LEAK_STATES, _STABLE,
            diagnose.Batch,
        )  # fmt: skip
        if ask:  # the other leak states (CLOSE): judged here, with the grace rules
            for i in ask:
                info = sockets[i]
                if judge.is_leak(info[3], info[2], info[0], (info[0], info[4], info[5]), info[6], now, close_seen):
                    if batch is None:
                        batch = diagnose.Batch()
                    batch.add(info[0], info[3], info[9])
                    sockets[i] = _new(SocketInfo, (*info[:10], batch))
            leaks = [s for s in sockets if s[10] is not None]  # in the sockets' order
    else:
        sockets, leaks, counts = _take_py(kernel_socks, records, now, close_seen)
    judge.close_seen_update(close_seen)
    if open_fds is None:  # psutil's order; /proc/self/fd lists descriptors in ascending order already
        sockets.sort(key=lambda s: (s.fd is None, s.fd or 0))
        leaks.sort(key=lambda s: (s.fd is None, s.fd or 0))
    open_fds, limit = kernel.fd_usage(open_fds)
    return Snapshot(
        pid=os.getpid(),
        taken_at=time.time(),
        counts=counts,
        fds_open=open_fds,
        fds_limit=limit,
        sockets=sockets,
        leaks=leaks,
    )
