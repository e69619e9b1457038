"""Decide what leaked: the one home of leakguard's leak rules.

Record (:mod:`registry`) and observe (:mod:`kernel`) modules collect facts;
report modules render them; this module alone says which facts make a leak:

- a TCP socket in ``CLOSE_WAIT``: the peer closed its end and this process never
  closed its own;
- a TCP socket in ``CLOSE`` held for longer than :data:`CLOSE_GRACE`: the peer
  reset the connection and this process never closed its end (a refused
  connect passes through ``CLOSE`` too, for the moment its caller needs to close
  it: hence the grace period).

It also holds the grace rules of the checks (:func:`settle`) and the ignore
matching by creation site (:func:`ignored`), and gives every leak its
diagnosis (:func:`diagnosed`: verdict, held by, in use; see :mod:`diagnose`).
"""

from __future__ import annotations

import _socket
import fnmatch
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import diagnose, stacks

if TYPE_CHECKING:
    from .snapshot import SocketInfo

__all__ = [
    "CLOSE_GRACE",
    "LEAK_STATES",
    "backoff",
    "close_seen_update",
    "diagnosed",
    "ignored",
    "is_leak",
    "leak_reason",
    "matching",
    "settle",
    "was_connected",
]

#: Seconds a TCP socket may stay in CLOSE (peer reset, or connect refused) before it is a leak.
CLOSE_GRACE = 1.0
#: TCP states that can make a leak (CLOSE only after :data:`CLOSE_GRACE`).
LEAK_STATES = frozenset(("CLOSE_WAIT", "CLOSE"))

_TCP_INFO = getattr(_socket, "TCP_INFO", 11)
#: (fd, local, remote) -> time.monotonic() the socket was first seen in CLOSE; replaced at every judged snapshot
_close_seen: dict[tuple[Any, ...], float] = {}


def is_leak(
    state: str | None,
    kind: str,
    fd: int | None = None,
    key: tuple[Any, ...] | None = None,
    age_s: float | None = None,
    now: float | None = None,
    seen: dict[tuple[Any, ...], float] | None = None,
) -> bool:
    """Is a socket in *state* of type *kind* ("tcp", ...) on descriptor *fd* leaked?

    For ``CLOSE`` (also the state of a socket never connected, or whose connect
    was refused), only a socket that was connected counts, and only once it has
    been in CLOSE, or alive at all (*age_s*), for :data:`CLOSE_GRACE` seconds.
    *key* identifies it across snapshots; *seen* (the next table of first
    sightings, see :func:`close_seen_update`) is filled here.
    """
    if kind != "tcp":
        return False
    if state == "CLOSE_WAIT":
        return True
    if state != "CLOSE" or fd is None or not was_connected(fd):
        return False
    now = time.monotonic() if now is None else now
    first = _close_seen.get(key, now) if key is not None else now
    if seen is not None and key is not None:
        seen[key] = first
    return now - first >= CLOSE_GRACE or (age_s is not None and age_s >= CLOSE_GRACE)


def was_connected(fd: int) -> bool:
    """Did the TCP socket on *fd* (now in CLOSE) ever exchange segments with a peer?

    ``tcp_info`` keeps its counters after a reset, and they are zero on a socket
    never connected or whose connect failed (the kernel clears them then).
    """
    try:
        raw = _socket.socket(fileno=fd)  # no new descriptor; detached below, never closed
    except OSError:
        return False
    try:
        info = raw.getsockopt(_socket.IPPROTO_TCP, _TCP_INFO, 144)
    except OSError:
        return False
    finally:
        raw.detach()
    if len(info) >= 144:  # Linux 4.2+: bytes_acked (the SYN counts) and segs_in
        return bool(int.from_bytes(info[120:128], sys.byteorder) or int.from_bytes(info[140:144], sys.byteorder))
    return len(info) >= 72 and int.from_bytes(info[68:72], sys.byteorder) > 0  # tcpi_rtt: measured once connected


def close_seen_update(seen: dict[tuple[Any, ...], float]) -> None:
    """Replace the table of CLOSE sightings with those of the snapshot just judged (bounded by the sockets held)."""
    global _close_seen
    _close_seen = seen


def format_age(seconds: float, approx: bool = False) -> str:
    """*seconds* as a person reads an age: '4.2 s', '3.5 min', '2.0 h'; *approx*: '~47 s', '~12 min', '~5 h', '~3 d'."""
    if approx:
        for unit, size, below in (("s", 1, 120), ("min", 60, 7200), ("h", 3600, 172800)):
            if seconds < below:
                return f"~{seconds / size:,.0f} {unit}"
        return f"~{seconds / 86400:,.0f} d"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def leak_reason(info: SocketInfo, memo: dict[Any, str] | None = None) -> str:
    """Why *info* is judged leaked, in words a person reads.

    *memo*, a dict a renderer keeps for one snapshot, makes the words once for every
    socket they are the same for (a group's sockets: same state, peer, age as written
    and creation stack); a pooled socket's are its own.
    """
    rec = info.record
    if memo is not None and (rec is None or rec.pool is None):
        key = (
            info.state == "CLOSE",
            info.remote,
            format_age(info.age_s) if info.age_s is not None else None,
            id(rec.resolved()) if rec is not None else None,  # the stack tuple: the snapshot keeps it alive
        )
        text = memo.get(key)
        if text is None:
            text = memo[key] = leak_reason(info)
        return text
    if info.state == "CLOSE":
        peer = f"the peer {info.remote}" if info.remote else "the peer"
        text = f"{peer} reset the connection; this process never closed its end"
    else:
        text = f"peer {info.remote or 'the peer'} closed the connection; this process never closed its end"
    if info.age_s is not None:
        text += f", opened {format_age(info.age_s)} ago"
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
                f"; it is checked out of pool {pool.name} (for {format_age(age)}, at {co}):"
                " the application holds it and must return or close it"
            )
        else:
            since = f" for {format_age(time.monotonic() - pool.idle_since)}" if pool.idle_since is not None else ""
            owner = f" (owned by {pool.owner})" if pool.owner else ""
            text += (
                f"; it sits idle in pool {pool.name}{owner}{since}: the application returned it and the pool"
                " keeps it until it next checks it or hands it out (a checkout check such as"
                " pool_pre_ping drops dead connections before a query fails)"
            )
    return text


def ignored(info: SocketInfo, globs: Iterable[str]) -> bool:
    """Does *info*'s creation site (``file.py:LINE``, path as shown) or any frame's file match one of *globs*?"""
    globs = tuple(globs)
    if not globs:
        return False
    site = info.site_str if info.stack else ""
    names = [site] + [f"{stacks.relpath(f.file)}:{f.line}" for f in info.stack] + [f.file for f in info.stack]
    names += [info.origin]
    return any(fnmatch.fnmatch(name, g) for g in globs for name in names if name)


def backoff(grace: float, first_delay: float = 0.001, max_delay: float = 0.1) -> Iterator[float]:
    """The waits of a grace period: exponential back-off (goleak's retry) until *grace* seconds have passed."""
    deadline = time.monotonic() + max(grace, 0.0)
    delay = first_delay
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        yield min(delay, remaining)
        delay = min(delay * 2, max_delay)


def settle(pending: Sequence[Any], alive: Callable[[Any], bool], grace: float) -> list[Any]:
    """Wait up to *grace* seconds, with exponential back-off, for *pending* to stop being *alive*.

    Things still closing get time to finish.  Returns those still alive at the
    end (no wait at all when none is).
    """
    left = [p for p in pending if alive(p)]
    for delay in backoff(grace):
        if not left:
            break
        time.sleep(delay)
        left = [p for p in left if alive(p)]
    return left


def diagnosed(
    infos: Iterable[SocketInfo], settled_frames: tuple[Any, ...] = (), roots: Iterable[tuple[str, Any]] = ()
) -> list[SocketInfo]:
    """*infos* judged leaked by a check (still open at its end): the same sockets, with a diagnosis.

    *settled_frames*: frames done with the checked code (their locals hold, but do not use, a socket).
    *roots*: more (label, object) roots of the paths, e.g. ``("fixture `client`", value)``.
    """
    batch = diagnose.Batch(settled_frames, tuple(roots))
    out = []
    for info in infos:
        batch.add(info.fd, info.state, info.record)
        out.append(tuple.__new__(type(info), (*info[:10], batch)))
    return out


def matching(names: Iterable[str], globs: Iterable[str]) -> list[str]:
    """Those of *globs* (``fnmatch`` patterns, case-sensitive) that match one of *names* (empty names never match).

    The ignore rule of the pytest plugin: a socket is ignored when a glob matches its
    creation site, peer or target.
    """
    found = [n for n in names if n]
    return [g for g in globs if any(fnmatch.fnmatchcase(n, g) for n in found)]
