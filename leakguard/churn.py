"""Connection churn: sites that open and close so many connections that TIME_WAIT exhausts local ports.

The side that closes a TCP connection first keeps it in TIME_WAIT for 60 s on
Linux, holding the (local address, local port, peer address, peer port) tuple.
A client that opens a fresh connection per request to one peer can therefore
make at most ``ip_local_port_range`` connections to that peer per minute; near
that rate ``connect()`` starts failing with ``EADDRNOTAVAIL``.  The kernel
cannot say which code does it (TIME_WAIT sockets have no owner); the records can.

Nothing is added to the socket hot path.  At each watcher tick
:meth:`ChurnTracker.observe` compares what it sees with the previous tick:

* a record that was live at the previous tick in ``ESTABLISHED`` and is gone now
  was closed by this process first (exact: site, peer and state are known);
* a record created since the previous tick and already closed (its object gone
  or its ``fileno()`` changed, but its fd not yet reused) is a *sample* of a
  short-lived connection: its creation site is known, its peer is the last peer
  seen live for that site;
* the registry's sequence counter says how many records were created since the
  previous tick; those never seen at all (closed and their fd reused before the
  tick) are attributed to sites in proportion to the samples above.

Approximations (documented, accepted): short-lived connections are assumed to be
closed by this process first (true for most clients, not for HTTP/1.0 servers
that hang up); sockets created by ``accept()``/``socketpair()``/``fromfd()``/
``dup()`` are never counted (a server's accepted sockets use no local ephemeral
port); a site whose only sockets are short-lived UDP sockets is counted as if
TCP; the peer of a site never seen live is unknown; rates are extrapolated to
60 s from the window observed so far (at least 1 s).
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Iterable
from types import CodeType
from typing import TYPE_CHECKING, Any

from . import registry, stacks
from ._value import Value

if TYPE_CHECKING:
    from .snapshot import Snapshot

__all__ = ["ChurnTracker", "ChurnWarning", "local_port_range"]

#: TIME_WAIT duration on Linux (TCP_TIMEWAIT_LEN), the window rates are measured over.
WINDOW_S = 60.0
_DEFAULT_RANGE = (32768, 60999)
_SOCKET_FILE = socket.__file__
_NOT_CLIENT = frozenset({"accept", "socketpair", "fromfd", "dup"})

SiteKey = tuple[Any, int]  # (code, lasti) of the creation site, or ("<unknown>", 0)


def local_port_range() -> tuple[int, int]:
    """``net.ipv4.ip_local_port_range`` (Linux), else the Linux default."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split()[:2])
        if 0 < lo <= hi:
            return lo, hi
    except (OSError, ValueError):
        pass
    return _DEFAULT_RANGE


class ChurnWarning(Value):
    """One site closing connections to one peer fast enough to run out of local ports."""

    site: str
    peer: str | None
    closes_per_60s: int
    limit: int
    ports: int
    origin: str

    def __init__(self, site: str, peer: str | None, closes_per_60s: int, limit: int, ports: int, origin: str) -> None:
        self.site = site
        self.peer = peer
        self.closes_per_60s = closes_per_60s
        self.limit = limit
        self.ports = ports
        self.origin = origin

    @property
    def message(self) -> str:
        to = f"to {self.peer}" if self.peer else "to one peer"
        return (
            f"{self.site} opens and closes about {self.closes_per_60s} connections per 60 s {to}; "
            f"each waits 60 s in TIME_WAIT and only {self.ports} local ports exist per peer "
            f"(net.ipv4.ip_local_port_range): reuse connections with a pool or keep-alive (e.g. one "
            f"requests.Session / httpx.Client) instead of a new connection per call"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "peer": self.peer,
            "closes_per_60s": self.closes_per_60s,
            "limit": self.limit,
            "local_ports": self.ports,
            "origin": self.origin,
            "suggestion": "use a connection pool or keep-alive",
        }


def _site_key(frames: stacks.Frames) -> tuple[SiteKey, bool]:
    """(creation site key, is it possibly a client connection) from raw captured frames."""
    client = True
    if len(frames) >= 2:
        code = frames[0]
        if isinstance(code, CodeType) and code.co_name in _NOT_CLIENT and code.co_filename == _SOCKET_FILE:
            client = False
    is_app = stacks._is_app_code
    for i in range(0, len(frames) - 1, 2):
        code = frames[i]
        if isinstance(code, CodeType) and is_app(code):
            return (code, frames[i + 1]), client
    if len(frames) >= 2:
        return (frames[0], frames[1]), client
    return ("<unknown>", 0), client


class ChurnTracker:
    """Counts connections each creation site closes first, per peer, over the last 60 s.

    Call :meth:`before` right before taking the snapshot and :meth:`observe` with
    the snapshot; both run on the watcher thread only.
    """

    def __init__(self, limit: int | None = None) -> None:
        lo, hi = local_port_range()
        self.ports = hi - lo + 1
        #: closes per 60 s per (site, peer) that trigger a warning: half the ports by default
        self.limit = limit if limit is not None else max(1, self.ports // 2)
        self._last_seq: int | None = None
        self._keys: dict[int, tuple[SiteKey, bool]] = {}  # seq -> (site key, client?) of live records
        # seq -> (site, peer, record) of client connections ESTABLISHED at the last tick
        self._prev: dict[int, tuple[SiteKey, str | None, registry.Record]] = {}
        self._peers: collections.OrderedDict[SiteKey, str] = collections.OrderedDict()  # site -> last peer
        self._origins: dict[SiteKey, str] = {}
        self._window: collections.deque[tuple[float, dict[tuple[SiteKey, str | None], float]]] = (
            collections.deque()
        )
        self._window_start: float | None = None
        self._warned: dict[tuple[SiteKey, str | None], float] = {}
        self._names: dict[SiteKey, str] = {}

    # -- tick ---------------------------------------------------------------

    def before(self) -> tuple[int, list[registry.Record]]:
        """The registry's sequence number and every record, live or not, before the snapshot prunes them."""
        # observe() looks only at records created since the last tick; on the first, at none
        last = self._last_seq
        return registry.mark(), registry.all_records(last) if last is not None else []

    def observe(self, snap: Snapshot, pre: tuple[int, list[registry.Record]], now: float | None = None) -> list[ChurnWarning]:
        now = time.monotonic() if now is None else now
        seq_now, records = pre
        # Live client connections in ESTABLISHED: the ones whose disappearance by the
        # next tick means this process closed them first.
        current: dict[int, tuple[SiteKey, str | None, registry.Record]] = {}
        known, keys = self._keys, {}
        peers = self._peers
        for info in snap.sockets:  # SocketInfo by index: this loop runs once per socket every tick
            rec = info[9]
            if rec is None or info[3] != "ESTABLISHED" or info[2] != "tcp":
                continue
            seq = rec.seq
            kc = known.get(seq)  # one stack walk per record, not per tick
            if kc is None:
                kc = _site_key(rec.frames)
            keys[seq] = kc
            if kc[1]:
                remote = info[5]
                current[seq] = (kc[0], remote, rec)
                if remote and peers.get(kc[0]) != remote:
                    self._learn(kc[0], remote, rec.origin)
        self._keys = keys
        closes: dict[tuple[SiteKey, str | None], float] = {}
        if self._last_seq is not None:
            last = self._last_seq
            for seq, (key, peer, rec) in self._prev.items():
                # gone from ESTABLISHED: closed by us first, unless still open (the peer closed: CLOSE_WAIT)
                if seq not in current and not rec.alive():
                    k = (key, peer)
                    closes[k] = closes.get(k, 0.0) + 1
            created = seq_now - last - 1  # minus the number before() consumed itself
            present = 0
            samples: dict[SiteKey, int] = {}
            for rec in records:
                if not last < rec.seq < seq_now:
                    continue
                present += 1
                if rec.alive():
                    continue
                key, client = _site_key(rec.frames)
                if client:
                    samples[key] = samples.get(key, 0) + 1
                    self._origins.setdefault(key, rec.origin)
            unseen = max(0, created - present)
            total = sum(samples.values())
            for key, n in samples.items():
                share = n + (unseen * n / total if total else 0.0)
                k = (key, self._peers.get(key))
                closes[k] = closes.get(k, 0.0) + share
            self._window.append((now, closes))
        else:
            self._window_start = now
        self._last_seq = seq_now
        self._prev = current
        return self._judge(now)

    def _learn(self, key: SiteKey, peer: str, origin: str) -> None:
        self._peers[key] = peer
        self._peers.move_to_end(key)
        self._origins[key] = origin
        if len(self._peers) > 4096:
            old, _ = self._peers.popitem(last=False)
            self._origins.pop(old, None)
            self._names.pop(old, None)

    # -- rates --------------------------------------------------------------

    def rates(self, now: float | None = None) -> dict[tuple[SiteKey, str | None], int]:
        """Closes per 60 s per (site, peer), extrapolated from the window seen so far."""
        now = time.monotonic() if now is None else now
        while self._window and self._window[0][0] < now - WINDOW_S:
            t, _ = self._window.popleft()
            self._window_start = t
        if self._window_start is None or not self._window:
            return {}
        span = max(1.0, min(WINDOW_S, now - self._window_start))
        totals: dict[tuple[SiteKey, str | None], float] = {}
        for _, closes in self._window:
            for k, n in closes.items():
                totals[k] = totals.get(k, 0.0) + n
        return {k: round(n * WINDOW_S / span) for k, n in totals.items() if n > 0}

    def site_rates(self, now: float | None = None) -> list[tuple[str, int]]:
        """(site ``file.py:LINE``, closes per 60 s) summed over peers, highest first."""
        by_site: dict[str, int] = {}
        for (key, _peer), n in self.rates(now).items():
            name = self.name(key)
            by_site[name] = by_site.get(name, 0) + n
        return sorted(by_site.items(), key=lambda kv: -kv[1])

    def name(self, key: SiteKey) -> str:
        name = self._names.get(key)
        if name is None:
            code, lasti = key
            if isinstance(code, CodeType):
                name = stacks.format_site(stacks.frames((code, lasti))[0])
            else:
                name = str(code)
            if len(self._names) > 8192:
                self._names.clear()
            self._names[key] = name
        return name

    def _judge(self, now: float) -> list[ChurnWarning]:
        out = []
        for k, rate in self.rates(now).items():
            if rate < self.limit:
                continue
            last = self._warned.get(k)
            if last is not None and now - last < WINDOW_S:
                continue  # one warning per site and peer per minute
            self._warned[k] = now
            key, peer = k
            out.append(ChurnWarning(self.name(key), peer, rate, self.limit, self.ports, self._origins.get(key, "socket")))
        if len(self._warned) > 4096:
            self._warned = {k: t for k, t in self._warned.items() if now - t < WINDOW_S}
        out.sort(key=lambda w: -w.closes_per_60s)
        return out


def warnings_to_dicts(warnings: Iterable[ChurnWarning]) -> list[dict[str, Any]]:
    return [w.to_dict() for w in warnings]
