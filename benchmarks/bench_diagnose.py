"""Diagnosis cost: what held_by / in_use / verdict add to a snapshot.

Setup: 500 loopback connections opened after install(), both ends in this process (1,000 tracked TCP
sockets); the server side of each is closed, so 500 client sockets sit in CLOSE_WAIT (verdict forgotten).
The heap holds 1,000,000 more live container objects, in one of three shapes:

- ``list``: ``[[i] for i in range(1_000_000)]`` in a module global, the leaks in another global list
  (``app.LEAKED[i]``): the issue's setup; the walk has a million objects beside the leaks to get past;
- ``cache``: a dict of 333,333 instances, each with its ``__dict__`` and a list (``app.CACHE[i].v``), the leaks
  one attribute down in instances of their own (``app.CONNS[i].sock``): the walk must read three levels of
  the cache before it reaches the leaks (a breadth-first walk reads everything nearer the roots than the
  leaks; this row shows what that costs per object);
- ``deep``: an object graph, a tree of 500,000 instances four children each (``node.kids`` lists), the leaks
  hung from 500 of its deepest nodes (``app.TREE.kids[3].kids[1]...conn``): the walk reads the whole tree.

Each shape is diagnosed by the compiled walk (``leakguard._walk``) and by the pure-Python walk (what runs
without a compiler, on a free-threaded or another Python; what ran before the compiled one existed), each
on a heap of its own: ``cold`` is the first diagnosis of the heap, ``warm`` the median of the following ones
(on 3.11/3.12 naming a path gives the instances on it a ``__dict__`` of their own, so a warm walk may take one
step more).  Then, side by side in paired rounds, the diagnosis of the same 500 leaks on the small heap of a
test process against ``psutil.Process().net_connections("tcp")`` (the floor of ``snapshot().to_dict()``,
diagnosis included, is 0.1× psutil), and instruction counts (callgrind; immune to load) of each cold and
warm diagnosis against one ``gc.get_objects()`` of the same heap (a pass that only lists every object: a
diagnosis below 1× reads less than the heap).

    python benchmarks/bench_diagnose.py [--quick]
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
import weakref
from typing import Any

if __package__ in (None, ""):  # python benchmarks/bench_diagnose.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import leakguard
from leakguard.snapshot import take

Row = dict[str, Any]
SHAPES = ("list", "cache", "deep")
WALKS = ("compiled", "python")


class _Holder:
    def __init__(self, v: Any) -> None:
        self.v = v


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


class _Node:
    def __init__(self) -> None:
        self.kids: list[_Node] = []


def _tree(nodes: int) -> tuple[_Node, list[_Node]]:
    """A tree of *nodes* _Node, four children each, breadth first; the root and its deepest nodes."""
    root = _Node()
    level, made = [root], 1
    while made < nodes:
        nxt = []
        for node in level:
            for _ in range(min(4, nodes - made)):
                kid = _Node()
                node.kids.append(kid)
                nxt.append(kid)
                made += 1
        level = nxt or level
    return root, level


def _use(walk: str) -> None:
    from leakguard import diagnose, _walk  # noqa: F401  (the compiled walk must be built to compare)

    diagnose._native = _walk.walk if walk == "compiled" else None


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
        leaves: list[_Node] = []
        if shape == "list":
            mod.HEAP = [[i] for i in range(heap)]  # type: ignore[attr-defined]
        elif shape == "cache":
            mod.CACHE = {i: _Holder([i]) for i in range(heap // 3)}  # type: ignore[attr-defined]
        else:
            mod.TREE, leaves = _tree(max(heap // 2, n_leaks))  # type: ignore[attr-defined]
        held: list[Any] = []
        for i in range(n_leaks):
            c = socket.create_connection(self.srv.getsockname())
            a, _ = self.srv.accept()
            a.close()
            if shape == "deep":
                leaves[i * len(leaves) // n_leaks].conn = c  # type: ignore[attr-defined]
            else:
                held.append(c if shape == "list" else _Conn(c))
        del c, a
        if shape == "list":
            mod.LEAKED = held  # type: ignore[attr-defined]
        elif shape == "cache":
            mod.CONNS = held  # type: ignore[attr-defined]
        # weakly: a strong reference here would be a path of its own (a local of the benchmark holds self)
        self.deep = [weakref.ref(leaves[i * len(leaves) // n_leaks].conn) for i in range(n_leaks)] if leaves else []
        del held, leaves
        deadline = time.monotonic() + 10
        while len(take().leaks) < n_leaks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        # the sockets only through the module: a local or attribute holding them would make them in use
        mod = self.mod
        socks = getattr(mod, "LEAKED", None) or [h.sock for h in getattr(mod, "CONNS", ())]
        for c in socks or [r() for r in self.deep]:
            c.close()
        self.srv.close()
        del sys.modules[mod.__name__]


def _diagnose(snap: Any) -> set[str]:
    return {s.verdict for s in snap.leaks}  # the walk, once for all leaks


def _psutil_tcp() -> Any:
    import psutil

    return psutil.Process().net_connections("tcp")


def bench_timed(quick: bool) -> list[Row]:
    n_leaks, heap, rounds = (100, 100_000, 3) if quick else (500, 1_000_000, 7)
    leakguard.install(integrations="none")
    rows: list[Row] = []
    try:
        clean_ms = statistics.median(_time(take) for _ in range(rounds)) * 1000
        rows.append({"name": "snapshot, no leaks (diagnosis never runs)", "value": round(clean_ms, 2), "unit": "ms"})
        for shape in SHAPES:
            got: dict[str, tuple[float, float, float, set[str], list[str]]] = {}
            for walk in WALKS:
                _use(walk)
                setup = _Setup(shape, n_leaks, heap)
                try:
                    snap_ms, diag_ms, verdicts = [], [], set()
                    for _ in range(rounds + 1):
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
                got[walk] = (statistics.median(snap_ms), diag_ms[0], statistics.median(diag_ms[1:]), verdicts, held)
            for when, i in (("cold", 1), ("warm", 2)):
                c, py = got["compiled"][i], got["python"][i]
                row: Row = {
                    "name": f"diagnosis of {n_leaks} leaks, {heap:,}-object heap ({shape}), {when}",
                    "value": round(c, 1),
                    "unit": "ms",
                    "python_walk_ms": round(py, 1),
                    "ratio_vs_python_walk": round(c / py, 3) if py else None,
                    "snapshot_ms": round(got["compiled"][0], 1),
                    "verdicts": sorted(v for v in got["compiled"][3] if v),
                    "held_by": got["compiled"][4][:1],
                }
                if shape == "list" or not quick:
                    row.update(floor="<= 100 ms", ok=c <= 100.0)
                rows.append(row)
        rows += _small_heap(n_leaks, rounds * 3)
    finally:
        _use("compiled")
        leakguard.uninstall()
    return rows


def _small_heap(n_leaks: int, rounds: int) -> list[Row]:
    """The diagnosis alone (a snapshot's first verdict read) on this process's own small heap, against psutil."""
    setup = _Setup("list", n_leaks, 0)
    rows: list[Row] = []
    try:
        by: dict[str, list[float]] = {w: [] for w in WALKS}
        base: list[float] = []
        for _ in range(rounds):
            base.append(_time(_psutil_tcp) * 1000)
            for walk in WALKS:
                _use(walk)
                snap = take()
                by[walk].append(_time(lambda: _diagnose(snap)) * 1000)
                del snap
        ps = min(base)
        for walk in WALKS:
            ms = min(by[walk])
            rows.append({
                "name": f"diagnosis of {n_leaks} leaks, small heap ({walk} walk) vs psutil net_connections",
                "value": round(ms, 2),
                "unit": "ms",
                "baseline": round(ps, 2),
                "ratio": round(ms / ps, 3),
            })  # fmt: skip
    finally:
        _use("compiled")
        setup.close()
    return rows


def bench_instructions(quick: bool) -> list[Row]:
    """Instructions of the cold and warm diagnosis and of one gc.get_objects(), per shape and walk (callgrind)."""
    from benchmarks import _callgrind

    if not _callgrind.available():
        return [{"name": "diagnosis (instructions)", "error": "valgrind is not installed"}]
    n_leaks, heap = (100, 100_000) if quick else (500, 1_000_000)
    cases = [(shape, walk) for shape in SHAPES for walk in WALKS]
    argvs = [[sys.executable, os.path.abspath(__file__), "--loop", shape, walk, str(n_leaks), str(heap)]
             for shape, walk in cases]  # fmt: skip
    # not the repository root: the installed package, not ./leakguard
    got = _callgrind.sections(argvs, cwd=tempfile.gettempdir())
    rows: list[Row] = []
    for (shape, walk), counts in zip(cases, got):
        if len(counts) != 4:
            rows.append({"name": f"diagnosis ({shape}, {walk}) (instructions)", "error": "callgrind dumped no count"})
            continue
        snap, cold, warm, objects = counts
        for when, n in (("cold", cold), ("warm", warm)):
            rows.append(
                {
                    "name": f"diagnosis of {n_leaks} leaks, {heap:,}-object heap ({shape}), {walk} walk, {when}"
                    " vs one gc.get_objects() (instructions)",
                    "baseline_instructions": objects,
                    "leakguard_instructions": n,
                    "ratio": round(n / objects, 4),
                    "snapshot_instructions": snap,
                }
            )
    return rows


def _loop(shape: str, walk: str, n_leaks: int, heap: int) -> None:
    """The program callgrind counts: the snapshot, a cold and a warm diagnosis, one gc.get_objects(), each in
    sys.call_tracing."""
    import gc

    from leakguard import diagnose

    diagnose.BUDGET_SECONDS = 3600.0  # valgrind runs ~50× slower: the object budget alone decides, as natively
    _use(walk)
    leakguard.install(integrations="none")
    setup = _Setup(shape, n_leaks, heap)
    try:
        snap = sys.call_tracing(take, ())
        verdicts = sys.call_tracing(_diagnose, (snap,))
        assert verdicts == {"forgotten"}, verdicts
        snap = take()
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
        _loop(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        for r in run("--quick" in sys.argv):
            print(r)
