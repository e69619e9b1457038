"""Decide what leaked: the one home of leakguard's leak rules.

Record (:mod:`registry`) and observe (:mod:`kernel`) modules collect facts;
report modules render them; this module alone says which facts make a leak:

- a TCP socket in ``CLOSE_WAIT``: the peer closed its end and this process never
  closed its own;
- a TCP socket in ``CLOSE`` held for longer than :data:`CLOSE_GRACE`: the peer
  reset the connection and this process never closed its end (a refused
  connect passes through ``CLOSE`` too, for the moment its caller needs to close
  it: hence the grace period).

It also holds the grace rules of the checks (:func:`settle`), the ignore
matching by creation site (:func:`ignored`), whose leaks a forked child answers
for (:func:`inherited_fds`, :func:`tally`: a socket inherited at fork is the
parent's), when a pooled connection is held too long (:func:`checkout_overdue`),
and gives every leak its diagnosis (:func:`diagnosed`: verdict, held by, in use;
see :mod:`diagnose`).
"""

from __future__ import annotations

import _socket
import fnmatch
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from . import diagnose, kernel, stacks

if TYPE_CHECKING:
    from .registry import PoolInfo
    from .snapshot import Snapshot, SocketInfo

__all__ = [
    "ALWAYS_LEAK",
    "CLOSE_GRACE",
    "LEAK_STATES",
    "Tally",
    "backoff",
    "checkout_overdue",
    "close_seen_update",
    "diagnosed",
    "ignored",
    "inherited_fds",
    "is_leak",
    "leak_reason",
    "matching",
    "own_leaks",
    "remember_inherited",
    "settle",
    "tally",
    "was_connected",
]

#: Seconds a TCP socket may stay in CLOSE (peer reset, or connect refused) before it is a leak.
CLOSE_GRACE = 1.0
#: TCP states that can make a leak (CLOSE only after :data:`CLOSE_GRACE`).
LEAK_STATES = frozenset(("CLOSE_WAIT", "CLOSE"))
#: The TCP state that is a leak with nothing more to ask (:func:`is_leak`'s first rule, for a caller
#: that judges every socket of the process and calls is_leak only for the others).
ALWAYS_LEAK = "CLOSE_WAIT"

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
    if state == ALWAYS_LEAK:
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
    state, remote, age, rec = info[3], info[5], info[6], info[9]  # by index: a renderer asks this once per leak
    if memo is not None and (rec is None or rec.pool is None):
        written: Any = None  # the age as the text writes it, or something equal exactly when that is
        if age is not None:
            tenths = age * 10.0
            n = int(tenths + 0.5)
            if 0.0 <= age < 120.0 and -0.49 < tenths - n < 0.49:
                written = n  # "{age:.1f}" is n tenths: no rounding boundary within reach of the float error
            else:
                written = format_age(age)  # (formatting a float costs ten times the lines above)
        key = (
            state == "CLOSE",
            remote,
            written,
            id(rec._resolved or rec.resolved()) if rec is not None else None,  # the stack tuple: the snapshot keeps it alive
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


# -- sockets inherited across fork() ---------------------------------------------------------------

#: fd -> socket inode, for the sockets this process inherited at fork (see :func:`remember_inherited`)
_inherited: dict[int, int] = {}


def remember_inherited() -> None:
    """In a forked child: the sockets it holds now are its parent's (called by the at-fork handler)."""
    global _inherited
    _inherited = kernel.socket_inodes()  # no /proc: inherited sockets count as the child's own (documented)


def inherited_fds(snap: Snapshot) -> frozenset[int]:
    """Descriptors in *snap* that still hold the socket this process inherited at fork.

    Such a socket is counted (``inherited``, ``inherited_leaks``) but never one
    of this process's leaks: the parent created it and reports it, with its
    creation site.  A descriptor closed and reused since is this process's own.
    """
    if not _inherited:
        return frozenset()
    out = set()
    for s in snap.sockets:
        fd = s.fd
        if fd is None:
            continue
        ino = _inherited.get(fd)
        if ino is None:
            continue
        if s.record is not None:  # the fd was closed and reused by a socket this process made
            _inherited.pop(fd, None)
            continue
        try:
            same = os.fstat(fd).st_ino == ino
        except OSError:
            same = False
        if same:
            out.add(fd)
        else:
            _inherited.pop(fd, None)
    return frozenset(out)


def own_leaks(leaks: Iterable[SocketInfo], inherited: frozenset[int] | set[int]) -> list[SocketInfo]:
    """The *leaks* this process answers for: all but those still on a descriptor it inherited."""
    if not inherited:
        return list(leaks)
    return [s for s in leaks if not (s[9] is None and s[0] is not None and s[0] in inherited)]


class Tally(NamedTuple):
    """A snapshot's sockets by who answers for them (report summaries and metrics both show these)."""

    tracked: int  #: leakguard saw them created
    unknown: int  #: opened before install() or by C code no integration covers
    inherited: int  #: inherited at fork: the parent's
    inherited_leaks: int  #: leaks among the inherited ones (the parent reports them)


def tally(snap: Snapshot, inherited: frozenset[int] | set[int] = frozenset()) -> Tally:
    """*snap*'s sockets counted as tracked, unknown and inherited (see :func:`inherited_fds`)."""
    tracked = n_inherited = 0
    for s in snap.sockets:  # s[9]: the record, s[0]: the fd (SocketInfo by index, once per socket)
        if s[9] is not None:
            tracked += 1
        elif inherited and s[0] in inherited:
            n_inherited += 1
    leaks = sum(1 for s in snap.leaks if s[9] is None and s[0] in inherited) if inherited else 0
    return Tally(tracked, len(snap.sockets) - tracked - n_inherited, n_inherited, leaks)


# -- pooled connections held too long ----------------------------------------------------------------


def checkout_overdue(info: PoolInfo, limit: float | None, now: float | None = None) -> float | None:
    """Seconds *info*'s connection has been checked out when that is at least *limit* (``checkout_threshold``),
    else None (not checked out, within the limit, or no limit set)."""
    if limit is None or not info.checked_out or info.checkout_time is None:
        return None
    held = (time.monotonic() if now is None else now) - info.checkout_time
    return held if held >= limit else None


def matching(names: Iterable[str], globs: Iterable[str]) -> list[str]:
    """Those of *globs* (``fnmatch`` patterns, case-sensitive) that match one of *names* (empty names never match).

    The ignore rule of the pytest plugin: a socket is ignored when a glob matches its
    creation site, peer or target.
    """
    found = [n for n in names if n]
    return [g for g in globs if any(fnmatch.fnmatchcase(n, g) for n in found)]
