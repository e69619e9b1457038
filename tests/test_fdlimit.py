"""When the descriptors run out: growth per creation site projected against RLIMIT_NOFILE.

The math is fed recorded samples with explicit timestamps (deterministic
bounds); the reports are checked on real snapshots and on real processes that
leak at a known pace: one under ``leakguard run`` (the watcher's history, by
creation site), one that never imported leakguard (``leakguard inspect``:
two readings from outside, by state and peer).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import leakguard
from leakguard import _config, report
from leakguard.fdlimit import History, Projection, Sample, project
from leakguard.judge import format_age

from .helpers import HangUpServer, wait_for


def steady(n: int, start_fds: int, per_s: float, site: str = "shop.py:66", dt: float = 1.0) -> list[Sample]:
    """*n* samples *dt* apart: descriptors and *site*'s sockets grow by *per_s* a second."""
    return [
        Sample(1_700_000_000.0 + i * dt, start_fds + round(i * dt * per_s), {site: round(i * dt * per_s), "pool.py:9": 5})
        for i in range(n)
    ]


class TestProjection:
    """The rate is the least-squares slope over the samples; the limit is reached at (limit - open) / rate."""

    def test_one_socket_a_second_from_one_site(self) -> None:
        p = project(steady(11, 1990, 1.0), 20_000)
        assert p is not None
        assert p.fds_per_s == pytest.approx(1.0) and p.seconds == pytest.approx(18_000.0)
        assert p.sources == [("shop.py:66", pytest.approx(1.0))]  # the steady pool site is not growing
        assert p.message == "fd limit reached in ~5 h at +1 socket/s from shop.py:66 (2,000/20,000 open)"
        d = p.to_dict()
        assert d["reached_in_s"] == 18_000.0 and d["sources"] == [{"source": "shop.py:66", "sockets_per_s": 1.0}]
        assert d["measured_over_s"] == 10.0 and d["by"] == "site" and d["message"] == p.message

    def test_noisy_growth_stays_within_bounds(self) -> None:
        """Bursts and pauses around 2/s: the slope stays near 2/s (the bound follows from the samples)."""
        jitter = [0, 3, -2, 1, 4, -3, 0, 2, -1, 3, -4, 1, 0, -2, 2, 0]
        samples = [Sample(i * 5.0, 500 + 10 * i + j, {"a.py:1": 10 * i + j}) for i, j in enumerate(jitter)]
        p = project(samples, 4096)
        assert p is not None
        assert 1.9 <= p.fds_per_s <= 2.1, p.fds_per_s
        assert p.sources[0][0] == "a.py:1" and 1.9 <= p.sources[0][1] <= 2.1
        assert (4096 - samples[-1].fds) / 2.1 <= p.seconds <= (4096 - samples[-1].fds) / 1.9

    def test_two_readings(self) -> None:
        """Two readings (`leakguard inspect`): the two-point slope."""
        p = project([Sample(10.0, 100, {"CLOSE_WAIT to 10.0.0.5:5432": 40}),
                     Sample(12.0, 160, {"CLOSE_WAIT to 10.0.0.5:5432": 100})], 1024, by="peer")  # fmt: skip
        assert p is not None and p.fds_per_s == 30.0
        assert p.message == "fd limit reached in ~29 s at +30 sockets/s in CLOSE_WAIT to 10.0.0.5:5432 (160/1,024 open)"

    @pytest.mark.parametrize(
        "samples, limit",
        [
            (steady(10, 100, 0.0), 1024),  # flat
            ([Sample(0.0, 200, {}), Sample(10.0, 150, {})], 1024),  # shrinking
            ([Sample(0.0, 200, {}), Sample(10.0, 202, {})], 1024),  # fewer than MIN_GROWTH: noise
            (steady(10, 100, 1.0), -1),  # unlimited
            (steady(1, 100, 1.0), 1024),  # one sample
            ([Sample(5.0, 100, {}), Sample(5.0, 150, {})], 1024),  # no time between them
        ],
    )
    def test_no_projection(self, samples: list[Sample], limit: int) -> None:
        assert project(samples, limit) is None

    def test_limit_reached_already(self) -> None:
        p = project(steady(5, 1020, 1.0), 1024)
        assert p is not None and p.seconds == 0.0
        assert p.message.startswith("fd limit reached at +1 socket/s from shop.py:66 (1,024/1,024 open)")

    def test_two_growing_sites_and_other_descriptors(self) -> None:
        both = [Sample(float(t), 100 + 3 * t, {"a.py:1": 2 * t, "b.py:2": t}) for t in range(10)]
        p = project(both, 10_000)
        assert p is not None and [s for s, _ in p.sources] == ["a.py:1", "b.py:2"]
        assert "at +2 sockets/s from a.py:1 and +1 socket/s from b.py:2" in p.message
        files = [Sample(float(t), 100 + 5 * t, {"a.py:1": t}) for t in range(10)]  # files grow 4/s besides
        p = project(files, 10_000)
        assert p is not None and "at +5 descriptors/s (+1 socket/s from a.py:1)" in p.message

    def test_slow_rates_read_per_minute_and_hour(self) -> None:
        per_min = project([Sample(0.0, 100, {"a.py:1": 0}), Sample(600.0, 130, {"a.py:1": 30})], 20_000)
        assert per_min is not None and "+3 sockets/min from a.py:1" in per_min.message
        per_h = project([Sample(0.0, 100, {"a.py:1": 0}), Sample(7200.0, 105, {"a.py:1": 5})], 20_000)
        assert per_h is not None and "+2.5 sockets/h from a.py:1" in per_h.message
        assert "~" in per_h.message and per_h.message.startswith("fd limit reached in ~332 d")

    def test_from_a_later_snapshot(self) -> None:
        p = project(steady(11, 1990, 1.0), 20_000)
        assert p is not None
        later = p.at(2_100)
        assert later.seconds == pytest.approx(17_900.0) and later.fds_open == 2_100


class TestHistory:
    """The watcher's samples: bounded in number and in time, the newest always kept."""

    def test_bounded(self) -> None:
        h = History(window_s=60.0, max_samples=12)
        for i in range(2000):
            h.add(Sample(i * 0.1, 100 + i, {"a.py:1": i}), 100_000)
        s = h.samples
        assert len(s) <= 13 and s[-1].t == pytest.approx(199.9)
        assert s[-1].t - s[0].t <= 60.0 + 5.0
        p = h.projection()
        assert p is not None and p.fds_per_s == pytest.approx(10.0)

    def test_approximate_ages(self) -> None:
        assert [format_age(s, approx=True) for s in (47.2, 725, 18_000, 3 * 86_400)] == ["~47 s", "~12 min", "~5 h", "~3 d"]
        assert format_age(725) == "12.1 min"  # the plain form is unchanged


class TestReports:
    """A projection reaches the summary, the leak events of its sites, an fd_limit warning and the text."""

    def test_reporter_and_text(self, hangup_server: HangUpServer) -> None:
        leakguard.install(integrations="none")
        s = socket.create_connection(hangup_server.address)
        try:
            with capture_logs() as logs:
                self.check_reports(logs)
        finally:
            s.close()
            leakguard.uninstall()

    def check_reports(self, logs: list[dict[str, Any]]) -> None:
        snap = wait_for(lambda: (lambda sn: sn if sn.leaks else None)(leakguard.snapshot()), timeout=10)
        site = snap.leaks[0].site_str
        p = Projection(1800.0, 2.0, snap.fds_open, snap.fds_limit, [(site, 2.0)], 60.0)
        r = report.Reporter(_config.Config())
        r.report(snap, outlook=p)
        summary = next(e for e in logs if e["event"] == "leakguard.summary")
        assert summary["fd_outlook"] == p.message and summary["fd_limit_in_s"] == 1800.0
        warn = next(e for e in logs if e["event"] == "leakguard.fd_limit")
        assert warn["reached_in_s"] == 1800.0 and warn["message"].startswith(p.message)
        leak = next(e for e in logs if e["event"] == "leakguard.leak")
        assert leak["site"] == site and leak["fd_outlook"] == p.message
        logs.clear()
        r.report(snap, outlook=p)  # the warning is not repeated every tick
        assert not [e for e in logs if e["event"] == "leakguard.fd_limit"]
        far = p.at(snap.fds_open)
        far.seconds = 7 * 86_400.0
        logs.clear()
        report.Reporter(r.config).report(snap, outlook=far)  # a week away: in the summary, no warning
        assert not [e for e in logs if e["event"] == "leakguard.fd_limit"]
        assert next(e for e in logs if e["event"] == "leakguard.summary")["fd_outlook"] == far.message
        text = report.format_snapshot(snap, outlook=p)
        assert text.splitlines()[1] == p.message
        assert p.message not in str(snap)  # no watcher runs: a single snapshot has no rate


LEAKER = """\
import socket, sys, threading, time

srv = socket.create_server(("127.0.0.1", 0))
HELD = []


def serve():
    while True:
        c, _ = srv.accept()
        c.close()


threading.Thread(target=serve, daemon=True).start()
print("READY", flush=True)
for _ in range(int(sys.argv[1])):
    HELD.append(socket.create_connection(srv.getsockname()))  # LEAK
    time.sleep(0.05)
if len(sys.argv) > 2:
    import leakguard
    print(leakguard.snapshot(), flush=True)
"""


def _leaker(tmp_path: Path) -> Path:
    path = tmp_path / "leaker.py"
    path.write_text(LEAKER)
    return path


_LINE = re.compile(r"fd limit reached in ~[\d,]+ (?:s|min|h|d) at \+([\d.,]+) sockets?/s (from|in) (\S+(?: to \S+)?)")


@pytest.fixture
def plain_leaker(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """The leaker without leakguard, making 200 sockets."""
    proc = subprocess.Popen([sys.executable, str(_leaker(tmp_path)), "200"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "READY\n"
        yield proc
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def _inspect(pid: int, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "leakguard", "inspect", str(pid), *args],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


class TestRealProcesses:
    """Processes that really leak one socket every 50 ms (at most 20 a second)."""

    def test_watcher_under_run_names_the_site(self, tmp_path: Path) -> None:
        path = _leaker(tmp_path)
        line = next(i for i, ln in enumerate(LEAKER.splitlines(), 1) if "# LEAK" in ln)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKGUARD_")}
        r = subprocess.run(
            [sys.executable, "-m", "leakguard", "run", "--report-interval", "0.2", "--", sys.executable, "-W", "error",
             str(path), "60", "print"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        found = [m for m in _LINE.finditer(r.stderr) if m.group(3) == f"leaker.py:{line}"]
        assert found, r.stderr[-3000:]
        assert all(m.group(2) == "from" and float(m.group(1).replace(",", "")) > 0 for m in found)
        text = r.stdout.splitlines()[1:]  # after READY: str(snapshot()) while the watcher runs
        assert text[1].startswith("fd limit reached in ~") and f"from leaker.py:{line}" in text[1], r.stdout

    def test_inspect_two_readings(self, plain_leaker: subprocess.Popen[str]) -> None:
        out = _inspect(plain_leaker.pid, "--sample", "2")
        m = _LINE.search(out)
        assert m is not None, out
        assert m.group(2) == "in" and m.group(3).startswith("CLOSE_WAIT to 127.0.0.1:")
        # the leaker makes 200 sockets in all and the readings are >= 2 s apart: at most 100 a second
        # (about 20 a second, as it sleeps 50 ms between two; how close depends on the load)
        assert 0 < float(m.group(1)) <= 100

    def test_inspect_single_reading_has_none(self, plain_leaker: subprocess.Popen[str]) -> None:
        assert "fd_projection" not in _inspect(plain_leaker.pid, "--sample", "0", "--json")

    @pytest.mark.parametrize("value", ["soon", "-1", "3601"])
    def test_bad_sample_is_refused(self, value: str) -> None:
        for command in ("inspect", "attach"):
            r = subprocess.run([sys.executable, "-m", "leakguard", command, str(os.getpid()), "--sample", value],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
            assert r.returncode == 2 and r.stdout == "", r.stderr
            assert f"argument --sample: --sample takes seconds from 0 to 3600, not '{value}'" in r.stderr
