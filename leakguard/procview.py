"""Another process's sockets, read from outside (``leakguard inspect PID``): nothing runs in it.

Linux: ``/proc/PID/fd`` gives each socket descriptor's inode; the process's
own network namespace tables (``/proc/PID/net/tcp``, ``tcp6``, ``udp``,
``udp6``, ``unix``) give the state and addresses of each inode; the soft
``RLIMIT_NOFILE`` comes from ``/proc/PID/limits`` (the target's limit, not
ours).  Reading another user's ``/proc/PID/fd`` needs root or the same user
(ptrace access mode read): anything else is a :class:`ProcessError` with one
clear line.  Without ``/proc``: psutil.

The result has the shape of ``leakguard.snapshot().to_dict()``: every socket
has origin ``"unknown"`` and an empty stack (only code inside the process can
know those); ``verdict``/``held_by``/``in_use`` are null because who holds a
socket is only visible from inside (``leakguard attach``).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from .kernel import TCP_STATES
from .snapshot import _family_name, _type_name

__all__ = ["ProcessError", "format_view", "fd_limit", "read_process", "read_sampled"]

_PROC = "/proc"


class ProcessError(Exception):
    """A process that cannot be read (gone, or not ours): the message is one line for the user."""


def _check_pid(pid: int) -> None:
    if pid <= 0:
        raise ProcessError(f"no such process: {pid}")


def _hex_addr4(text: str) -> str:
    host, port = text.split(":")
    raw = bytes.fromhex(host)[::-1]  # one little-endian 32-bit word
    return f"{socket.inet_ntop(socket.AF_INET, raw)}:{int(port, 16)}"


def _hex_addr6(text: str) -> str:
    host, port = text.split(":")
    b = bytes.fromhex(host)
    raw = b"".join(b[i : i + 4][::-1] for i in range(0, 16, 4))  # four little-endian words
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{int(port, 16)}"


#: table file -> (family, type, address parser)
_TABLES = (
    ("tcp", socket.AF_INET, socket.SOCK_STREAM, _hex_addr4),
    ("tcp6", socket.AF_INET6, socket.SOCK_STREAM, _hex_addr6),
    ("udp", socket.AF_INET, socket.SOCK_DGRAM, _hex_addr4),
    ("udp6", socket.AF_INET6, socket.SOCK_DGRAM, _hex_addr6),
)

#: (family, type, state, local, remote) per inode
Entry = tuple[int, int, str | None, str | None, str | None]


def _table(pid: int, name: str) -> list[str]:
    """The rows of ``/proc/PID/net/NAME`` without its header; [] when absent."""
    try:
        with open(f"{_PROC}/{pid}/net/{name}") as f:
            return f.read().splitlines()[1:]
    except OSError:
        return []


def _read_inet(pid: int, inodes: set[int], out: dict[int, Entry]) -> None:
    for name, family, kind, parse in _TABLES:
        for line in _table(pid, name):
            cols = line.split()
            if len(cols) < 10:
                continue
            try:
                ino = int(cols[9])
            except ValueError:
                continue
            if ino not in inodes or ino in out:
                continue
            st = int(cols[3], 16)
            local: str | None = parse(cols[1])
            remote: str | None = parse(cols[2])
            if remote is not None and remote.endswith(":0"):
                remote = None  # listening, unconnected or never connected
            state = TCP_STATES.get(st) if kind == socket.SOCK_STREAM else None  # states are TCP's
            if local is not None and local.endswith(":0") and state in ("CLOSE", None):
                local = None  # never bound
            out[ino] = (family, kind, state, local, remote)


_UNIX_TYPES = {1: socket.SOCK_STREAM, 2: socket.SOCK_DGRAM, 5: socket.SOCK_SEQPACKET}


def _read_unix(pid: int, inodes: set[int], out: dict[int, Entry]) -> None:
    for line in _table(pid, "unix"):
        cols = line.split(None, 7)
        if len(cols) < 7:
            continue
        try:
            ino = int(cols[6])
        except ValueError:
            continue
        if ino not in inodes or ino in out:
            continue
        path = cols[7] if len(cols) > 7 else None
        out[ino] = (socket.AF_UNIX, _UNIX_TYPES.get(int(cols[4], 16), int(cols[4], 16)), None, path or None, None)


def _read_netlink(pid: int, inodes: set[int], out: dict[int, Entry]) -> None:
    family = getattr(socket, "AF_NETLINK", 16)
    for line in _table(pid, "netlink"):
        cols = line.split()
        try:
            ino = int(cols[-1])
        except (ValueError, IndexError):
            continue
        if ino in inodes and ino not in out:
            out[ino] = (family, socket.SOCK_RAW, None, None, None)


def fd_limit(pid: int) -> int:
    """The soft ``RLIMIT_NOFILE`` of *pid* from ``/proc/PID/limits``; -1 when unlimited or unknown."""
    return _limits(pid).get("Max open files", (-1, -1))[0]


def _limits(pid: int) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    try:
        with open(f"{_PROC}/{pid}/limits") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        name = line[:26].strip()
        parts = line[26:].split()
        if len(parts) < 2:
            continue
        vals = [-1 if p == "unlimited" else int(p) if p.isdigit() else -1 for p in parts[:2]]
        out[name] = (vals[0], vals[1])
    return out


def _list_socket_fds(pid: int) -> tuple[dict[int, int], int]:
    """(fd -> socket inode, number of open descriptors) of *pid*, or ProcessError."""
    base = f"{_PROC}/{pid}/fd"
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        raise ProcessError(f"no such process: {pid}") from None
    except PermissionError:
        owner = _owner(pid)
        raise ProcessError(
            f"permission denied reading {base}: run as root or as the process's user"
            + (f" (uid {owner})" if owner is not None else "")
        ) from None
    socks: dict[int, int] = {}
    for name in names:
        try:
            link = os.readlink(f"{base}/{name}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            socks[int(name)] = int(link[8:-1])
    return socks, len(names)


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"{_PROC}/{pid}").st_uid
    except OSError:
        return None


def _socket_dict(fd: int | None, family: int, kind: int, state: str | None, local: str | None, remote: str | None) -> dict[str, Any]:
    tname = _type_name(family, kind) if family >= 0 else "unknown"
    leaked = state == "CLOSE_WAIT" and tname == "tcp"
    return {
        "fd": fd,
        "family": _family_name(family) if family >= 0 else "unknown",
        "type": tname,
        "state": state,
        "local": local,
        "remote": remote,
        "age_s": None,
        "origin": "unknown",
        "target": None,
        "pool": None,
        "stack": [],
        "reason": (
            f"peer {remote or 'the peer'} closed the connection; this process never closed its end "
            "(seen from outside: no creation stack; `leakguard attach` tells who holds it)"
            if leaked
            else None
        ),
        "site": None,
        "verdict": None,
        "held_by": [],
        "in_use": None,
    }


def read_process(pid: int) -> dict[str, Any]:
    """The sockets of process *pid* in ``Snapshot.to_dict()``'s shape, read from outside.

    Raises :class:`ProcessError` (no such process, permission denied).
    """
    _check_pid(pid)
    if not os.path.isdir(f"{_PROC}/self/fd"):
        return _read_psutil(pid)
    fds, open_fds = _list_socket_fds(pid)
    inodes = set(fds.values())
    table: dict[int, Entry] = {}
    _read_inet(pid, inodes, table)
    if len(table) < len(inodes):
        _read_unix(pid, inodes, table)
    if len(table) < len(inodes):
        _read_netlink(pid, inodes, table)
    sockets = []
    for fd in sorted(fds):
        e = table.get(fds[fd])
        if e is None:
            sockets.append(_socket_dict(fd, -1, -1, None, None, None))
        else:
            sockets.append(_socket_dict(fd, *e))
    return _assemble(pid, sockets, open_fds, fd_limit(pid))


def read_sampled(pid: int, sample_s: float) -> dict[str, Any]:
    """:func:`read_process` twice, *sample_s* seconds apart, with ``"fd_projection"``: when the
    process reaches its ``RLIMIT_NOFILE`` at the rate its descriptors grew in between (by state and
    peer: from outside there are no creation sites), or None (not growing; see :mod:`leakguard.fdlimit`).
    *sample_s* 0: one reading, no projection.
    """
    from . import fdlimit

    first = read_process(pid)
    if sample_s <= 0:
        return first
    t0 = time.monotonic()
    time.sleep(sample_s)
    view = read_process(pid)
    samples = [fdlimit.sample_of_dict(first, t0), fdlimit.sample_of_dict(view, time.monotonic())]
    p = fdlimit.project(samples, view["fds"]["limit"], by="peer")
    view["fd_projection"] = p.to_dict() if p is not None else None
    return view


def _assemble(pid: int, sockets: list[dict[str, Any]], open_fds: int, limit: int) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for s in sockets:
        if s["type"] == "tcp" and s["state"]:
            counts[s["state"]] = counts.get(s["state"], 0) + 1
    return {
        "pid": pid,
        "taken_at": time.time(),
        "counts": counts,
        "fds": {"open": open_fds, "limit": limit},
        "sockets": sockets,
        "leaks": [s for s in sockets if s["reason"] is not None],
    }


def _read_psutil(pid: int) -> dict[str, Any]:
    import psutil

    try:
        proc = psutil.Process(pid)
        getter = getattr(proc, "net_connections", None) or proc.connections
        conns = getter(kind="all")
        open_fds = proc.num_fds() if hasattr(proc, "num_fds") else proc.num_handles()
        try:
            limit = int(proc.rlimit(psutil.RLIMIT_NOFILE)[0])
        except (AttributeError, psutil.Error):
            limit = -1
    except psutil.NoSuchProcess:
        raise ProcessError(f"no such process: {pid}") from None
    except psutil.AccessDenied:
        raise ProcessError(f"permission denied reading process {pid}: run as root or as its user") from None
    sockets = []
    for c in sorted(conns, key=lambda c: c.fd):
        state = c.status if c.type == socket.SOCK_STREAM and c.family in (socket.AF_INET, socket.AF_INET6) else None
        state = None if state == "NONE" else state
        local = _psutil_addr(c.family, c.laddr)
        remote = _psutil_addr(c.family, c.raddr)
        sockets.append(_socket_dict(c.fd if c.fd >= 0 else None, int(c.family), int(c.type), state, local, remote))
    return _assemble(pid, sockets, open_fds, limit)


def _psutil_addr(family: int, addr: Any) -> str | None:
    if not addr:
        return None
    if not isinstance(addr, tuple):
        return str(addr)  # a UNIX path
    return f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"


def format_view(view: dict[str, Any], title: str = "") -> str:
    """The human-readable summary of a ``to_dict()``: states, CLOSE_WAIT by peer, fds, listeners."""
    socks = view["sockets"]
    fds = view["fds"]
    limit = fds["limit"]
    lines = [f"pid {view['pid']}{title}: {len(socks)} sockets; fds {fds['open']}/{limit if limit >= 0 else 'unlimited'}"]
    if limit > 0:
        pct = 100.0 * fds["open"] / limit
        if pct >= 80:
            lines[-1] += f" ({pct:.0f}% of RLIMIT_NOFILE: new sockets and files will soon fail with EMFILE)"
    if view.get("fd_projection"):
        lines.append(view["fd_projection"]["message"])
    counts = view["counts"]
    if counts:
        lines.append("TCP by state: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    else:
        lines.append("no TCP sockets")
    others: dict[str, int] = {}
    for s in socks:
        if s["type"] != "tcp":
            others[s["type"]] = others.get(s["type"], 0) + 1
    if others:
        lines.append("other sockets: " + ", ".join(f"{k} {v}" for k, v in sorted(others.items())))
    listen = [s for s in socks if s["state"] == "LISTEN"]
    if listen:
        lines.append("listening: " + ", ".join(f"{s['local']} (fd {s['fd']})" for s in listen))
    by_peer: dict[str, list[int]] = {}
    for s in view["leaks"]:
        by_peer.setdefault(s["remote"] or "?", []).append(s["fd"])
    if by_peer:
        lines.append(
            f"CLOSE_WAIT (the peer closed, this process never did): {len(view['leaks'])} socket(s)"
        )
        for peer, fdl in sorted(by_peer.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(str(f) for f in fdl[:10]) + (", ..." if len(fdl) > 10 else "")
            lines.append(f"  {len(fdl):>5} to {peer}  (fds {shown})")
    return "\n".join(lines)
