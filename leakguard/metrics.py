"""Prometheus metrics (optional extra ``leakguard[prometheus]``): sockets by state, leaks by site, fd headroom.

Two ways to export:

* ``install(metrics_port=9464)`` (or ``LEAKGUARD_METRICS_PORT``) serves
  ``/metrics`` over HTTP on ``metrics_addr`` (default ``127.0.0.1``; port 0
  picks a free port, see :func:`server_address`), from a registry of its own.
* :func:`register` adds leakguard's collector to a registry the host already
  exposes (``prometheus_client.REGISTRY`` by default).

Values are those of the last watcher tick (``report_interval``); without a
watcher a scrape takes a snapshot itself (at most one per second).  The
watcher feeds this module (:func:`update`, :func:`follow`); it never asks the
watcher back.

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

The server's threads are leakguard's own (:mod:`leakguard._threads`): the one
accepting scrapes ends before a fork while it waits (nearly always) and starts
again after it in the parent; each scrape is answered in a thread of its own.
"""

from __future__ import annotations

import logging
import os
import select as _select
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from . import _threads, judge
from .diagnose import VERDICTS
from .snapshot import take

if TYPE_CHECKING:
    from .churn import ChurnTracker
    from .snapshot import Snapshot

__all__ = [
    "LeakguardCollector",
    "configure",
    "follow",
    "register",
    "server_address",
    "stop",
    "unregister",
    "update",
]

log = logging.getLogger("leakguard")

_lock = _threads.api()[2]()
_latest: dict[str, Any] | None = None
_top = [10]
_registered: list[tuple[Any, LeakguardCollector]] = []
_server: Any = None
_serving_thread: _Serving | None = None
_serving: tuple[str, int] | None = None  # (addr, port) as configured
_parent_endpoint: tuple[str, int] | None = None  # what the parent served when we were forked
#: What the watcher says (see :func:`follow`): does a tick refresh the values, and its churn tracker.
_ticking = False
_churn: ChurnTracker | None = None


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
        pass


def _real_socket() -> Any:
    """``socket.socket`` as it was before gevent's patching: our threads are not greenlets, and a
    gevent socket waits on the hub of the thread that made it."""
    return _threads.original("socket", "socket", socket.socket)


class _Server(WSGIServer):
    """Answers each scrape in a thread of leakguard's own (what ``ThreadingMixIn`` did with ``threading``),
    on sockets of the standard library's own class."""

    allow_reuse_address = True

    def __init__(self, address: Any, handler: Any, bind_and_activate: bool = True) -> None:
        super().__init__(address, handler, bind_and_activate=False)
        real = _real_socket()
        if type(self.socket) is not real:  # install() after gevent's patch_all()
            self.socket.close()
            self.socket = real(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    def get_request(self) -> tuple[Any, Any]:
        fd, addr = self.socket._accept()  # type: ignore[attr-defined]  # _socket.socket._accept: the raw fd
        lst = self.socket
        return _real_socket()(lst.family, lst.type, lst.proto, fileno=fd), addr

    def process_request(self, request: Any, client_address: Any) -> None:
        def answer() -> None:
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

        try:
            _threads.OSThread(answer)
        except Exception:  # no thread to be had: this scrape is dropped, the server goes on
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:  # not a traceback on the host's stderr
        log.debug("leakguard: a metrics scrape failed", exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Serving(_threads.Restartable):
    """The thread accepting scrapes: waits in select() on the listener and a wake-up pipe.

    Before a fork (:meth:`park`) it is woken and ends, and the fork waits for
    that (no I/O: it was waiting); :meth:`resume` starts it again.
    """

    _what = "metrics server thread"

    def __init__(self, httpd: Any) -> None:
        super().__init__()
        self.httpd = httpd
        self._wake_r, self._wake_w = os.pipe()
        self._pipe_ids = [_identity(self._wake_r), _identity(self._wake_w)]
        with self._mu:
            self._spawn()

    def _run(self) -> None:
        wait = _threads.original("select", "select", _select.select)
        httpd, wake = self.httpd, self._wake_r
        try:
            while True:
                with self._mu:
                    if self._stopping or self._parked:
                        self._running = False
                        return
                ready = wait([httpd, wake], [], [])[0]
                if wake in ready:
                    os.read(wake, 512)
                elif ready:
                    httpd._handle_request_noblock()
        except BaseException:  # nothing of ours may surface in the host
            with self._mu:
                self._running = False
            log.debug("leakguard: the metrics server thread ended", exc_info=True)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # the pipe is full: a wake-up is pending already
            pass

    def park(self) -> None:
        with self._mu:
            self._parked += 1
            t = self._thread if self._running else None
        if t is not None and not t.is_current():
            self._wake()
            t.end_wait()

    def stop(self) -> None:
        with self._mu:
            self._stopping = True
            t = self._thread
        self._wake()
        if t is not None and not t.is_current():
            t.join(2.0)
        self.close_pipe()

    def close_pipe(self) -> None:
        """Close the wake-up pipe: only descriptors still ours (the host may have closed and reused them)."""
        for fd, ident in ((self._wake_r, self._pipe_ids[0]), (self._wake_w, self._pipe_ids[1])):
            if ident is not None and _identity(fd) == ident:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._pipe_ids = [None, None]


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _verdict(info: Any) -> str:
    v = info.verdict  # the snapshot's one diagnosis (the watcher's: only new or changed groups are walked)
    return v if v in VERDICTS else "none"


def _summarise(snap: Snapshot, inherited: frozenset[int] | set[int], churn: ChurnTracker | None) -> dict[str, Any]:
    by_site: dict[str, int] = {}
    by_verdict: dict[tuple[str, str], int] = {}
    for info in judge.own_leaks(snap.leaks, inherited):
        site = info.site_str if info.stack else "<unknown>"
        by_site[site] = by_site.get(site, 0) + 1
        sv = (site, _verdict(info))
        by_verdict[sv] = by_verdict.get(sv, 0) + 1
    tally = judge.tally(snap, inherited)
    return {
        "counts": dict(snap.counts),
        "tracked": tally.tracked,
        "inherited": tally.inherited,
        "unknown": tally.unknown,
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


def follow(ticking: bool, churn: ChurnTracker | None = None) -> None:
    """The watcher's part (it calls this when configured): do its ticks refresh the values (:func:`update`),
    and its churn tracker.  Without ticks a scrape takes a snapshot itself, at most one per second."""
    global _ticking, _churn
    _ticking, _churn = ticking, churn


def update(snap: Snapshot, inherited: frozenset[int] | set[int] = frozenset(), churn: ChurnTracker | None = None) -> None:
    """Called by the watcher at each tick; a no-op unless metrics are exported."""
    global _latest, _ticking, _churn
    _ticking, _churn = True, churn  # a collector registered after install() learns it here
    if not _active():
        return
    data = _summarise(snap, inherited, churn)
    with _lock:
        _latest = data


def _current() -> dict[str, Any]:
    global _latest
    with _lock:
        data = _latest
    fresh = data is not None and (_ticking or time.monotonic() - data["mono"] < 1.0)
    if data is None or not fresh:
        snap = take()
        data = _summarise(snap, judge.inherited_fds(snap), _churn)
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
    global _server, _serving_thread, _serving
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
    try:
        serving = _Serving(httpd)
    except BaseException:
        httpd.server_close()
        raise
    _server, _serving_thread, _serving = httpd, serving, want


def stop() -> None:
    """Stop the HTTP server (at once: its thread is woken)."""
    global _server, _serving_thread, _serving, _latest
    srv, serving = _server, _serving_thread
    _server, _serving_thread, _serving = None, None, None
    try:
        if serving is not None:
            serving.stop()
    finally:
        if srv is not None:
            srv.server_close()
    with _lock:
        _latest = None


# -- fork (called by the at-fork handler in leakguard._state) --------------------------------------


def before_fork() -> None:
    """End the idle server thread, so that the process forks without it."""
    serving = _serving_thread
    if serving is not None:
        serving.park()


def after_fork_in_parent() -> None:
    serving = _serving_thread
    if serving is not None:
        serving.resume()


def after_fork_in_child() -> None:
    """The server's threads do not exist here; drop the inherited listener and wake-up pipe."""
    global _server, _serving_thread, _serving, _parent_endpoint, _latest, _lock
    _lock = _threads.api()[2]()
    _parent_endpoint = _serving
    srv, serving = _server, _serving_thread
    _server, _serving_thread, _serving, _latest = None, None, None, None
    if serving is not None:
        serving.close_pipe()
    if srv is not None:
        try:
            srv.socket.close()  # the child's copy only; the parent keeps serving
        except OSError:
            pass
