"""What users consume, side by side: a snapshot rendered, not only taken.

Nobody reads a snapshot without rendering it.  For 10 / 100 / 1,000 / 10,000 own
sockets, half of them leaked (CLOSE_WAIT: a real loopback peer hangs up), created
from one site and from 500 sites, each row times in the same rounds:

- ``snapshot()`` (lazy: nothing rendered),
- ``snapshot().to_dict()``,
- ``str(snapshot())``,
- the periodic report: ``snapshot()`` turned into structlog events and rendered to
  JSON lines (a first report, or the dump signal: every group is new),
- a pytest failure's text for the snapshot's leaks,

against ``psutil.Process().net_connections("tcp")``, interleaved round by round (best
of rounds).  With valgrind installed the 1,000-socket rows get instruction counts too
(callgrind: what no load on the machine moves).

    python benchmarks/bench_render.py [--quick]
"""

from __future__ import annotations

import gc
import json
import os
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):  # python benchmarks/bench_render.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import leakguard

Row = dict[str, Any]

#: What each row renders (name in the table, callable of no arguments built by _ops()).
OPS = ("snapshot", "to_dict", "str", "report", "pytest")
LABELS = {
    "snapshot": "snapshot() (lazy)",
    "to_dict": "snapshot().to_dict()",
    "str": "str(snapshot())",
    "report": "periodic report (structlog events, JSON)",
    "pytest": "pytest failure text",
}


def _site_functions(n: int, directory: str) -> list[Callable[[Any], socket.socket]]:
    """*n* creation sites: functions on distinct lines of one application file (not a library path)."""
    path = os.path.join(directory, "render_sites.py")
    src = "import socket\n" + "".join(f"def open_{i}(addr):\n    return socket.create_connection(addr)\n" for i in range(n))
    with open(path, "w") as f:
        f.write(src)
    ns: dict[str, Any] = {}
    exec(compile(src, path, "exec"), ns)
    return [ns[f"open_{i}"] for i in range(n)]


class Sockets:
    """*n* own sockets: half the client ends in CLOSE_WAIT (the accepted end closed), the rest
    ESTABLISHED pairs; the client ends are created round-robin from *sites* functions."""

    def __init__(self, n: int, sites: int, directory: str) -> None:
        funcs = _site_functions(sites, directory)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        addr = self.listener.getsockname()
        self.held: list[socket.socket] = []
        half = n // 2
        for i in range(half):
            c = funcs[i % sites](addr)
            a, _ = self.listener.accept()
            a.close()
            self.held.append(c)
        for i in range((n - half) // 2):
            c = funcs[(half + i) % sites](addr)
            a, _ = self.listener.accept()
            self.held += [c, a]
        self.leaks = half

    def settled(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(leakguard.snapshot().leaks) >= self.leaks:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        for s in self.held:
            s.close()
        self.listener.close()


class _Discard:
    """A structlog logger's sink: the event is rendered, then dropped."""

    def msg(self, message: str) -> None:
        pass

    log = debug = info = warning = warn = error = critical = exception = fatal = failure = err = msg


def _ops(with_pytest: bool = True) -> dict[str, Callable[[], Any]]:
    import structlog

    from leakguard import _config, report

    logger = structlog.wrap_logger(
        _Discard(),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        context_class=dict,
        cache_logger_on_first_use=True,
    )
    cfg = _config.Config()

    def periodic() -> int:
        return report.Reporter(cfg, logger=logger).report(leakguard.snapshot())

    ops: dict[str, Callable[[], Any]] = {
        "snapshot": leakguard.snapshot,
        "to_dict": lambda: leakguard.snapshot().to_dict(),
        "str": lambda: str(leakguard.snapshot()),
        "report": periodic,
    }
    if with_pytest:  # importing pytest costs more than everything else here: not under callgrind
        from leakguard.pytest_plugin import _terminal

        ops["pytest"] = lambda: _terminal.leak_text("leakguard: this test left", leakguard.snapshot().leaks)
    return ops


def _psutil() -> Callable[[], Any]:
    import psutil

    proc = psutil.Process()
    conns = getattr(proc, "net_connections", None) or proc.connections
    return lambda: conns("tcp")


def _raise_nofile(n: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def bench_timed(quick: bool) -> list[Row]:
    sizes = [10, 100, 1_000] if quick else [10, 100, 1_000, 10_000]
    soft, hard = _raise_nofile(0)
    rows: list[Row] = []
    leakguard.install(integrations="none")
    ops = _ops()
    psutil_tcp = _psutil()
    try:
        with tempfile.TemporaryDirectory(prefix="leakguard-bench-render-") as d:
            for n in sizes:
                if n + 100 > hard:
                    continue
                for sites in (1, 500):
                    socks = Sockets(n, min(sites, n), d)
                    try:
                        if not socks.settled():
                            rows.append({"name": f"rendering {n} own sockets", "error": "CLOSE_WAIT not seen"})
                            continue
                        rounds = 3 if n >= 10_000 else (5 if quick else 9)
                        for fn in ops.values():
                            fn()  # warm: imports, first-use caches
                        best = {name: float("inf") for name in [*ops, "psutil"]}
                        for _ in range(rounds):  # interleaved: every op once per round
                            for name, fn in [*ops.items(), ("psutil", psutil_tcp)]:
                                gc.collect()
                                t = time.perf_counter()
                                fn()
                                best[name] = min(best[name], time.perf_counter() - t)
                        ps = best["psutil"]
                        for name in ops:
                            rows.append(
                                {
                                    "name": f"{LABELS[name]}, {n:,} own sockets ({n // 2:,} CLOSE_WAIT), "
                                    f"{_plural_sites(min(sites, n))}",
                                    "baseline_us": round(ps * 1e6, 1),
                                    "leakguard_us": round(best[name] * 1e6, 1),
                                    "added_us": round((best[name] - ps) * 1e6, 1),
                                    "ratio": round(best[name] / ps, 4),
                                    "baseline": "psutil net_connections('tcp')",
                                    "render": name,
                                    "own_sockets": n,
                                    "sites": min(sites, n),
                                }
                            )
                    finally:
                        socks.close()
    finally:
        leakguard.uninstall()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return rows


def _plural_sites(n: int) -> str:
    return "one site" if n == 1 else f"{n:,} sites"


# --- instruction counts -------------------------------------------------------------------------------


def _loop_main(n: int, sites: int, op: str, times: int) -> None:
    """Under callgrind: *n* sockets from *sites* sites, every op once (warm), then *op* *times* more."""
    _raise_nofile(0)
    leakguard.install(integrations="none")
    ops = {**_ops(with_pytest=False), "psutil": _psutil()}
    with tempfile.TemporaryDirectory(prefix="leakguard-bench-render-") as d:
        socks = Sockets(n, sites, d)
        time.sleep(0.2)  # loopback FINs land at once; no polling loop whose length varies
        if len(leakguard.snapshot().leaks) < socks.leaks:
            raise SystemExit("CLOSE_WAIT not seen")
        for fn in ops.values():
            fn()
        fn = ops[op]
        for _ in range(times):
            fn()
        socks.close()
    leakguard.uninstall()


def bench_instructions(quick: bool) -> list[Row]:
    from benchmarks import _callgrind

    if not _callgrind.available():
        return [{"name": "rendering (instructions)", "error": "valgrind is not installed"}]
    n, extra = 1_000, 2
    rows: list[Row] = []
    measured = [op for op in OPS if op != "pytest"]
    names = [*measured, "psutil"]
    for sites in (1,) if quick else (1, 500):
        argv = [sys.executable, os.path.abspath(__file__), "--loop", str(n), str(sites)]
        got = _callgrind.counts(
            [argv + ["snapshot", "0"]] + [argv + [name, str(extra)] for name in names],
            cwd=tempfile.gettempdir(),  # not the repository root: the installed package, not ./leakguard
        )
        base = got[0]
        per = {name: (count - base) / extra for name, count in zip(names, got[1:])}
        for name in measured:
            rows.append(
                {
                    "name": f"{LABELS[name]}, {n:,} own sockets ({n // 2:,} CLOSE_WAIT), {_plural_sites(sites)} "
                    "(instructions)",
                    "baseline_instructions": round(per["psutil"]),
                    "leakguard_instructions": round(per[name]),
                    "ratio": round(per[name] / per["psutil"], 4),
                    "baseline": "psutil net_connections('tcp')",
                    "render": name,
                    "own_sockets": n,
                    "sites": sites,
                }
            )
    return rows


def run(quick: bool = False) -> list[Row]:
    return bench_timed(quick) + bench_instructions(quick)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--loop"]:
        _loop_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        for r in run("--quick" in sys.argv):
            print(json.dumps(r))
