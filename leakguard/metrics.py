"""Prometheus metrics (optional extra ``leakguard[prometheus]``): sockets by state, leaks by site, fd headroom.

Two ways to export:

* ``install(metrics_port=9464)`` (or ``LEAKGUARD_METRICS_PORT``) serves
  ``/metrics`` over HTTP on ``metrics_addr`` (default ``127.0.0.1``; port 0
  picks a free port, see :func:`server_address`), from a registry of its own.
* :func:`register` adds leakguard's collector to a registry the host already
  exposes (``prometheus_client.REGISTRY`` by default).

Values are those of the last watcher tick (``report_interval``); without a
watcher a scrape takes a snapshot itself (at most one per second).

Exported (all gauges, no per-process labels):

==========================================  ================================================
``leakguard_tcp_sockets{state}``            TCP sockets of this process by state
``leakguard_sockets{tracking}``             all sockets: ``tracked``, ``unknown``, ``inherited``
``leakguard_leaked_sockets{site,verdict}``  leaked sockets by creation site ``file.py:LINE`` and verdict
``leakguard_churn_closes_per_minute{site}`` connections closed first, per creation site (see churn)
``leakguard_open_fds`` / ``leakguard_fd_limit``  descriptors in use / RLIMIT_NOFILE soft limit
``leakguard_last_update_timestamp_seconds`` when the values were taken
==========================================  ================================================

Label cardinality is bounded: the ``top_sites`` sites with the most leaks (or
churn) get their own label, the rest are summed under ``site="other"``; a
leak's ``verdict`` is one of ``forgotten``, ``in_use``, ``idle_in_pool``,
``unreachable`` (see :mod:`leakguard.diagnose`) or ``none`` (not diagnosed), so
a site has at most five series (``sum by (site)`` gives the leaks of a site).
``site="other", verdict="none"`` is always present (0 without leaks beyond the top sites).

Prefork servers: after ``fork()`` a child does not serve the parent's port (the
parent holds it); export per worker with :func:`register` on a registry of the
worker's own, or give each worker its own ``metrics_port`` by calling
``install()`` in the worker.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .diagnose import VERDICTS

if TYPE_CHECKING:
    from .churn import ChurnTracker
    from .snapshot import Snapshot

__all__ = ["LeakguardCollector", "configure", "register", "server_address", "stop", "unregister", "update"]

log = logging.getLogger("leakguard")

_lock = threading.Lock()
_latest: dict[str, Any] | None = None
_top = [10]
_registered: list[tuple[Any, LeakguardCollector]] = []
_server: Any = None
_thread: threading.Thread | None = None
_serving: tuple[str, int] | None = None  # (addr, port) as configured
_parent_endpoint: tuple[str, int] | None = None  # what the parent served when we were forked


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def _verdict(info: Any) -> str:
    v = info.verdict  # the snapshot's one diagnosis (the watcher's: only new or changed groups are walked)
    return v if v in VERDICTS else "none"


def _summarise(snap: Snapshot, inherited: frozenset[int] | set[int], churn: ChurnTracker | None) -> dict[str, Any]:
    by_site: dict[str, int] = {}
    by_verdict: dict[tuple[str, str], int] = {}
    tracked = n_inherited = 0
    for s in snap.sockets:
        if s.record is not None:
            tracked += 1
        elif s.fd is not None and s.fd in inherited:
            n_inherited += 1
    for info in snap.leaks:
        if info.record is None and info.fd is not None and info.fd in inherited:
            continue
        site = info.site_str if info.stack else "<unknown>"
        by_site[site] = by_site.get(site, 0) + 1
        sv = (site, _verdict(info))
        by_verdict[sv] = by_verdict.get(sv, 0) + 1
    return {
        "counts": dict(snap.counts),
        "tracked": tracked,
        "inherited": n_inherited,
        "unknown": len(snap.sockets) - tracked - n_inherited,
        "leaks": by_site,
        "verdicts": by_verdict,
        "churn": dict(churn.site_rates()) if churn is not None else {},
        "fds_open": snap.fds_open,
        "fds_limit": snap.fds_limit,
        "ts": snap.taken_at,
        "mono": time.monotonic(),
    }


def _active() -> bool:
    return _server is not None or bool(_registered)


def update(snap: Snapshot, inherited: frozenset[int] | set[int] = frozenset(), churn: ChurnTracker | None = None) -> None:
    """Called by the watcher at each tick; a no-op unless metrics are exported."""
    global _latest
    if not _active():
        return
    data = _summarise(snap, inherited, churn)
    with _lock:
        _latest = data


def _current() -> dict[str, Any]:
    global _latest
    from . import watcher

    with _lock:
        data = _latest
    w = watcher.current()
    fresh = data is not None and (
        (w is not None and w.interval is not None) or time.monotonic() - data["mono"] < 1.0
    )
    if data is None or not fresh:
        from .snapshot import take

        snap = take()
        data = _summarise(snap, watcher.inherited_fds(snap), w.churn if w is not None else None)
        with _lock:
            _latest = data
    return data


def _bounded(values: dict[str, int | float], top: int) -> list[tuple[str, float]]:
    ranked = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
    out = [(site, float(n)) for site, n in ranked[:top]]
    rest = sum(n for _, n in ranked[top:])
    out.append(("other", float(rest)))
    return out


class LeakguardCollector:
    """A prometheus_client collector reading leakguard's latest tick."""

    def describe(self) -> Iterator[Any]:
        return iter(self._families(None))

    def collect(self) -> Iterator[Any]:
        try:
            data = _current()
        except Exception:  # a scrape must not fail because of us
            log.debug("leakguard: metrics collection failed", exc_info=True)
            return iter(())
        return iter(self._families(data))

    def _families(self, data: dict[str, Any] | None) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        tcp = GaugeMetricFamily("leakguard_tcp_sockets", "TCP sockets of this process by state", labels=["state"])
        socks = GaugeMetricFamily(
            "leakguard_sockets", "Sockets of this process by tracking (tracked, unknown, inherited)", labels=["tracking"]
        )
        leaks = GaugeMetricFamily(
            "leakguard_leaked_sockets",
            "Leaked sockets (CLOSE_WAIT) by creation site and verdict; sites beyond the top ones are summed in 'other'",
            labels=["site", "verdict"],
        )
        churn = GaugeMetricFamily(
            "leakguard_churn_closes_per_minute",
            "Connections this process closed first, per creation site, extrapolated to 60 s",
            labels=["site"],
        )
        fds = GaugeMetricFamily("leakguard_open_fds", "Open file descriptors of this process")
        limit = GaugeMetricFamily("leakguard_fd_limit", "RLIMIT_NOFILE soft limit (absent when unlimited)")
        ts = GaugeMetricFamily("leakguard_last_update_timestamp_seconds", "Unix time the values were taken")
        if data is not None:
            for state, n in sorted(data["counts"].items()):
                tcp.add_metric([state], n)
            for kind in ("tracked", "unknown", "inherited"):
                socks.add_metric([kind], data[kind])
            top = {site for site, _ in _bounded(data["leaks"], _top[0])}
            split: dict[tuple[str, str], float] = {("other", "none"): 0.0}
            for (site, verdict), n in data["verdicts"].items():
                sv = (site if site in top else "other", verdict)
                split[sv] = split.get(sv, 0.0) + n
            for (site, verdict), n in sorted(split.items()):
                leaks.add_metric([site, verdict], n)
            for site, n in _bounded(data["churn"], _top[0]):
                churn.add_metric([site], n)
            if data["fds_open"] >= 0:
                fds.add_metric([], data["fds_open"])
            if data["fds_limit"] > 0:
                limit.add_metric([], data["fds_limit"])
            ts.add_metric([], data["ts"])
        return [tcp, socks, leaks, churn, fds, limit, ts]


def register(registry: Any = None) -> LeakguardCollector:
    """Add leakguard's collector to *registry* (default ``prometheus_client.REGISTRY``)."""
    import prometheus_client
    import prometheus_client.core  # noqa: F401  # now, not lazily in a scrape (see report._preload)

    registry = prometheus_client.REGISTRY if registry is None else registry
    collector = LeakguardCollector()
    registry.register(collector)
    _registered.append((registry, collector))
    return collector


def unregister(registry: Any = None) -> None:
    """Remove the collectors :func:`register` added to *registry* (default: all of them)."""
    for reg, col in list(_registered):
        if registry is None or reg is registry:
            try:
                reg.unregister(col)
            except KeyError:
                pass
            _registered.remove((reg, col))


def server_address() -> tuple[str, int] | None:
    """(host, port) the metrics server listens on, or None."""
    srv = _server
    if srv is None:
        return None
    addr = srv.server_address
    return str(addr[0]), int(addr[1])


def configure(cfg: Any) -> None:
    """Start, move or stop the HTTP server to match ``cfg.metrics_port`` / ``cfg.metrics_addr``."""
    global _server, _thread, _serving
    _top[0] = cfg.top_sites
    want = (cfg.metrics_addr, cfg.metrics_port) if cfg.metrics_port is not None else None
    if want == _serving and (want is None or _server is not None):
        return
    stop()
    if want is None:
        return
    if want == _parent_endpoint:
        log.debug("leakguard: forked child: the metrics port belongs to the parent; not serving")
        return
    import prometheus_client.core  # noqa: F401  # now, not lazily in a scrape (see report._preload)
    from prometheus_client import CollectorRegistry, make_wsgi_app

    registry = CollectorRegistry(auto_describe=False)
    registry.register(LeakguardCollector())
    addr, port = want
    cls = _Server6 if ":" in addr else _Server
    httpd = make_server(addr, port, make_wsgi_app(registry), cls, handler_class=_Handler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="leakguard-metrics", daemon=True
    )
    thread.start()
    _server, _thread, _serving = httpd, thread, want


def stop() -> None:
    """Stop the HTTP server (prompt: it polls every 50 ms)."""
    global _server, _thread, _serving, _latest
    srv, thread = _server, _thread
    _server, _thread, _serving = None, None, None
    if srv is not None:
        try:
            srv.shutdown()
        finally:
            srv.server_close()
    if thread is not None and thread is not threading.current_thread():
        thread.join(2.0)
    with _lock:
        _latest = None


def after_fork() -> None:
    """In a forked child: the server thread does not exist here; drop the inherited listener."""
    global _server, _thread, _serving, _parent_endpoint, _latest, _lock
    _lock = threading.Lock()
    _parent_endpoint = _serving
    srv = _server
    _server, _thread, _serving, _latest = None, None, None, None
    if srv is not None:
        try:
            srv.socket.close()  # the child's copy only; the parent keeps serving
        except OSError:
            pass
