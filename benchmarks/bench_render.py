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
- the same four renderings of one snapshot whose leaks are diagnosed already: what
  rendering alone costs, the diagnosis walk (:mod:`leakguard.diagnose`) left out,

against ``psutil.Process().net_connections("tcp")``, interleaved round by round (best
of rounds).  With valgrind installed the 1,000-socket rows get instruction counts too
(callgrind: what no load on the machine moves), each call counted alone, after a first
call (warm); and "cold" rows: ``to_dict()`` and ``str()`` of the first snapshot in a
process, first-use caches and the diagnosis walk included.

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
OPS = (
    "snapshot", "to_dict", "str", "report", "pytest",
    "to_dict_rendering", "str_rendering", "report_rendering", "pytest_rendering",
)  # fmt: skip
LABELS = {
    "snapshot": "snapshot() (lazy)",
    "to_dict": "snapshot().to_dict()",
    "str": "str(snapshot())",
    "report": "periodic report (structlog events, JSON)",
    "pytest": "pytest failure text",
    "to_dict_rendering": "to_dict() of a diagnosed snapshot (rendering alone)",
    "str_rendering": "str() of a diagnosed snapshot (rendering alone)",
    "report_rendering": "periodic report of a diagnosed snapshot (rendering alone)",
    "pytest_rendering": "pytest failure text of a diagnosed snapshot (rendering alone)",
}
#: The renderings measured cold too (the first snapshot of a process), under callgrind.
COLD = ("to_dict", "str")


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

    def periodic(snap: Any = None) -> int:
        return report.Reporter(cfg, logger=logger).report(snap or leakguard.snapshot())

    diagnosed: list[Any] = []

    def ready() -> Any:
        """One snapshot of these sockets, its leaks diagnosed (made at its first use, then re-rendered)."""
        if not diagnosed:
            snap = leakguard.snapshot()
            for info in snap.leaks:
                info.diagnosis
            diagnosed.append(snap)
        return diagnosed[0]

    ops: dict[str, Callable[[], Any]] = {
        "snapshot": leakguard.snapshot,
        "to_dict": lambda: leakguard.snapshot().to_dict(),
        "str": lambda: str(leakguard.snapshot()),
        "report": periodic,
        "to_dict_rendering": lambda: ready().to_dict(),
        "str_rendering": lambda: str(ready()),
        "report_rendering": lambda: periodic(ready()),
    }
    if with_pytest:  # importing pytest costs more than everything else here: not under callgrind
        from leakguard.pytest_plugin import _terminal

        ops["pytest"] = lambda: _terminal.leak_text("leakguard: this test left", leakguard.snapshot().leaks)
        ops["pytest_rendering"] = lambda: _terminal.leak_text("leakguard: this test left", ready().leaks)
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
                        ops = _ops()  # its diagnosed snapshot is of these sockets
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


def _sections_main(n: int, sites: int, first: str | None) -> None:
    """Under callgrind: *n* sockets from *sites* sites; each call measured runs inside
    ``sys.call_tracing`` (see :func:`benchmarks._callgrind.sections`): *first* (cold: nothing
    rendered in this process yet), or, with *first* None, every op and psutil, each called
    once before (warm), in the order of :data:`OPS`."""
    _raise_nofile(0)
    leakguard.install(integrations="none")
    ops = {**_ops(with_pytest=False), "psutil": _psutil()}
    with tempfile.TemporaryDirectory(prefix="leakguard-bench-render-") as d:
        socks = Sockets(n, sites, d)
        time.sleep(0.2)  # loopback FINs land at once; no polling loop whose length varies
        if first is not None:
            sys.call_tracing(ops[first], ())
        else:
            if len(leakguard.snapshot().leaks) < socks.leaks:
                raise SystemExit("CLOSE_WAIT not seen")
            for name, fn in ops.items():
                fn()
                sys.call_tracing(fn, ())
        socks.close()
    leakguard.uninstall()


def bench_instructions(quick: bool) -> list[Row]:
    from benchmarks import _callgrind

    if not _callgrind.available():
        return [{"name": "rendering (instructions)", "error": "valgrind is not installed"}]
    n = 1_000
    rows: list[Row] = []
    names = [*_ops(with_pytest=False), "psutil"]
    site_counts = (1,) if quick else (1, 500)
    argv = [sys.executable, os.path.abspath(__file__), "--sections", str(n)]
    programs = [(sites, None) for sites in site_counts] + [(1, op) for op in COLD]
    got = _callgrind.sections(
        [argv + [str(sites), first or "-"] for sites, first in programs],
        cwd=tempfile.gettempdir(),  # not the repository root: the installed package, not ./leakguard
    )
    psutil_per = {sites: dict(zip(names, counts))["psutil"] for (sites, first), counts in zip(programs, got) if first is None}
    for (sites, first), counts in zip(programs, got):
        measured = dict(zip(names, counts)) if first is None else {first: counts[0]}
        base = psutil_per[sites]
        for name, count in measured.items():
            if name == "psutil":
                continue
            cold = " cold (the process's first snapshot: first-use caches and the diagnosis walk)" if first else ""
            rows.append(
                {
                    "name": f"{LABELS[name]}, {n:,} own sockets ({n // 2:,} CLOSE_WAIT), {_plural_sites(sites)}"
                    f"{cold} (instructions)",
                    "baseline_instructions": base,
                    "leakguard_instructions": count,
                    "ratio": round(count / base, 4),
                    "baseline": "psutil net_connections('tcp')",
                    "render": name + ("_cold" if first else ""),
                    "own_sockets": n,
                    "sites": sites,
                }
            )
    return rows


def run(quick: bool = False) -> list[Row]:
    return bench_timed(quick) + bench_instructions(quick)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sections"]:
        _sections_main(int(sys.argv[2]), int(sys.argv[3]), None if sys.argv[4] == "-" else sys.argv[4])
    else:
        for r in run("--quick" in sys.argv):
            print(json.dumps(r))
