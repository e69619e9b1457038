"""leakguard._walk, the compiled heap walk of the diagnosis, against the pure-Python walk it replaces.

Both walk the same real heap (every module's globals, live threads, asyncio tasks, real pools whose server
killed the connection, cycles with the collector disabled): the same paths, object for object and offset for
offset, the same verdicts and texts; the same budget behaviour; and the module loads in a sub-interpreter.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import leakguard
from leakguard import diagnose

from .helpers import HangUpServer, require_service, wait_close_wait, wait_for

NATIVE = diagnose._native
pytestmark = pytest.mark.skipif(NATIVE is None, reason="leakguard._walk is not built for this interpreter")


class Node:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.me = self


class Slotted:
    __slots__ = ("held",)

    def __init__(self, held: Any) -> None:
        self.held = held


def _module_starts() -> tuple[list[Any], set[int]]:
    roots: list[tuple[diagnose._Root, Any]] = []
    own: set[int] = set()
    diagnose._module_roots(roots, own)
    return [o for _, o in roots], own


def _both(starts: list[Any], own: set[int], targets: list[Any], max_level: int | None = None,
          objects: int = 10_000_000) -> tuple[Any, Any]:  # fmt: skip
    """(chains, complete, gave_up) of the compiled and of the Python walk, paths as (id, offset) steps."""
    got = []
    for native in (NATIVE, None):
        diagnose._native = native
        try:
            budget = diagnose._Budget(objects, 600.0)
            found, complete = diagnose._search(list(starts), set(own), budget, list(targets), max_level)
        finally:
            diagnose._native = NATIVE
        chains = [(tid, ri, [(id(o), off) for o, off in path]) for tid, ri, path in found]
        got.append((chains, complete, budget.gave_up))
    return got[0], got[1]


@pytest.fixture
def app() -> Iterator[types.ModuleType]:
    mod = types.ModuleType("lg_walk_app")
    sys.modules[mod.__name__] = mod
    try:
        yield mod
    finally:
        del sys.modules[mod.__name__]


class TestSamePaths:
    """The compiled walk finds what the Python walk finds, in the same order, on the process's real heap."""

    def test_every_kind_of_holder(self, app: types.ModuleType) -> None:
        socks = [socket.socket() for _ in range(9)]
        try:
            s = socks
            app.BIG = [[i] for i in range(50_000)]  # a big container: read last in its level
            app.BIG[-7] = [s[0]]
            app.BY_KEY = {("eu", 1): s[1], "x": [s[2], s[2]]}  # the same socket twice: two paths
            app.QUEUE = collections.deque([None, s[3]])
            app.CLOSURE = (lambda v: lambda: v)(s[4])
            app.SLOTTED = Slotted(s[5])

            def gen(v: Any) -> Iterator[None]:
                yield None
                v.close()

            app.GEN = gen(s[6])
            next(app.GEN)
            app.TWICE, app.AGAIN = s[7], [s[7]]  # a root-level hit and a deeper one
            app.BIG_DICT = {i: str(i) for i in range(20_000)}
            app.BIG_DICT[-1] = Slotted([s[8]])
            starts, own = _module_starts()
            targets = list(socks)
            del s
            native, python = _both(starts, own, targets)
            assert native == python
            chains, complete, gave_up = native
            assert {tid for tid, _, _ in chains} == set(map(id, socks)) and not complete and not gave_up
            assert sum(tid == id(socks[2]) for tid, _, _ in chains) == 2
            # with a level limit (the in-use walk's), and from other starts (the big container first): the same
            native, python = _both(starts, own, targets, max_level=2)
            assert native == python and native[0]
            # (the modules stay out: 3.12's _asyncio visits freed objects, its free list, which gc.get_referents
            # would revive and free again)
            native, python = _both([app.BIG, app.BY_KEY, app.QUEUE, app.BIG_DICT], own, targets)
            assert native == python and native[0]
        finally:
            for x in socks:
                x.close()
            for name in ("BIG", "BIG_DICT", "GEN"):
                app.__dict__.pop(name, None)

    def test_unreachable_cycle_with_the_collector_disabled(self, app: types.ModuleType) -> None:
        was = gc.isenabled()
        gc.disable()
        try:
            sock = socket.socket()
            node: dict[str, Any] = {"sock": sock}
            node["me"] = node
            app.OTHER = [sock.fileno()]
            starts, own = _module_starts()
            native, python = _both(starts, own, [sock])
            assert native == python == ([], True, False)  # the whole reachable heap read, nothing found
            sock.close()
        finally:
            if was:
                gc.enable()

    def test_budget(self, app: types.ModuleType) -> None:
        sock = socket.socket()
        try:
            app.BIG = [[i] for i in range(300_000)]
            app.BIG[-1] = [[sock]]
            starts, own = _module_starts()
            native, python = _both(starts, own, [sock], objects=100_000)
            assert native[0] == python[0] == [] and native[1:] == python[1:] == (False, True)  # gave up, both
            native, python = _both(starts, own, [sock])
            assert native == python and len(native[0]) == 1 and native[1:] == (False, False)
        finally:
            sock.close()
            del app.BIG


def _run(batch: diagnose.Batch, native: Any) -> dict[Any, tuple[Any, ...]]:
    diagnose._native = native
    try:
        done = diagnose.run(batch.subjects, settled=batch.settled, roots=batch.roots)
    finally:
        diagnose._native = NATIVE
    return {k: (d.verdict, d.why, d.held_by, d.in_use) for k, d in done.items()}


@pytest.mark.usefixtures("installed")
def test_same_diagnoses_on_a_live_process(app: types.ModuleType, redis_kill: Callable[[int], None],
                                          pg_kill: Callable[[int], None]) -> None:  # fmt: skip
    """One snapshot of a process with every kind of leak at once, diagnosed by each walk: the same diagnoses."""
    require_service("postgres")
    import redis
    import sqlalchemy

    lock = threading.Lock()
    lock.acquire()
    loop = asyncio.new_event_loop()
    forever = asyncio.Event()
    threads: list[threading.Thread] = []
    with HangUpServer() as srv:
        fds: list[int] = []

        def worker(conn: socket.socket) -> None:
            fds.append(conn.fileno())
            with lock:  # blocked here while the peer hangs up
                conn.close()

        for i in range(3):
            threads.append(threading.Thread(target=worker, args=(socket.create_connection(srv.address),),
                                            name=f"worker-{i}", daemon=True))  # fmt: skip
            threads[-1].start()

        async def handler() -> None:
            reader, writer = await asyncio.open_connection(*srv.address)
            fds.append(writer.get_extra_info("socket").fileno())
            try:
                await forever.wait()
            finally:
                writer.close()

        async def start() -> asyncio.Task[None]:
            return asyncio.get_running_loop().create_task(handler(), name="session-1")

        async def finish(task: asyncio.Task[None]) -> None:
            forever.set()
            await task

        runner = threading.Thread(target=loop.run_forever, name="loop-thread", daemon=True)
        runner.start()
        task = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
        app.KEPT = [socket.create_connection(srv.address) for _ in range(3)]
        fds += [c.fileno() for c in app.KEPT]
        was = gc.isenabled()
        gc.disable()
        node = Node(socket.create_connection(srv.address))
        fds.append(node.sock.fileno())
        cycle = weakref.ref(node)
        cycle_fd = fds[-1]
        client = redis.Redis(host="127.0.0.1", port=6379)
        engine = sqlalchemy.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/test", pool_size=2)
        try:
            redis_kill(client.client_id())
            fds.append(client.connection_pool._available_connections[0]._sock.fileno())  # type: ignore[attr-defined]
            with engine.connect() as c:
                pid = c.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                fds.append(c.connection.dbapi_connection.fileno())  # type: ignore[union-attr]
            pg_kill(pid)  # type: ignore[arg-type]
            del node, c  # only the cycle keeps it now
            assert wait_for(lambda: len(fds) == 10)
            for fd in fds:
                wait_close_wait(fd)
            snap = leakguard.snapshot()
            mine = [s for s in snap.leaks if s.fd in fds]
            assert len(mine) == 10
            batch = mine[0][10]
            assert batch is not None
            # Naming a path reads an instance's __dict__, which on 3.11/3.12 makes it a dict of its own (it was
            # inline): the next walk goes one step further through it.  A first diagnosis settles that.
            _run(batch, NATIVE)
            native, python = _run(batch, NATIVE), _run(batch, None)
            assert native == python, [(a, b) for k in native for a, b in zip(native[k], python[k]) if a != b]
            verdicts = collections.Counter(native[diagnose.key(s.fd, s.record)][0] for s in mine)
            assert verdicts == {"in_use": 4, "forgotten": 3, "unreachable": 1, "idle_in_pool": 2}, native
            assert native[diagnose.key(cycle_fd, next(s.record for s in mine if s.fd == cycle_fd))][0] == "unreachable"
        finally:
            if cycle() is not None:
                cycle().sock.close()  # type: ignore[union-attr]
            if was:
                gc.enable()
            lock.release()
            for t in threads:
                t.join(5)
            asyncio.run_coroutine_threadsafe(finish(task), loop).result(5)
            for c in app.KEPT:
                c.close()
            loop.call_soon_threadsafe(loop.stop)
            runner.join(5)
            loop.close()
            client.close()
            engine.dispose()


SUB = """
import importlib.util, socket
spec = importlib.util.spec_from_file_location("leakguard._walk", PATH)  # not the package: nothing else loaded
_walk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_walk)
s = socket.socket()
holder = {"k": [s]}
hits, used, complete = _walk.walk([holder], set(), [s], 3, 16384, 10_000, 5.0, -1)
assert [(t, r, [type(o).__name__ for o, _ in p]) for t, r, p in hits] == [(0, 0, ["dict", "list"])], hits
s.close()
"""


def test_loads_in_a_sub_interpreter() -> None:
    """It keeps no state: a legacy sub-interpreter imports it and walks its own heap; the main one still does."""
    program = textwrap.dedent(
        f"""
        import _testcapi, sys
        SUB = {"PATH = " + repr(sys.modules["leakguard._walk"].__file__) + SUB!r}
        exec(SUB)  # the main interpreter
        assert _testcapi.run_in_subinterp(SUB) == 0
        try:
            import _interpreters as interp
        except ImportError:
            interp = None
        if interp is not None:  # 3.13: a legacy one, then an isolated one with its own GIL
            for config in ("legacy", "isolated"):
                i = interp.create(config)
                try:
                    assert interp.run_string(i, SUB) is None, config
                finally:
                    interp.destroy(i)
        exec(SUB)
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                         cwd=tempfile.gettempdir(), env={**os.environ, "PYTHONWARNINGS": "error"})  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-2000:]
