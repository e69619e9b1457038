"""When the descriptors run out: the growth of open sockets per creation site, projected against RLIMIT_NOFILE.

A leak that holds one more socket every second reaches a 20,000-descriptor
limit in about 5 hours; "Too many open files" then fails every new connection
and file.  From samples of the open descriptors and of the open sockets per
source (the creation site inside the process; state and peer from outside),
:func:`project` measures how fast descriptors grow (the least-squares slope
over the samples, so that one burst or one pause does not decide it) and how
fast each source's sockets grow, and projects when the soft ``RLIMIT_NOFILE``
is reached at that rate.  No projection when descriptors do not grow, grew by
fewer than :data:`MIN_GROWTH` over the samples, or the limit is unlimited.

:class:`History` keeps the bounded samples of the watcher (one per tick,
thinned to at most :data:`MAX_SAMPLES` over :data:`WINDOW_S`); the watcher
registers it, so that :func:`outlook` can project for any snapshot taken while
it runs (``str(leakguard.snapshot())``).  ``leakguard inspect`` and
``leakguard attach`` take two samples from outside instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ._value import Value

if TYPE_CHECKING:
    from .snapshot import Snapshot

__all__ = ["History", "Projection", "Sample", "outlook", "project", "sample_of", "sample_of_dict"]

#: Seconds of samples the watcher's projection is measured over.
WINDOW_S = 300.0
#: Most samples kept: ticks closer together than WINDOW_S / MAX_SAMPLES replace the newest.
MAX_SAMPLES = 64
#: Descriptors must have grown by at least this many over the samples (fewer is noise: a pool filling up).
MIN_GROWTH = 3


class Sample(NamedTuple):
    """Descriptors open at time *t* (seconds; only differences matter), and open sockets per source."""

    t: float
    fds: int
    sources: Mapping[str, int]


class Projection(Value):
    """Descriptors grow at *fds_per_s*: *limit* is reached in *seconds* (0 when reached already)."""

    seconds: float
    fds_per_s: float
    fds_open: int
    limit: int
    sources: list[tuple[str, float]]  # (source, sockets per second), growing ones, fastest first
    span_s: float
    by: str  # "site": sources are creation sites; "peer": "STATE to PEER" read from outside

    def __init__(
        self,
        seconds: float,
        fds_per_s: float,
        fds_open: int,
        limit: int,
        sources: list[tuple[str, float]],
        span_s: float,
        by: str = "site",
    ) -> None:
        self.seconds = seconds
        self.fds_per_s = fds_per_s
        self.fds_open = fds_open
        self.limit = limit
        self.sources = sources
        self.span_s = span_s
        self.by = by

    def at(self, fds_open: int) -> Projection:
        """The same rates, from *fds_open* descriptors (a snapshot taken after the last sample)."""
        left = max(0.0, (self.limit - fds_open) / self.fds_per_s)
        return Projection(left, self.fds_per_s, fds_open, self.limit, self.sources, self.span_s, self.by)

    @property
    def message(self) -> str:
        from .report import fd_outlook_line

        return fd_outlook_line(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reached_in_s": round(self.seconds, 1),
            "fds_per_s": round(self.fds_per_s, 4),
            "fds_open": self.fds_open,
            "limit": self.limit,
            "sources": [{"source": s, "sockets_per_s": round(r, 4)} for s, r in self.sources],
            "measured_over_s": round(self.span_s, 1),
            "by": self.by,
            "message": self.message,
        }


def _slope(ts: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of *ys* over *ts* (the two-point slope for two samples)."""
    n = len(ts)
    mt = sum(ts) / n
    my = sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    if var <= 0.0:
        return 0.0
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var


def project(samples: Sequence[Sample], limit: int, by: str = "site", min_growth: int = MIN_GROWTH) -> Projection | None:
    """When *limit* descriptors are reached at the rate *samples* show (oldest first); None when not growing."""
    if limit <= 0 or len(samples) < 2:
        return None
    first, last = samples[0], samples[-1]
    span = last.t - first.t
    if span <= 0.0 or last.fds - first.fds < min_growth:
        return None
    ts = [s.t - first.t for s in samples]  # centred near 0: no precision lost on unix times
    rate = _slope(ts, [float(s.fds) for s in samples])
    if rate <= 0.0:
        return None
    growing = []
    before = first.sources
    for name, n in last.sources.items():  # only a source with more sockets than at the first sample grows
        if n > before.get(name, 0):
            r = _slope(ts, [float(s.sources.get(name, 0)) for s in samples])
            if r > 0.0:
                growing.append((name, r))
    growing.sort(key=lambda nr: (-nr[1], nr[0]))
    left = max(0.0, (limit - last.fds) / rate)
    return Projection(left, rate, last.fds, limit, growing, span, by)


# -- samples of a snapshot -----------------------------------------------------------------------------


def sample_of(
    snap: Snapshot,
    t: float,
    names: dict[Any, str] | None = None,
    known: dict[int, str] | None = None,
    sites: dict[int, str] | None = None,
) -> Sample:
    """*snap* as a sample at time *t*: its descriptors and its open sockets per creation site.

    *names*: (code, offset) of a site -> ``file.py:LINE``; *known*: record seq -> its site from the
    last sample; *sites* is filled likewise for this one (each record's stack is walked once, not at
    every tick).
    """
    from .churn import site_key, site_name

    names = {} if names is None else names
    sites = {} if sites is None else sites
    get = (known or {}).get
    sources: dict[str, int] = {}
    unknown = 0
    for s in snap.sockets:
        rec = s[9]
        if rec is None:
            unknown += 1
            continue
        seq = rec.seq
        name = get(seq)
        if name is None:
            name = site_name(site_key(rec.frames)[0], names)
        sites[seq] = name
        sources[name] = sources.get(name, 0) + 1
    if unknown:
        sources[UNKNOWN] = unknown
    return Sample(t, snap.fds_open, sources)


#: The source of sockets leakguard did not see created (opened before install, or by C code).
UNKNOWN = "sockets of unknown origin"


def peer_source(state: str | None, remote: str | None, kind: str = "tcp") -> str:
    """The source name of a socket seen from outside: its state and peer (``CLOSE_WAIT to 127.0.0.1:5432``)."""
    if kind != "tcp":
        return f"{kind} sockets"
    return f"{state or 'unknown state'} to {remote}" if remote else f"{state or 'unconnected'} sockets"


def sample_of_dict(view: Mapping[str, Any], t: float) -> Sample:
    """A ``to_dict()`` (``leakguard inspect``, or attach's result) as a sample keyed by state and peer."""
    sources: dict[str, int] = {}
    for s in view["sockets"]:
        name = peer_source(s.get("state"), s.get("remote"), s.get("type", "tcp"))
        sources[name] = sources.get(name, 0) + 1
    return Sample(t, int(view["fds"]["open"]), sources)


# -- the watcher's history ------------------------------------------------------------------------------


class History:
    """The watcher's samples over the last :data:`WINDOW_S` seconds, at most :data:`MAX_SAMPLES` of them."""

    def __init__(self, window_s: float = WINDOW_S, max_samples: int = MAX_SAMPLES) -> None:
        self.window_s = window_s
        self.step = window_s / max_samples
        self.samples: list[Sample] = []
        self.limit = -1
        self.names: dict[Any, str] = {}
        self.sites: dict[int, str] = {}  # record seq -> site, for the records of the last sample
        self.pid = os.getpid()

    def add(self, sample: Sample, limit: int) -> None:
        s = self.samples
        if len(s) >= 2 and sample.t - s[-2].t < self.step:
            s[-1] = sample  # the newest bucket keeps its newest sample
        else:
            s.append(sample)
        while len(s) > 2 and s[0].t < sample.t - self.window_s:
            del s[0]
        self.limit = limit
        if len(self.names) > 4096:
            self.names.clear()

    def add_snapshot(self, snap: Snapshot, t: float) -> Projection | None:
        """Sample *snap* (taken at monotonic time *t*) and project."""
        sites: dict[int, str] = {}
        self.add(sample_of(snap, t, self.names, self.sites, sites), snap.fds_limit)
        self.sites = sites
        return self.projection()

    def projection(self) -> Projection | None:
        return project(self.samples, self.limit)


_registered: list[History] = []  # the running watcher's history (at most one per process)


def register(history: History | None) -> None:
    """The running watcher's history (None: no watcher runs), used by :func:`outlook`."""
    _registered[:] = [history] if history is not None else []


def outlook(snap: Snapshot) -> Projection | None:
    """The projection of the running watcher's history, from *snap*'s descriptors; None without one."""
    h = _registered[0] if _registered else None
    if h is None or h.pid != os.getpid():
        return None
    p = h.projection()
    return p.at(snap.fds_open) if p is not None and snap.fds_limit == p.limit else p

