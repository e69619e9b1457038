"""Prometheus metrics: the endpoint scraped over loopback and parsed; bounded site labels; register()."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import leakguard  # noqa: E402
from leakguard import metrics, watcher  # noqa: E402

from .helpers import HangUpServer, site_module, this_line, wait_for  # noqa: E402

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape() -> Samples:
    addr = metrics.server_address()
    assert addr is not None
    with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return parse(resp.read().decode())


def site_of(line: int) -> str:
    return f"tests/test_metrics.py:{line}"


def leaked_at(samples: Samples, site: str) -> float | None:
    """The leaks of *site* summed over verdicts (``sum by (site)``); None when it has no series."""
    found = [v for (name, labels), v in samples.items() if name == "leakguard_leaked_sockets" and dict(labels)["site"] == site]
    return sum(found) if found else None


@pytest.fixture
def uninstall_after() -> Iterator[None]:
    try:
        yield
    finally:
        leakguard.uninstall()


@pytest.mark.usefixtures("uninstall_after")
class TestEndpoint:
    """install(metrics_port=0) serves /metrics on 127.0.0.1, updated at each watcher tick."""

    def test_scrape_over_loopback(self, hangup_server: HangUpServer) -> None:
        leakguard.install(report_interval=0.05, metrics_port=0, integrations="none", log_format="json")
        host, _port = metrics.server_address()  # type: ignore[misc]
        assert host == "127.0.0.1"
        kept = [socket.create_connection(hangup_server.address) for _ in range(3)]; line = this_line()  # noqa: E702
        try:
            key = ("leakguard_leaked_sockets", (("site", site_of(line)), ("verdict", "in_use")))  # a local holds them
            samples = wait_for(lambda: (lambda s: s if s.get(key) == 3 else None)(scrape()), timeout=30)
            assert samples, scrape()
            assert {dict(k[1])["verdict"] for k in samples if k[0] == "leakguard_leaked_sockets"} <= {
                "forgotten", "in_use", "idle_in_pool", "unreachable", "none"}
            assert samples[("leakguard_tcp_sockets", (("state", "CLOSE_WAIT"),))] >= 3
            assert samples[("leakguard_tcp_sockets", (("state", "LISTEN"),))] >= 1
            assert samples[("leakguard_sockets", (("tracking", "tracked"),))] >= 3
            assert samples[("leakguard_open_fds", ())] > 3
            assert samples[("leakguard_fd_limit", ())] != 0
            assert samples[("leakguard_leaked_sockets", (("site", "other"), ("verdict", "none")))] == 0
            assert samples[("leakguard_last_update_timestamp_seconds", ())] > 0
        finally:
            for s in kept:
                s.close()
        # and the gauge follows: closed sockets are no longer leaks
        assert wait_for(lambda: leaked_at(scrape(), site_of(line)) is None, 30)

    def test_verdict_label(self, hangup_server: HangUpServer) -> None:
        """One site's leaks split by verdict: one kept by a module global (forgotten), one by a live local."""
        import sys
        import types

        mod = types.ModuleType("lg_metrics_app")
        sys.modules[mod.__name__] = mod
        leakguard.install(report_interval=0.05, metrics_port=0, integrations="none", log_format="json")

        def connect() -> socket.socket:
            return socket.create_connection(hangup_server.address)

        line = this_line() - 2
        mod.KEPT = [connect()]  # type: ignore[attr-defined]
        mine = connect()
        try:
            def split() -> dict[str, float] | None:
                s = {dict(k[1])["verdict"]: v for k, v in scrape().items()
                     if k[0] == "leakguard_leaked_sockets" and dict(k[1])["site"] == site_of(line)}  # fmt: skip
                return s if s == {"forgotten": 1, "in_use": 1} else None

            assert wait_for(split, timeout=30), scrape()
        finally:
            mine.close()
            mod.KEPT[0].close()  # type: ignore[attr-defined]
            del sys.modules[mod.__name__]

    def test_bounded_site_labels(self, hangup_server: HangUpServer, tmp_path: Path) -> None:
        src = "import socket\n\n" + "".join(
            f"def site{i}(addr):\n    return socket.create_connection(addr)\n\n" for i in range(8)
        )
        mod = site_module(tmp_path, "sites", src)
        leakguard.install(report_interval=0.05, metrics_port=0, integrations="none", top_sites=3, log_format="json")
        kept: list[socket.socket] = []
        try:
            for i in range(8):
                for _ in range(i + 1):  # site i leaks i + 1 sockets
                    kept.append(getattr(mod, f"site{i}")(hangup_server.address))
            total = len(kept)

            def leaked() -> Samples | None:
                s = {k: v for k, v in scrape().items() if k[0] == "leakguard_leaked_sockets"}
                return s if sum(s.values()) == total else None

            samples = wait_for(leaked, timeout=30)
            assert samples, scrape()
            by_site: dict[str, float] = {}
            for k, v in samples.items():
                by_site[dict(k[1])["site"]] = by_site.get(dict(k[1])["site"], 0) + v
            assert len(by_site) == 4  # top 3 + other
            assert sorted(v for site, v in by_site.items() if site != "other") == [6, 7, 8]
            assert by_site["other"] == 1 + 2 + 3 + 4 + 5
            assert all("sites.py:" in site for site in by_site if site != "other")
        finally:
            for s in kept:
                s.close()

    def test_uninstall_stops_the_server(self) -> None:
        leakguard.install(metrics_port=0, integrations="none")
        host, port = metrics.server_address()  # type: ignore[misc]
        assert scrape()[("leakguard_sockets", (("tracking", "tracked"),))] >= 1  # the scrape's own socket at least
        leakguard.uninstall()
        assert metrics.server_address() is None
        assert not [t for t in threading.enumerate() if t.name == "leakguard-metrics" and t.is_alive()]
        with pytest.raises(OSError):
            socket.create_connection((host, port), timeout=5).close()

    def test_bad_port_is_a_value_error(self) -> None:
        with pytest.raises(ValueError, match="metrics_port must be an integer from 0 to 65535"):
            leakguard.install(metrics_port="http")


class TestRegister:
    """register(registry) adds leakguard's collector to a registry the host already exposes."""

    def test_register_without_watcher(self, hangup_server: HangUpServer) -> None:
        registry = prometheus_client.CollectorRegistry()
        metrics.register(registry)
        leakguard.install(integrations="none")
        s = socket.create_connection(hangup_server.address); line = this_line()  # noqa: E702
        try:
            assert watcher.current() is None  # no ticks: a scrape takes its own snapshot

            def leaked() -> float | None:
                text = prometheus_client.generate_latest(registry).decode()
                return leaked_at(parse(text), site_of(line))

            assert wait_for(leaked, timeout=30) == 1
        finally:
            s.close()
            leakguard.uninstall()
            metrics.unregister(registry)
        assert "leakguard_" not in prometheus_client.generate_latest(registry).decode()
