"""Connection churn: sites that open and close so many connections that TIME_WAIT exhausts local ports.

The side that closes a TCP connection first keeps it in TIME_WAIT for 60 s on
Linux, holding the (local address, local port, peer address, peer port) tuple.
A client that opens a fresh connection per request to one peer can therefore
hold at most ``ip_local_port_range`` ports to that peer per minute; near that
rate ``connect()`` starts failing with ``EADDRNOTAVAIL``.

What is counted is what the kernel shows: a connection this process closed
first is a TIME_WAIT entry in the network namespace's table
(``/proc/self/net/tcp{,6}``).  Sockets that never connected (UDP, unconnected
TCP) and connections the peer closed first leave none, so they are never
counted.  Nothing is added to the socket hot path.  At each watcher tick
:meth:`ChurnTracker.observe` compares what it sees with the previous tick:

* a record that was live in ``ESTABLISHED`` at the previous tick and is gone
  now, with a TIME_WAIT entry for its exact addresses: closed first by this
  process (exact: site, peer and state are known);
* the TIME_WAIT entries new since the previous tick that match none of those
  are connections opened and closed between two ticks (never seen live); their
  peers are exact, their number is capped by the sockets this process created
  since the previous tick, and they are attributed to the creation sites of the
  records created since then and already closed, in proportion to how many each
  site has (a site's last peer seen live goes first).  Entries whose local port
  is a listening port (a server's side) or outside the ephemeral range are
  ignored.

The cap is the number of sockets created up to a mark taken right after the
read (every entry found belongs to a socket created before it).  When no record
of a client socket made since the previous tick is left (a server thread in the
same process accepted on the descriptors the client just closed), the sites last
seen live with those peers get them; with none, they wait up to three reads for
a site and are then counted under ``<unknown>``: every close is counted.

The table is read only at ticks where a socket may have closed since the
previous one (a client one made since and closed, one ESTABLISHED then, or
sockets made since whose records were replaced already): a steady process never
reads it.

Exact only in the process's own network namespace: the table is the
namespace's, so with other processes in it (the host's namespace, a pod's
sidecars) their short-lived connections to the same peers can be counted too,
at most as many as this process created sockets meanwhile.  Each warning says
whether it is exact (``exact``, ``shared_namespace_with``: the other processes
found in this namespace through ``/proc/*/ns/net``; those not readable without
root are not counted) and its message says "not exact" when it is not.  A
TIME_WAIT entry the kernel removes early is not counted either: with
``net.ipv4.tcp_rfc1337=0`` (the default) a RST received in TIME_WAIT removes it
(under load a peer's FIN is retransmitted before the ACK is processed, the
TIME_WAIT acknowledges it again and the peer, already closed, answers RST;
``TcpExtTW`` counts the entries made, ``Tcp: OutRsts`` the RSTs); the port is
free again then, so the projection of the ports held stays right.  Rates: ``closes_per_60s`` is what
the last 60 s actually closed (ports now held in TIME_WAIT), ``rate_per_s`` the
rate over the last few seconds, from which the exhaustion of the port range to
the peer is projected.
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Callable
from types import CodeType
from typing import TYPE_CHECKING, Any

from . import _threads, kernel, registry, stacks
from ._value import Value

if TYPE_CHECKING:
    from .snapshot import Snapshot

__all__ = ["ChurnTracker", "ChurnWarning", "local_port_range", "time_wait"]

#: TIME_WAIT duration on Linux (TCP_TIMEWAIT_LEN), the window closes are counted over.
WINDOW_S = 60.0
#: The recent rate (for the projection) is measured over at least this many seconds of ticks.
RECENT_S = 1.0
_DEFAULT_RANGE = (32768, 60999)
_ORPHAN_STATES = frozenset(("04", "05", "0B"))  # FIN_WAIT1, FIN_WAIT2, CLOSING
_SOCKET_FILE = socket.__file__
_NOT_CLIENT = frozenset({"accept", "socketpair", "fromfd", "dup"})
#: A rate measured on fewer closes is noise (a shared namespace's stray entries): no projection from it.
_MIN_PROJECTED = 20
_BOUND = 4096  # most sites remembered (peers, origins); code objects of recompiled sites must not pile up

SiteKey = tuple[Any, int]  # (code, lasti) of the creation site, or ("<unknown>", 0)
#: The site of closes no record could be found for.
UNKNOWN_SITE: SiteKey = ("<unknown>", 0)
#: Table reads that keep closes with no known site aside, waiting for one, before counting them unknown.
_DEFER_READS = 3
Pair = tuple[SiteKey, "str | None"]


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


def time_wait(
    ports: tuple[int, int] | None = None, step: Callable[[], None] | None = None
) -> dict[tuple[str, str], tuple[str, int]] | None:
    """Client connections this network namespace closed first; None without /proc.

    Keys are the kernel's hex (local, remote), values (state, timer): the timer
    is the time left to the entry, which jumps up when a new connection reused
    the port of one in TIME_WAIT (``tcp_tw_reuse``) and then closed in turn.
    Closed first: TIME_WAIT, or still waiting for the peer's FIN (FIN_WAIT1,
    FIN_WAIT2, CLOSING) with no descriptor left (inode 0): either way the local
    port stays taken.  Client side: the local port is in *ports* (the ephemeral
    range) and is no listening port of the namespace (a server's own side of a
    connection it closed first holds no ephemeral port).  Decode with :func:`decode`.
    *step* is called every 1,024 lines (it may raise to abandon the read).
    """
    lo, hi = ports or local_port_range()
    found: list[tuple[str, str, str, str]] = []
    listening: set[str] = set()
    ok = False
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/self/net/{name}") as f:
                f.readline()
                for n, line in enumerate(f):
                    if step is not None and not n & 1023:
                        step()  # the table is machine-wide: a fork may end the watcher's tick here
                    parts = line.split(None, 10)
                    if len(parts) < 10:
                        continue
                    st = parts[3]
                    if st == "06" or (st in _ORPHAN_STATES and parts[9] == "0"):
                        found.append((parts[1], parts[2], st, parts[5]))
                    elif st == "0A":
                        listening.add(parts[1].rpartition(":")[2])
            ok = True
        except OSError:
            continue
    if not ok:
        return None
    out = {}
    for local, remote, st, timer in found:
        port_hex = local.rpartition(":")[2]
        if port_hex not in listening and lo <= int(port_hex, 16) <= hi:
            try:
                left = int(timer.partition(":")[2], 16)
            except ValueError:
                left = 0
            out[(local, remote)] = (st, left)
    return out


def _new_entries(
    now: dict[tuple[str, str], tuple[str, int]], prev: dict[tuple[str, str], tuple[str, int]]
) -> list[tuple[str, str]]:
    """Entries of *now* that were not there at *prev*, or are a later connection on the same ports."""
    out = []
    for key, (st, left) in now.items():
        was = prev.get(key)
        if was is None or (st == "06" and was[0] == "06" and left > was[1]):
            out.append(key)
    return out


_decoded: dict[str, str] = {}


def decode(hexaddr: str) -> str:
    """``0100007F:1538`` -> ``127.0.0.1:5432`` (IPv6 as ``[::1]:5432``), as ss prints them."""
    text = _decoded.get(hexaddr)
    if text is None:
        text = kernel.hex_addr4(hexaddr) if len(hexaddr) <= 13 else kernel.hex_addr6(hexaddr)
        if len(_decoded) > 65536:
            _decoded.clear()
        _decoded[hexaddr] = text
    return text


class ChurnWarning(Value):
    """One site closing connections to one peer fast enough to run out of local ports."""

    site: str
    peer: str | None
    closes_per_60s: int
    limit: int
    ports: int
    origin: str
    rate_per_s: float
    exhausted_in_s: float | None
    shared_with: int | None

    def __init__(
        self,
        site: str,
        peer: str | None,
        closes_per_60s: int,
        limit: int,
        ports: int,
        origin: str,
        rate_per_s: float = 0.0,
        exhausted_in_s: float | None = None,
        shared_with: int | None = 0,
    ) -> None:
        self.site = site
        self.peer = peer
        self.closes_per_60s = closes_per_60s
        self.limit = limit
        self.ports = ports
        self.origin = origin
        self.rate_per_s = rate_per_s
        self.exhausted_in_s = exhausted_in_s
        #: other processes in this network namespace (0: alone, counts exact; None: could not tell)
        self.shared_with = shared_with

    @property
    def message(self) -> str:
        to = self.peer or "one peer"
        if self.exhausted_in_s is not None:
            outlook = f"exhausted in ~{self.exhausted_in_s:,.0f} s at {self.rate_per_s:,.0f}/s"
        else:
            outlook = f"at {self.rate_per_s:,.0f}/s about {self.rate_per_s * WINDOW_S:,.0f} of them stay in TIME_WAIT"
        return (
            f"{self.site} opened and closed {self.closes_per_60s:,} connections to {to} in the last 60 s "
            f"(this process closed first: each waits 60 s in TIME_WAIT); {self.ports:,} ports to {to}; {outlook}. "
            "Reuse connections (a pool or keep-alive: one requests.Session / httpx.Client, a DB pool), "
            "set net.ipv4.tcp_tw_reuse=1 for outbound connections, or spread them over more source addresses"
            + _exactness(self.shared_with)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "peer": self.peer,
            "closes_per_60s": self.closes_per_60s,
            "rate_per_s": round(self.rate_per_s, 1),
            "exhausted_in_s": round(self.exhausted_in_s, 1) if self.exhausted_in_s is not None else None,
            "limit": self.limit,
            "local_ports": self.ports,
            "origin": self.origin,
            "exact": self.shared_with == 0,
            "shared_namespace_with": self.shared_with,
            "suggestion": "use a connection pool or keep-alive; tcp_tw_reuse=1 for outbound; more source addresses",
        }


def _exactness(shared: int | None) -> str:
    if shared == 0:
        return ""
    who = "other processes" if shared is None else f"{shared} other process{'es' if shared > 1 else ''}"
    return (
        f" (not exact: this network namespace is {'possibly ' if shared is None else ''}shared with {who}, whose "
        "connections to the same peer closed first count too: only a process alone in its namespace, a "
        "container's, is counted exactly)"
    )


_ns_cache: list[tuple[float, int | None]] = []


def namespace_sharers(now: float | None = None) -> int | None:
    """How many other processes share this process's network namespace (its TCP table); None if unknown.

    Reads ``/proc/*/ns/net`` (a few ms with hundreds of processes), so at most once a minute: only
    when a churn warning goes out.  Processes whose namespace cannot be read (another user's, without
    root) are not counted; None when this process's own cannot be read (no /proc).
    """
    import os

    now = time.monotonic() if now is None else now
    if _ns_cache and now - _ns_cache[0][0] < WINDOW_S:
        return _ns_cache[0][1]
    try:
        mine = os.stat("/proc/self/ns/net").st_ino
        me = os.getpid()
        n = 0
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            try:
                if os.stat(f"/proc/{name}/ns/net").st_ino == mine:
                    n += 1
            except OSError:
                continue  # exited meanwhile, or not ours to read (another user's without root): not counted
    except OSError:
        _ns_cache[:] = [(now, None)]
        return None
    _ns_cache[:] = [(now, n)]
    return n


def site_key(frames: stacks.Frames) -> tuple[SiteKey, bool]:
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


def site_name(key: SiteKey, names: dict[Any, str]) -> str:
    """``file.py:LINE`` of a :func:`site_key`, remembered in *names* (bounded)."""
    name = names.get(key)
    if name is None:
        code, lasti = key
        if isinstance(code, CodeType):
            name = stacks.format_site(stacks.frames((code, lasti))[0])
        else:
            name = str(code)
        if len(names) > 2 * _BOUND:
            names.clear()
        names[key] = name
    return name


class ChurnTracker:
    """Counts connections each creation site closed first, per peer, over the last 60 s.

    Call :meth:`before` right before taking the snapshot and :meth:`observe` with
    the snapshot; both run on the watcher thread only.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.range = local_port_range()
        #: called between parts of a table read (the watcher's step: a fork may end its tick there,
        #: before any state of this tracker changed; the tick runs again after the fork)
        self.step: Callable[[], None] | None = None
        lo, hi = self.range
        self.ports = hi - lo + 1
        #: closes per 60 s per (site, peer), counted or projected from the current rate, that trigger a
        #: warning: half the ports by default (a projected exhaustion of the range warns too)
        self.limit = limit if limit is not None else max(1, self.ports // 2)
        self._last_seq: int | None = None
        self._keys: dict[int, tuple[SiteKey, bool]] = {}  # seq -> (site key, client?) of live records
        # seq -> (site, peer, record) of client connections ESTABLISHED at the last tick
        self._prev: dict[int, tuple[SiteKey, str | None, registry.Record]] = {}
        self._peers: collections.OrderedDict[SiteKey, str] = collections.OrderedDict()  # site -> last peer
        self._origins: collections.OrderedDict[SiteKey, str] = collections.OrderedDict()
        self._window: collections.deque[tuple[float, dict[Pair, float]]] = collections.deque()
        self._window_start: float | None = None
        # A metrics scrape reads the rates from its own thread while the watcher's tick adds to them: the
        # window is read through copies (tuple() of a deque is one C call) and expired under this lock.
        self._expiring = _threads.api()[2]()
        self._warned: dict[Pair, float] = {}
        self._names: dict[SiteKey, str] = {}
        # closed-first entries at the last tick that read them
        self._tw: dict[tuple[str, str], tuple[str, int]] | None = None
        # (time of a table read, sockets created since the read before it): the cap on what the new entries
        # of that read can count (see _count)
        self._made: collections.deque[tuple[float, int]] = collections.deque()
        self._read_seq: int | None = None  # registry.mark() taken right after the last table read
        self._marks = 0  # marks before() took since then (each consumes a sequence number)
        self._read_marked = 0  # 1 when the last tick took a mark after its table read
        self._deferred = 0  # reads that found new entries and no client site to give them to
        self._share: dict[SiteKey, float] = {}  # client sites' shares of the last ticks that made any

    # -- tick ---------------------------------------------------------------

    def before(self) -> tuple[int, list[registry.Record]]:
        """The registry's sequence number and every record, live or not, before the snapshot prunes them."""
        # observe() looks only at records created since the last tick; on the first, at none
        self._marks += 1
        last = self._last_seq
        return registry.mark(), registry.all_records(last) if last is not None else []

    def observe(self, snap: Snapshot, pre: tuple[int, list[registry.Record]], now: float | None = None) -> list[ChurnWarning]:
        now = time.monotonic() if now is None else now
        seq_now, records = pre
        # Live client connections in ESTABLISHED: the ones whose disappearance by the
        # next tick may mean this process closed them first.
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
                kc = site_key(rec.frames)
            keys[seq] = kc
            if kc[1]:
                remote = info[5]
                current[seq] = (kc[0], remote, rec)
                if remote and peers.get(kc[0]) != remote:
                    self._learn(kc[0], remote, rec.origin)
        self._keys = keys
        closes: dict[Pair, float] = {}
        if self._last_seq is not None:
            last = self._last_seq
            gone = [v for seq, v in self._prev.items() if seq not in current and not v[2].alive()]
            # minus the number before() consumed itself, and the mark of the table read of the last tick
            created = seq_now - last - 1 - self._read_marked
            self._read_marked = 0
            present = 0
            samples: dict[SiteKey, int] = {}
            closed = False
            for rec in records:
                if not last < rec.seq < seq_now:
                    continue
                present += 1
                kc = keys.get(rec.seq)
                key, client = kc if kc is not None else site_key(rec.frames)
                if client:  # the sites that made client sockets since the last tick, open or closed
                    samples[key] = samples.get(key, 0) + 1
                    self._remember_origin(key, rec.origin)
                    if kc is None and not closed and not rec.alive():
                        closed = True
            # The table is read only when a socket may have closed: a client one made since the last tick
            # and closed, one ESTABLISHED then, or sockets made since whose records are gone already (their
            # descriptors were reused: under load a server thread's accept() takes the fd a client just
            # closed, and a burst can leave no client record at any tick; issue 16: 1 of 600 counted).
            if gone or closed or created > present or self._deferred:
                self._count(closes, gone, samples, created, max(0, created - present), now)
            self._window.append((now, closes))
        else:
            self._window_start = now
            self._tw = time_wait(self.range, self.step)  # the baseline: entries older than leakguard are not its closes
            self._read_seq, self._marks, self._read_marked = registry.mark(), 0, 1
        self._last_seq = seq_now
        self._prev = current
        return self._judge(now)

    def _count(
        self,
        closes: dict[Pair, float],
        gone: list[tuple[SiteKey, str | None, registry.Record]],
        samples: dict[SiteKey, int],
        created: int,
        unseen: int,
        now: float,
    ) -> None:
        """Closes since the last tick from the kernel's new closed-first entries (see the module doc)."""
        tw = time_wait(self.range, self.step)
        if tw is None:  # no /proc: the records alone (every gone or short-lived client counts)
            for key, peer, _rec in gone:
                closes[(key, peer)] = closes.get((key, peer), 0.0) + 1
            total = sum(samples.values())
            for key, n in samples.items():
                k = (key, self._peers.get(key))
                closes[k] = closes.get(k, 0.0) + n + (unseen * n / total if total else 0.0)
            return
        prev = self._tw if self._tw is not None else {}
        self._tw = tw
        # Sockets created up to this read, counted by a mark taken after it: every entry the read found
        # belongs to a socket created before the mark.  (The tick's own mark, taken before the snapshot,
        # missed those made between it and the read: under load hundreds in a burst, whose entries then
        # went over the cap and were never counted; issue 16: 526 of 600 counted.)
        seq = registry.mark()
        self._read_marked = 1
        made = self._made
        if self._read_seq is not None:
            made.append((now, seq - self._read_seq - 1 - self._marks))
        self._read_seq, self._marks = seq, 0
        while made and made[0][0] < now - WINDOW_S:
            made.popleft()
        new = {(decode(local), decode(remote)): (local, remote) for local, remote in _new_entries(tw, prev)}
        for key, peer, rec in gone:
            addrs = rec.addrs
            if addrs is not None and addrs[0] and addrs[1] and new.pop((addrs[0], addrs[1]), None) is not None:
                closes[(key, peer)] = closes.get((key, peer), 0.0) + 1
        # At most as many as this process created sockets in the last 60 s, minus those counted already.
        if not new:
            return
        total = sum(samples.values())
        if total:
            self._share = {key: n / total for key, n in samples.items()}
        share = self._share
        if not share:  # the sites last seen live with these peers
            peers = {remote for _local, remote in new}
            sites = [key for key, peer in self._peers.items() if peer in peers]
            share = {key: 1.0 / len(sites) for key in sites}
        if share:
            self._deferred = 0
        elif self._deferred < _DEFER_READS:  # no client site known yet: the next reads may know one
            self._deferred += 1
            for raw in new.values():
                del tw[raw]
            return
        else:  # still none (every client record was replaced before a tick saw it): counted, site unknown
            self._deferred = 0
            share = {UNKNOWN_SITE: 1.0}
        by_peer: dict[str, int] = {}
        for _local, remote in new:
            by_peer[remote] = by_peer.get(remote, 0) + 1
        # The busiest peers first: in a namespace shared with other processes, their closes are spread
        # thin over many peers.
        counted = sum(n for _t, c in tuple(self._window) for n in c.values()) + sum(closes.values())
        cap = sum(n for _t, n in made) - counted
        taken: dict[str, float] = {}
        for p in sorted(by_peer, key=lambda p: -by_peer[p]):
            if cap <= 0:
                break
            got = min(float(by_peer[p]), cap)
            taken[p] = got
            cap -= got
        attributed = sum(taken.values())
        budget = {key: f * attributed for key, f in share.items()}
        for key in share:  # a site's last peer seen live first
            last_peer = self._peers.get(key)
            if last_peer is not None and taken.get(last_peer):
                part = min(budget[key], taken[last_peer])
                closes[(key, last_peer)] = closes.get((key, last_peer), 0.0) + part
                taken[last_peer] -= part
                budget[key] -= part
        left = sum(taken.values())
        if left <= 0:
            return
        for key, b in budget.items():
            if b <= 0:
                continue
            for p, t in taken.items():
                if t > 0:
                    closes[(key, p)] = closes.get((key, p), 0.0) + b * t / left

    def _learn(self, key: SiteKey, peer: str, origin: str) -> None:
        self._peers[key] = peer
        self._peers.move_to_end(key)
        self._remember_origin(key, origin)
        if len(self._peers) > _BOUND:
            old, _ = self._peers.popitem(last=False)
            self._names.pop(old, None)

    def _remember_origin(self, key: SiteKey, origin: str) -> None:
        origins = self._origins
        if key in origins:
            origins.move_to_end(key)
            return
        origins[key] = origin
        if len(origins) > _BOUND:  # the oldest site's code object goes (issue 14, item 8)
            old, _ = origins.popitem(last=False)
            self._names.pop(old, None)

    # -- rates --------------------------------------------------------------

    def _expire(self, now: float) -> tuple[tuple[float, dict[Pair, float]], ...]:
        """Drop the ticks older than the window; the window's ticks now (a copy)."""
        # Bounded: a fork while another thread held it leaves it held in the child; then nothing expires.
        if not self._expiring.acquire(True, 1.0):
            return tuple(self._window)
        try:
            while self._window and self._window[0][0] < now - WINDOW_S:
                t, _ = self._window.popleft()
                self._window_start = t
            return tuple(self._window)
        finally:
            self._expiring.release()

    def rates(self, now: float | None = None) -> dict[Pair, int]:
        """Closes in the last 60 s per (site, peer): the ports they hold in TIME_WAIT now."""
        now = time.monotonic() if now is None else now
        totals: dict[Pair, float] = {}
        for _, closes in self._expire(now):
            for k, n in closes.items():
                totals[k] = totals.get(k, 0.0) + n
        return {k: round(n) for k, n in totals.items() if round(n) > 0}

    def recent_rates(self, now: float | None = None) -> dict[Pair, float]:
        """Closes per second per (site, peer) over the last ticks spanning at least :data:`RECENT_S`."""
        now = time.monotonic() if now is None else now
        window = self._expire(now)
        if not window:
            return {}
        totals: dict[Pair, float] = {}
        start = now
        for t, closes in reversed(window):
            for k, n in closes.items():
                totals[k] = totals.get(k, 0.0) + n
            start = t
            if now - t >= RECENT_S:
                break
        # the first tick of the span counted closes since the tick before it
        i = next((j for j, (t, _) in enumerate(window) if t == start), 0)
        origin = window[i - 1][0] if i > 0 else (self._window_start or start)
        span = max(1e-3, now - origin)
        return {k: n / span for k, n in totals.items() if n > 0}

    def site_rates(self, now: float | None = None) -> list[tuple[str, int]]:
        """(site ``file.py:LINE``, closes in the last 60 s) summed over peers, highest first."""
        by_site: dict[str, int] = {}
        for (key, _peer), n in self.rates(now).items():
            name = self.name(key)
            by_site[name] = by_site.get(name, 0) + n
        return sorted(by_site.items(), key=lambda kv: -kv[1])

    def name(self, key: SiteKey) -> str:
        return site_name(key, self._names)

    def held(self, peer: str | None) -> int:
        """Client TIME_WAIT entries to *peer* at the last read of the table (ports it holds)."""
        if peer is None or not self._tw:
            return 0
        return sum(1 for _local, remote in self._tw if decode(remote) == peer)

    def exhausted_in(self, peer: str | None, rate_per_s: float, held: int | None = None) -> float | None:
        """Seconds until the ports to *peer* run out at *rate_per_s*; None when TIME_WAIT expiry keeps up."""
        if rate_per_s <= 0 or rate_per_s * WINDOW_S < self.ports:
            return None
        used = held if held is not None else self.held(peer)
        return max(0.0, (self.ports - used) / rate_per_s)

    def _judge(self, now: float) -> list[ChurnWarning]:
        out = []
        recent = self.recent_rates(now)
        per_peer: dict[str | None, float] = {}
        for (_key, peer), r in recent.items():
            per_peer[peer] = per_peer.get(peer, 0.0) + r
        for k, count in self.rates(now).items():
            key, peer = k
            rate = recent.get(k, 0.0)
            # the ports to a peer run out for all its sites together
            peer_rate = per_peer.get(peer, 0.0)
            exhausted = self.exhausted_in(peer, peer_rate)
            # the closes of the last 60 s, or the current rate kept up for 60 s, reach the limit
            projected = count >= _MIN_PROJECTED and (rate * WINDOW_S >= self.limit or exhausted is not None)
            if count < self.limit and not projected:
                continue
            last = self._warned.get(k)
            if last is not None and now - last < WINDOW_S:
                continue  # one warning per site and peer per minute
            self._warned[k] = now
            out.append(
                ChurnWarning(
                    self.name(key), peer, count, self.limit, self.ports, self._origins.get(key, "socket"),
                    rate, exhausted, namespace_sharers(now),
                )  # fmt: skip
            )
        if len(self._warned) > _BOUND:
            self._warned = {k: t for k, t in self._warned.items() if now - t < WINDOW_S}
        out.sort(key=lambda w: -w.closes_per_60s)
        return out
