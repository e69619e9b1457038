"""Bounds: registry, caches, log volume and metric labels stay bounded under churn and many creation sites.

Sizes: 200,000 short-lived sockets by default, 1,000,000 with
``LEAKGUARD_STRESS=1``; 10,000 distinct creation sites (each a separately
compiled file) always.
"""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

import leakguard
from leakguard import registry, stacks, watcher

from .helpers import HangUpServer, raised_nofile, wait_for

STRESS = os.environ.get("LEAKGUARD_STRESS") == "1"
SHORT_LIVED = 1_000_000 if STRESS else 200_000
SITES = 10_000
TOP_SITES = 10
MAX_EVENTS_PER_REPORT = 20
_LINGER0 = struct.pack("ii", 1, 0)

prometheus_client = pytest.importorskip("prometheus_client")


def _metrics_text() -> str:
    from leakguard import metrics

    reg = prometheus_client.CollectorRegistry()
    metrics.register(reg)
    try:
        return str(prometheus_client.generate_latest(reg).decode())
    finally:
        metrics.unregister(reg)


def _site_labels(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in re.finditer(r'^(\w+)\{[^}]*site="([^"]*)"', text, re.M):
        out.setdefault(m.group(1), set()).add(m.group(2))
    return out


def _events(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


@pytest.fixture
def bounded_watcher() -> Iterator[watcher.Watcher]:
    leakguard.install(
        integrations="none",
        report_interval=0.05,
        log_format="json",
        top_sites=TOP_SITES,
        max_events_per_report=MAX_EVENTS_PER_REPORT,
        max_events_per_minute=100_000,  # only the per-report bound limits volume here
    )
    try:
        w = watcher.current()
        assert w is not None
        yield w
    finally:
        leakguard.uninstall()


@pytest.mark.slow
class TestShortLivedSockets:
    """Hundreds of thousands of short-lived sockets leave the registry, caches and heap where they were."""

    def test_churn(
        self, bounded_watcher: watcher.Watcher, hangup_server: HangUpServer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        w = bounded_watcher
        samples: list[tuple[int, int, int]] = []  # (records, live views, gc objects)
        step = SHORT_LIVED // 10
        ticks0 = w.ticks
        for i in range(SHORT_LIVED):
            if i % 20 == 0:  # one in twenty is a real connection (churn accounting sees it)
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                s.connect(hangup_server.address)
                s.close()
            else:
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
            if i % step == step - 1:
                gc.collect()
                samples.append((registry.stats()["records"], len(registry.all_records()), len(gc.get_objects())))
        assert wait_for(lambda: w.ticks >= ticks0 + 3)
        records = [r for r, _, _ in samples]
        assert max(records) <= 64, samples  # bounded by descriptors open at once, not by sockets made
        assert max(v for _, v, _ in samples) <= 64, samples
        growth = samples[-1][2] - samples[1][2]
        assert growth < 5_000, samples  # the heap does not grow with the number of sockets made
        assert max(len(stacks._codes), len(stacks._stacks), len(stacks._rel)) <= stacks._CACHE_MAX
        assert len(w.reporter._groups) <= TOP_SITES * 4
        labels = _site_labels(_metrics_text())
        assert all(len(v) <= TOP_SITES + 1 for v in labels.values()), labels
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) <= (w.ticks - ticks0 + 2) * (MAX_EVENTS_PER_REPORT + 1), len(lines)
        assert max(len(line) for line in lines) < 20_000


def _make_sites(n: int, tmp_dir: str) -> list[Any]:
    """*n* functions, each in its own (virtual) file: *n* distinct creation sites."""
    funcs = []
    for i in range(n):
        filename = os.path.join(tmp_dir, f"site_{i:05d}.py")
        code = compile(f"def open_{i}(addr, socket):\n    return socket.create_connection(addr)\n", filename, "exec")
        ns: dict[str, Any] = {}
        exec(code, ns)
        funcs.append(ns[f"open_{i}"])
    return funcs


@pytest.fixture
def nofile() -> Iterator[None]:
    with raised_nofile(SITES + 1000):
        yield


@pytest.mark.slow
class TestDistinctSites:
    """10,000 leaks from 10,000 distinct sites: every one is in snapshot(); reports and metrics stay bounded."""

    def test_ten_thousand_sites(
        self, nofile: None, bounded_watcher: watcher.Watcher, hangup_server: HangUpServer,
        capsys: pytest.CaptureFixture[str], tmp_path: Any,
    ) -> None:
        w = bounded_watcher
        funcs = _make_sites(SITES, str(tmp_path))
        opened: list[socket.socket] = []
        try:
            for f in funcs:
                opened.append(f(hangup_server.address, socket))
            fds = {s.fileno() for s in opened}

            def leaked() -> list[leakguard.SocketInfo]:
                return [s for s in leakguard.snapshot().leaks if s.fd in fds]

            found = wait_for(lambda: len(leaked()) == SITES and leaked(), timeout=60)
            assert found, len(leaked())
            assert len({s.site_str for s in found}) == SITES
            assert registry.stats()["records"] <= SITES + 50
            ticks = w.ticks
            assert wait_for(lambda: w.ticks >= ticks + 3, timeout=60)
            labels = _site_labels(_metrics_text())
            assert labels and all(len(v) <= TOP_SITES + 1 for v in labels.values()), {
                k: len(v) for k, v in labels.items()
            }
            assert max(len(stacks._codes), len(stacks._stacks), len(stacks._rel)) <= stacks._CACHE_MAX
            assert len(stacks._app_files) <= 10_001
        finally:
            for s in opened:
                s.close()
        ticks = w.ticks
        assert wait_for(lambda: w.ticks >= ticks + 3, timeout=60)
        events = _events(capsys.readouterr().err)
        summaries = [e for e in events if e["event"] == "leakguard.summary"]
        assert any(e.get("leak_sites") == SITES and e.get("suppressed", 0) > 0 for e in summaries), summaries[-3:]
        others = len(events) - len(summaries)
        assert others <= len(summaries) * MAX_EVENTS_PER_REPORT, (others, len(summaries))
        leak_events = [e for e in events if e["event"] == "leakguard.leak"]
        assert len(leak_events) <= len(summaries) * TOP_SITES  # at most top_sites leak groups per report
        assert len(w.reporter._groups) <= SITES
        assert wait_for(lambda: len(w.reporter._groups) == 0, timeout=30)  # resolved groups are forgotten
