"""Diagnosis cost: what held_by / in_use / verdict add to a snapshot.

Setup: 500 loopback connections opened after install(), both ends in this process (1,000 tracked TCP
sockets); the server side of each is closed, so 500 client sockets sit in CLOSE_WAIT, kept in a module
global list (verdict forgotten).  The heap holds 1,000,000 live container objects (``[[i] for i in
range(1_000_000)]`` in another module global), so the walk has that much to get past.

Rows, side by side in paired rounds (median):
- ``snapshot (no leaks)`` vs the same with leaks' diagnosis not read: a snapshot never diagnoses by itself;
- ``diagnosis of 500 leaks, 1M-object heap``: the first read of a verdict (the walk for all leaks), against
  the snapshot alone; floor 100 ms.
"""

from __future__ import annotations

import resource
import socket
import statistics
import sys
import time
import types
from typing import Any

import leakguard
from leakguard.snapshot import take

Row = dict[str, Any]


def run(quick: bool = False) -> list[Row]:
    n_leaks, heap, rounds = (100, 100_000, 3) if quick else (500, 1_000_000, 7)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4 * n_leaks:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4 * n_leaks, hard), hard))
    leakguard.install(integrations="none")
    mod = types.ModuleType("bench_diagnose_app")
    sys.modules[mod.__name__] = mod
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1024)
    try:
        clean_ms = statistics.median(_time(take) for _ in range(rounds)) * 1000
        mod.HEAP = [[i] for i in range(heap)]  # type: ignore[attr-defined]
        mod.LEAKED = []  # type: ignore[attr-defined]
        for _ in range(n_leaks):
            c = socket.create_connection(srv.getsockname())
            a, _ = srv.accept()
            a.close()
            mod.LEAKED.append(c)  # type: ignore[attr-defined]
        del c, a
        deadline = time.monotonic() + 10
        while len(take().leaks) < n_leaks and time.monotonic() < deadline:
            time.sleep(0.01)
        snap_ms, diag_ms, verdicts = [], [], set()
        for _ in range(rounds):
            t0 = time.perf_counter()
            snap = take()
            t1 = time.perf_counter()
            verdicts.update(s.verdict for s in snap.leaks)  # the walk, once for all leaks
            t2 = time.perf_counter()
            snap_ms.append((t1 - t0) * 1000)
            diag_ms.append((t2 - t1) * 1000)
        s_ms, d_ms = statistics.median(snap_ms), statistics.median(diag_ms)
        return [
            {
                "name": "snapshot, no leaks (diagnosis never runs)",
                "value": round(clean_ms, 2),
                "unit": "ms",
            },
            {
                "name": f"diagnosis of {n_leaks} leaks, {heap:,}-object heap",
                "value": round(d_ms, 1),
                "unit": "ms",
                "baseline": round(s_ms, 1),
                "ratio": round(d_ms / s_ms, 2) if s_ms else None,
                "floor": "<= 100 ms",
                "ok": d_ms <= 100.0,
                "verdicts": sorted(v for v in verdicts if v),
            },
        ]
    finally:
        for c in getattr(mod, "LEAKED", []):
            c.close()
        srv.close()
        del sys.modules[mod.__name__]
        leakguard.uninstall()


def _time(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    for row in run("--quick" in sys.argv):
        print(row)
