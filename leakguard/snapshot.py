"""Join the kernel's view with the records and judge what leaked."""

from __future__ import annotations

import functools
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from . import kernel, registry, stacks

__all__ = ["Snapshot", "SocketInfo", "take"]

_STABLE = frozenset(("ESTABLISHED", "CLOSE_WAIT", "LISTEN"))
_FAMILY_TYPES = {
    getattr(socket, "AF_UNIX", -1): "unix",
    getattr(socket, "AF_NETLINK", -1): "netlink",
    getattr(socket, "AF_PACKET", -1): "packet",
}


@functools.lru_cache(maxsize=64)
def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return str(family)


@functools.lru_cache(maxsize=256)
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


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class SocketInfo:
    """One socket of the process: kernel state joined with leakguard's record.

    The stack, pool view and leak reason are rendered on first access, so a
    snapshot of thousands of sockets costs little more than the kernel reads.
    """

    __slots__ = (
        "_reason",
        "_stack",
        "age_s",
        "family",
        "fd",
        "leaked",
        "local",
        "origin",
        "record",
        "remote",
        "state",
        "target",
        "type",
    )

    def __init__(
        self,
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
    ) -> None:
        self.fd = fd
        self.family = family
        self.type = type
        self.state = state
        self.local = local
        self.remote = remote
        self.age_s = age_s
        self.origin = origin
        self.target = target
        self.record = record
        #: Judged leaked: every TCP socket in CLOSE_WAIT.
        self.leaked = type == "tcp" and state == "CLOSE_WAIT"
        self._stack: list[stacks.Frame] | None = None
        self._reason: str | None = None

    @property
    def stack(self) -> list[stacks.Frame]:
        """Creation stack, outermost first; [] when leakguard did not see the socket created."""
        if self._stack is None:
            self._stack = self.record.stack() if self.record is not None else []
        return self._stack

    @property
    def pool(self) -> dict[str, Any] | None:
        """The owning pool's view (checked out or idle, checkout age and stack), if pooled."""
        rec = self.record
        return rec.pool.to_dict() if rec is not None and rec.pool is not None else None

    @property
    def reason(self) -> str | None:
        """Why this socket is judged leaked, in words; None when it is not."""
        if self.leaked and self._reason is None:
            self._reason = _leak_reason(self, self.record)
        return self._reason

    @property
    def site(self) -> stacks.Frame | None:
        """The creation site: innermost application frame of the stack."""
        return stacks.creation_site(self.stack)

    @property
    def site_str(self) -> str:
        return stacks.format_site(self.site)

    def to_dict(self) -> dict[str, Any]:
        stack = self.stack
        return {
            "fd": self.fd,
            "family": self.family,
            "type": self.type,
            "state": self.state,
            "local": self.local,
            "remote": self.remote,
            "age_s": round(self.age_s, 3) if self.age_s is not None else None,
            "origin": self.origin,
            "target": self.target,
            "pool": self.pool,
            "stack": [f.to_dict() for f in stack],
            "reason": self.reason,
            "site": self.site_str if stack else None,
        }

    def __repr__(self) -> str:
        return (
            f"<SocketInfo fd={self.fd} {self.type} {self.state} local={self.local} remote={self.remote} "
            f"origin={self.origin} site={self.site_str if self.stack else None}>"
        )


@dataclass
class Snapshot:
    """The process's sockets at one moment; :attr:`leaks` are those judged leaked."""

    pid: int
    taken_at: float
    counts: dict[str, int]
    fds_open: int
    fds_limit: int
    sockets: list[SocketInfo]
    leaks: list[SocketInfo]

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "taken_at": self.taken_at,
            "counts": dict(self.counts),
            "fds": {"open": self.fds_open, "limit": self.fds_limit},
            "sockets": [s.to_dict() for s in self.sockets],
            "leaks": [s.to_dict() for s in self.leaks],
        }

    def format(self, stack_limit: int = 8) -> str:
        """The human-readable report (what the demo and the CLI print)."""
        from . import report

        return report.format_snapshot(self, stack_limit=stack_limit)

    def __str__(self) -> str:
        return self.format()


def _leak_reason(info: SocketInfo, rec: registry.Record | None) -> str:
    peer = info.remote or "the peer"
    text = f"peer {peer} closed the connection; this process never closed its end"
    if info.age_s is not None:
        text += f", opened {_age(info.age_s)} ago"
    site = info.site
    if site is not None:
        text += f" at {stacks.format_site(site)}"
    if rec is None:
        text += " (opened before leakguard was installed or by C code: no creation stack)"
    pool = rec.pool if rec is not None else None
    if pool is not None:
        if pool.checked_out:
            age = time.monotonic() - (pool.checkout_time or time.monotonic())
            co = stacks.format_site(stacks.creation_site(stacks.frames(pool.checkout_frames)))
            text += (
                f"; it is checked out of pool {pool.name} (for {_age(age)}, at {co}):"
                " the application holds it and must return or close it"
            )
        else:
            text += (
                f"; it sits idle in pool {pool.name}: the application returned it and the pool"
                " keeps it until it next checks it or hands it out (a checkout check such as"
                " pool_pre_ping drops dead connections before a query fails)"
            )
    return text


def _info(ks: kernel.KernelSocket, rec: registry.Record | None, now: float) -> SocketInfo:
    if rec is None:
        return SocketInfo(
            ks.fd, _family_name(ks.family), _type_name(ks.family, ks.type), ks.state, ks.local, ks.remote,
            None, "unknown", None,
        )
    return SocketInfo(
        ks.fd, _family_name(ks.family), _type_name(ks.family, ks.type), ks.state, ks.local, ks.remote,
        now - rec.created, rec.origin, rec.target, rec,
    )


def take() -> Snapshot:
    """Read the kernel's view of this process's sockets now and join the records."""
    records, holders = registry.live_holders()
    objects: dict[int, Any] = {}
    known: dict[int, tuple[str | None, str | None, int, int]] = {}
    sock_type = socket.socket
    for fd, obj in holders.items():
        if isinstance(obj, sock_type):
            objects[fd] = obj
            addrs = records[fd].addrs
            if addrs is not None:
                known[fd] = addrs
    kernel_socks, open_fds = kernel.read_sockets(objects, known)
    now = time.monotonic()
    sockets = []
    counts: dict[str, int] = {}
    for ks in kernel_socks:
        rec = records.get(ks.fd) if ks.fd is not None else None
        if rec is not None and rec.addrs is None and ks.obj is not None and ks.state in _STABLE:
            rec.addrs = (ks.local, ks.remote, ks.family, ks.type)
        info = _info(ks, rec, now)
        sockets.append(info)
        if info.type == "tcp" and info.state:
            counts[info.state] = counts.get(info.state, 0) + 1
    sockets.sort(key=lambda s: (s.fd is None, s.fd or 0))
    open_fds, limit = kernel.fd_usage(open_fds)
    return Snapshot(
        pid=os.getpid(),
        taken_at=time.time(),
        counts=counts,
        fds_open=open_fds,
        fds_limit=limit,
        sockets=sockets,
        leaks=[s for s in sockets if s.leaked],
    )
