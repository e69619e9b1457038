"""Diagnosis cost: what held_by / in_use / verdict add to a snapshot.

Setup: 500 loopback connections opened after install(), both ends in this process (1,000 tracked TCP
sockets); the server side of each is closed, so 500 client sockets sit in CLOSE_WAIT (verdict forgotten).
The heap holds 1,000,000 more live container objects, in one of two shapes:

- ``list``: ``[[i] for i in range(1_000_000)]`` in a module global, the leaks in another global list
  (``app.LEAKED[i]``): the issue's setup; the walk has a million objects beside the leaks to get past;
- ``cache``: a dict of 333,333 instances, each with its ``__dict__`` and a list (``app.CACHE[i].v``), the leaks
  one attribute down in instances of their own (``app.CONNS[i].sock``): the walk must read three levels of
  the cache before it reaches the leaks (a breadth-first walk reads everything nearer the roots than the
  leaks; this row shows what that costs per object).

Rows, side by side in paired rounds (median), then instruction counts (callgrind; immune to load):
- ``snapshot, no leaks``: a snapshot never diagnoses by itself;
- ``diagnosis of 500 leaks, 1M-object heap`` per shape: the first read of a verdict (the walk for all leaks),
  against the snapshot alone; the issue's floor is 100 ms for the ``list`` shape;
- the same in instructions, against one ``gc.get_objects()`` of the same heap (a pass that only lists every
  object: a diagnosis below 1× reads less than the heap).
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import sys
import tempfile
import time
import types
from typing import Any

if __package__ in (None, ""):  # python benchmarks/bench_diagnose.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import leakguard
from leakguard.snapshot import take

Row = dict[str, Any]
SHAPES = ("list", "cache")


class _Holder:
    def __init__(self, v: Any) -> None:
        self.v = v


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


class _Setup:
    """The module, the listener and the leaks of one shape (see the module docstring)."""

    def __init__(self, shape: str, n_leaks: int, heap: int) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < 4 * n_leaks:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(4 * n_leaks, hard), hard))
        self.n = n_leaks
        self.mod = mod = types.ModuleType("bench_diagnose_app")
        sys.modules[mod.__name__] = mod
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1024)
        if shape == "list":
            mod.HEAP = [[i] for i in range(heap)]  # type: ignore[attr-defined]
        else:
            mod.CACHE = {i: _Holder([i]) for i in range(heap // 3)}  # type: ignore[attr-defined]
        held: list[Any] = []
        for _ in range(n_leaks):
            c = socket.create_connection(self.srv.getsockname())
            a, _ = self.srv.accept()
            a.close()
            held.append(c if shape == "list" else _Conn(c))
        del c, a
        if shape == "list":
            mod.LEAKED = held  # type: ignore[attr-defined]
        else:
            mod.CONNS = held  # type: ignore[attr-defined]
        del held
        deadline = time.monotonic() + 10
        while len(take().leaks) < n_leaks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        # the sockets only through the module: a local or attribute holding them would make them in use
        for c in getattr(self.mod, "LEAKED", None) or [h.sock for h in getattr(self.mod, "CONNS", ())]:
            c.close()
        self.srv.close()
        del sys.modules[self.mod.__name__]


def _diagnose(snap: Any) -> set[str]:
    return {s.verdict for s in snap.leaks}  # the walk, once for all leaks


def bench_timed(quick: bool) -> list[Row]:
    n_leaks, heap, rounds = (100, 100_000, 3) if quick else (500, 1_000_000, 7)
    leakguard.install(integrations="none")
    rows: list[Row] = []
    try:
        clean_ms = statistics.median(_time(take) for _ in range(rounds)) * 1000
        rows.append({"name": "snapshot, no leaks (diagnosis never runs)", "value": round(clean_ms, 2), "unit": "ms"})
        for shape in SHAPES:
            setup = _Setup(shape, n_leaks, heap)
            try:
                snap_ms, diag_ms, verdicts = [], [], set()
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    snap = take()
                    t1 = time.perf_counter()
                    verdicts |= _diagnose(snap)
                    t2 = time.perf_counter()
                    snap_ms.append((t1 - t0) * 1000)
                    diag_ms.append((t2 - t1) * 1000)
                    held = snap.leaks[0].held_by
                del snap
            finally:
                setup.close()
            s_ms, d_ms = statistics.median(snap_ms), statistics.median(diag_ms)
            row: Row = {
                "name": f"diagnosis of {n_leaks} leaks, {heap:,}-object heap ({shape})",
                "value": round(d_ms, 1),
                "unit": "ms",
                "baseline": round(s_ms, 1),
                "ratio": round(d_ms / s_ms, 2) if s_ms else None,
                "verdicts": sorted(v for v in verdicts if v),
                "held_by": held[:1],
            }
            if shape == "list":
                row.update(floor="<= 100 ms", ok=d_ms <= 100.0)
            rows.append(row)
    finally:
        leakguard.uninstall()
    return rows


def bench_instructions(quick: bool) -> list[Row]:
    """Instructions of the snapshot, of the diagnosis and of one gc.get_objects(), per shape (callgrind)."""
    from benchmarks import _callgrind

    if not _callgrind.available():
        return [{"name": "diagnosis (instructions)", "error": "valgrind is not installed"}]
    n_leaks, heap = (100, 100_000) if quick else (500, 1_000_000)
    argvs = [[sys.executable, os.path.abspath(__file__), "--loop", shape, str(n_leaks), str(heap)] for shape in SHAPES]
    # not the repository root: the installed package, not ./leakguard
    got = _callgrind.sections(argvs, cwd=tempfile.gettempdir())
    rows: list[Row] = []
    for shape, counts in zip(SHAPES, got):
        if len(counts) != 3:
            rows.append({"name": f"diagnosis ({shape}) (instructions)", "error": "callgrind dumped no count"})
            continue
        snap, diag, objects = counts
        rows.append(
            {
                "name": f"diagnosis of {n_leaks} leaks, {heap:,}-object heap ({shape}) vs one gc.get_objects()"
                " (instructions)",
                "baseline_instructions": objects,
                "leakguard_instructions": diag,
                "ratio": round(diag / objects, 4),
                "snapshot_instructions": snap,
            }
        )
    return rows


def _loop(shape: str, n_leaks: int, heap: int) -> None:
    """The program callgrind counts: the snapshot, the diagnosis, one gc.get_objects(), each in sys.call_tracing."""
    import gc

    from leakguard import diagnose

    diagnose.BUDGET_SECONDS = 3600.0  # valgrind runs ~50× slower: the object budget alone decides, as natively
    leakguard.install(integrations="none")
    setup = _Setup(shape, n_leaks, heap)
    try:
        snap = sys.call_tracing(take, ())
        verdicts = sys.call_tracing(_diagnose, (snap,))
        assert verdicts == {"forgotten"}, verdicts
        sys.call_tracing(lambda: len(gc.get_objects()), ())
    finally:
        setup.close()
        leakguard.uninstall()


def run(quick: bool = False) -> list[Row]:
    return bench_timed(quick) + bench_instructions(quick)


def _time(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--loop"]:
        _loop(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        for r in run("--quick" in sys.argv):
            print(r)
