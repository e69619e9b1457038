"""Watcher cost: CPU share of one core at report_interval=1 with 1,000 tracked sockets.

Setup: 625 loopback connections opened after install(), both ends in this
process; the server side of 250 of them is closed (1,000 tracked TCP sockets),
so 250 client sockets sit in CLOSE_WAIT, leaked from 5 creation sites (the
reports have something to say).  Reports are rendered as JSON and written to
/dev/null.

Measure: process CPU time (all threads) over a wall-clock window while the main
thread sleeps, with the watcher running (report_interval=1) and without it
(installed, no watcher), interleaved round by round; the difference over the
window is the watcher's share of one core.  Budget: at most 1%.
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import sys
import time
from typing import Any

import leakguard
from leakguard import watcher
from leakguard.snapshot import take

Row = dict[str, Any]


def _raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard) if hard != resource.RLIM_INFINITY else n, hard))


def _site0(addr: Any) -> socket.socket:
    return socket.create_connection(addr)


def _site1(addr: Any) -> socket.socket:
    return socket.create_connection(addr)


def _site2(addr: Any) -> socket.socket:
    return socket.create_connection(addr)


def _site3(addr: Any) -> socket.socket:
    return socket.create_connection(addr)


def _site4(addr: Any) -> socket.socket:
    return socket.create_connection(addr)


_SITES = (_site0, _site1, _site2, _site3, _site4)


class _Sockets:
    """625 loopback connections, both ends here; 250 server ends closed: 1,000 tracked, 250 in CLOSE_WAIT."""

    def __init__(self, pairs: int = 625, hang_up: int = 250) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=pairs)
        addr = self.listener.getsockname()
        self.clients: list[socket.socket] = []
        self.servers: list[socket.socket] = []
        for i in range(pairs):
            self.clients.append(_SITES[i % len(_SITES)](addr))
            self.servers.append(self.listener.accept()[0])
        for s in self.servers[:hang_up]:
            s.close()  # the peer hangs up: the client end goes to CLOSE_WAIT
        self.servers = self.servers[hang_up:]

    def close(self) -> None:
        for s in self.clients + self.servers:
            s.close()
        self.listener.close()


def _cpu_share(window: float) -> float:
    """Process CPU seconds per wall second over *window* while this thread sleeps."""
    c0, t0 = time.process_time(), time.monotonic()
    time.sleep(window)
    return (time.process_time() - c0) / (time.monotonic() - t0)


def bench_cpu_share(quick: bool) -> list[Row]:
    _raise_nofile(4096)
    window, rounds = (4.0, 2) if quick else (6.0, 3)
    devnull = open(os.devnull, "w")
    saved = sys.stderr
    leakguard.install(integrations="none", log_format="json")
    socks = _Sockets()
    try:
        tracked = sum(1 for s in leakguard.snapshot().sockets if s.record is not None)
        without: list[float] = []
        with_w: list[float] = []
        ticks: list[int] = []
        sys.stderr = devnull
        try:
            for _ in range(rounds):
                leakguard.install(integrations="none", log_format="json")  # no watcher
                without.append(_cpu_share(window))
                leakguard.install(integrations="none", log_format="json", report_interval=1)
                w = watcher.current()
                assert w is not None
                while w.ticks < 1:  # steady state: the first report (all groups new) is a one-off
                    time.sleep(0.01)
                start = w.ticks
                with_w.append(_cpu_share(window))
                ticks.append(w.ticks - start)
            # One tick by itself, on this thread: what each report costs.
            w = watcher.current()
            assert w is not None
            per_tick, per_snap = [], []
            for _ in range(5 if quick else 20):
                c = time.thread_time()
                w.tick()
                per_tick.append(time.thread_time() - c)
                c = time.thread_time()
                take()
                per_snap.append(time.thread_time() - c)
        finally:
            sys.stderr = saved
    finally:
        leakguard.uninstall()
        socks.close()
        devnull.close()
    base, inst = statistics.median(without), statistics.median(with_w)
    share = max(0.0, inst - base) * 100
    return [
        {
            "name": f"process CPU while idle, {tracked} tracked sockets (250 in CLOSE_WAIT): no watcher vs report_interval=1",
            "baseline_us": round(base * 1e6, 1),
            "leakguard_us": round(inst * 1e6, 1),
            "ratio": round(inst / base, 3) if base > 0 else None,
            "unit_note": "CPU microseconds per wall second",
        },
        {"name": f"watcher CPU share at report_interval=1, {tracked} tracked sockets", "value": round(share, 3),
         "unit": "% of one core (budget 1%)"},
        {"name": f"one watcher tick (snapshot, churn, report), {tracked} tracked sockets",
         "value": round(statistics.median(per_tick) * 1e3, 2), "unit": "ms CPU"},
        {"name": f"leakguard.snapshot() by itself (exact: every socket asked, no cache), {tracked} tracked sockets",
         "value": round(statistics.median(per_snap) * 1e3, 2), "unit": "ms CPU"},
        {"name": "watcher ticks per measured window", "value": statistics.median(ticks), "unit": f"ticks / {window:g} s"},
    ]


def run(quick: bool = False) -> list[Row]:
    return bench_cpu_share(quick)


if __name__ == "__main__":
    import json

    for r in run("--quick" in sys.argv):
        print(json.dumps(r))
