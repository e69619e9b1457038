"""leakguard.diagnose: who holds a leaked socket (held_by), is code still using it (in_use), and the verdict.

Real threads blocked on real locks, real asyncio tasks, real pools whose server killed the connection,
a real socketserver, real reference cycles with the collector disabled.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import socket
import socketserver
import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import leakguard
from leakguard import diagnose, registry

from .helpers import HangUpServer, require_service, this_line, wait_close_wait, wait_for


@pytest.fixture(autouse=True)
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared, loaded machine: the object budget decides here, not the clock (the budget test sets its own)."""
    monkeypatch.setattr(diagnose, "BUDGET_SECONDS", 120.0)


NATIVE = diagnose._native


@pytest.fixture(autouse=True, params=["compiled", "python"])
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every case with each heap walk: the compiled one (leakguard._walk) and the pure-Python one, which a build
    without a compiler, a free-threaded or another Python runs: the same verdicts and paths from both."""
    if request.param == "compiled":
        if NATIVE is None:
            pytest.skip("leakguard._walk is not built for this interpreter")
    else:
        monkeypatch.setattr(diagnose, "_native", None)
    return str(request.param)


@pytest.fixture
def server() -> Iterator[HangUpServer]:
    with HangUpServer() as srv:
        yield srv


@pytest.fixture
def app_module() -> Iterator[types.ModuleType]:
    """A real module in sys.modules (a module global is a root)."""
    mod = types.ModuleType("lg_app_cache")
    exec(
        "REGISTRY = {}\nclass Holder:\n    def __init__(self, conn):\n        self.conn = conn\n",
        mod.__dict__,
    )
    sys.modules["lg_app_cache"] = mod
    try:
        yield mod
    finally:
        for holder in mod.REGISTRY.values():
            holder.conn.close()
        del sys.modules["lg_app_cache"]


def leak_of(fd: int) -> leakguard.SocketInfo:
    return wait_close_wait(fd)


def hung_up(srv: HangUpServer) -> socket.socket:
    return socket.create_connection(srv.address)


def stash(mod: types.ModuleType, srv: HangUpServer) -> int:
    """Keep a hung-up connection in mod.REGISTRY['eu'].conn (and nowhere else); its fd."""
    mod.REGISTRY["eu"] = mod.Holder(hung_up(srv))
    return int(mod.REGISTRY["eu"].conn.fileno())


@contextlib.contextmanager
def stuck_thread(
    srv: HangUpServer, name: str, block: Callable[[], Any], release: Callable[[], Any]
) -> Iterator[tuple[leakguard.SocketInfo, int]]:
    """A thread named *name* holding a hung-up connection in its local ``conn`` while ``block()`` blocks it; its
    leak (verdict in_use) and the line of the ``block()`` call in ``worker()``."""
    line: list[int] = []
    fds: list[int] = []

    def worker(conn: socket.socket) -> None:
        fds.append(conn.fileno())
        line.append(this_line() + 1)
        block()  # blocked here while its connection's peer hangs up
        conn.close()

    t = threading.Thread(target=worker, args=(hung_up(srv),), name=name, daemon=True)
    t.start()
    try:
        assert wait_for(lambda: fds and line)
        leak = leak_of(fds[0])
        assert leak.verdict == "in_use", leak.verdict_reason
        yield leak, line[0]
    finally:
        release()
        t.join(5)


@pytest.mark.usefixtures("installed")
class TestVerdicts:
    """Each cause of a CLOSE_WAIT gets its verdict, its holders and, when code still uses it, where that code is."""

    def test_forgotten_in_a_module_global(self, server: HangUpServer, app_module: types.ModuleType) -> None:
        fd = stash(app_module, server)
        leak = leak_of(fd)
        assert leak.verdict == "forgotten"
        assert leak.held_by[:1] == ["lg_app_cache.REGISTRY['eu'].conn"], leak.verdict_reason
        assert leak.in_use is None
        assert leak.verdict_reason is not None and "missing close()" in leak.verdict_reason
        d = leak.to_dict()
        assert (d["verdict"], d["held_by"][0], d["in_use"]) == ("forgotten", "lg_app_cache.REGISTRY['eu'].conn", None)

    def test_in_use_by_a_thread_blocked_on_a_lock(self, server: HangUpServer) -> None:
        lock = threading.Lock()
        lock.acquire()
        with stuck_thread(server, "worker-3", lock.acquire, lock.release) as (leak, line):
            assert leak.in_use is not None
            assert leak.in_use["thread"] == "worker-3" and leak.in_use["task"] is None
            assert (leak.in_use["function"], leak.in_use["line"]) == ("worker", line)
            assert leak.in_use["file"] == __file__
            assert "lock" in leak.in_use["waits_on"]
            # lock.acquire() is C: the innermost frame of all is the application's own
            assert leak.in_use["now_at"] == f"tests/{os.path.basename(__file__)}:{line} in worker()"
            assert "thread 'worker-3' in worker() local conn" in leak.held_by
            d = leak.to_dict()
            assert d["in_use"] == leak.in_use and d["verdict_reason"] == leak.verdict_reason
            assert set(d["in_use"]) == {"thread", "task", "file", "line", "function", "now_at", "waits_on"}
            assert leak.in_use["now_at"] in d["verdict_reason"]

    def test_in_use_by_a_thread_waiting_inside_the_standard_library(self, server: HangUpServer) -> None:
        """in_use's file/line is the innermost application frame (the line to read); now_at the innermost frame
        of all, here in threading.py, where the thread really is; waits_on names what that frame waits for."""
        done = threading.Event()
        with stuck_thread(server, "worker-4", done.wait, done.set) as (leak, line):  # Event -> Condition.wait
            assert leak.in_use is not None
            assert (leak.in_use["file"], leak.in_use["line"], leak.in_use["function"]) == (__file__, line, "worker")
            path, _, func = leak.in_use["now_at"].rpartition(" in ")
            assert func == "wait()" and path.rsplit(":", 1)[0] == threading.__file__, leak.in_use
            assert leak.in_use["waits_on"] == "a threading.Condition or Event (wait)"

    def test_in_use_by_a_task_awaiting_forever(self, server: HangUpServer) -> None:
        loop = asyncio.new_event_loop()
        runner = threading.Thread(target=loop.run_forever, name="loop-thread", daemon=True)
        runner.start()
        fds: list[int] = []
        forever = asyncio.Event()
        line: list[int] = []

        async def handler() -> None:
            reader, writer = await asyncio.open_connection(*server.address)
            fds.append(writer.get_extra_info("socket").fileno())
            await reader.read()  # b"": the peer hung up (the loop thread is done with the transport)
            try:
                line.append(this_line() + 1)
                await forever.wait()
            finally:
                writer.close()

        async def start() -> asyncio.Task[None]:
            return asyncio.get_running_loop().create_task(handler(), name="session-7")

        task = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
        try:
            assert wait_for(lambda: fds and line)
            leak = leak_of(fds[0])
            assert leak.verdict == "in_use", leak.verdict_reason
            assert leak.in_use is not None
            assert (leak.in_use["thread"], leak.in_use["task"]) == ("loop-thread", "session-7"), leak.held_by
            assert (leak.in_use["function"], leak.in_use["line"]) == ("handler", line[0])
            assert "Event" in leak.in_use["waits_on"]
            # file/line: the handler's await; now_at: the innermost coroutine, asyncio.Event.wait in locks.py
            path, _, func = leak.in_use["now_at"].rpartition(" in ")
            assert func == "wait()" and path.rsplit(":", 1)[0] == asyncio.locks.__file__, leak.in_use
            # the shortest path may go through the reader or the writer (both hold the transport; 3.10 finds reader)
            here = ("task 'session-7' in handler() local writer", "task 'session-7' in handler() local reader")
            assert any(p.startswith(here) for p in leak.held_by), leak.held_by
        finally:
            loop.call_soon_threadsafe(task.cancel)
            wait_for(task.done)
            loop.call_soon_threadsafe(loop.stop)
            runner.join(5)
            loop.close()

    def test_unreachable_cycle_with_the_collector_disabled(self, server: HangUpServer) -> None:
        class Node:
            pass

        was_enabled = gc.isenabled()
        gc.disable()
        try:
            node = Node()
            node.me = node  # type: ignore[attr-defined]
            node.conn = hung_up(server)  # type: ignore[attr-defined]
            fd = node.conn.fileno()  # type: ignore[attr-defined]
            ref = weakref.ref(node)
            del node
            leak = leak_of(fd)
            assert leak.verdict == "unreachable", leak.verdict_reason
            assert leak.held_by == [] and leak.in_use is None
            assert leak.verdict_reason is not None and "disabled" in leak.verdict_reason
            assert gc.isenabled() is False  # the diagnosis left the collector as it was
        finally:
            obj = ref()
            if obj is not None:
                obj.conn.close()
            if was_enabled:
                gc.enable()

    def test_socketserver_handler_sleeping_after_the_client_left(self) -> None:
        release = threading.Event()
        where: list[int] = []

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.recv(1)  # b"": the client is gone
                while not release.is_set():
                    where.append(this_line() + 1)
                    time.sleep(0.02)  # busy elsewhere: the close at the end of the request waits

        with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as srv:
            srv.daemon_threads = True
            serve = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            serve.start()
            try:
                client = socket.create_connection(srv.server_address[:2])
                local = client.getsockname()
                client.close()
                assert wait_for(lambda: where)

                def accepted() -> list[leakguard.SocketInfo]:
                    return [s for s in leakguard.snapshot().leaks if s.remote == f"{local[0]}:{local[1]}"]

                (leak,) = wait_for(accepted)
                assert leak.verdict == "in_use", leak.verdict_reason
                assert leak.in_use is not None
                assert (leak.in_use["function"], leak.in_use["line"]) == ("handle", where[0])
                assert "sleep" in leak.in_use["waits_on"]
                assert leak.in_use["thread"].startswith("Thread-")
                assert any("local request" in p or "local self.request" in p for p in leak.held_by), leak.held_by
            finally:
                release.set()
                srv.shutdown()

    def test_a_local_of_the_calling_code_is_in_use_there(self, server: HangUpServer) -> None:
        conn = hung_up(server)
        try:
            leak = leak_of(conn.fileno())
            assert leak.verdict == "in_use"
            assert leak.in_use is not None and leak.in_use["function"] == "test_a_local_of_the_calling_code_is_in_use_there"
            name = f"thread {threading.current_thread().name!r} in test_a_local_of_the_calling_code_is_in_use_there() local conn"
            assert name in leak.held_by
        finally:
            conn.close()


class TestUntracked:
    """Sockets leakguard never saw created are diagnosed too: no creation stack is needed."""

    def test_opened_before_install(self, server: HangUpServer, app_module: types.ModuleType) -> None:
        assert not leakguard.installed()
        fd = stash(app_module, server)
        leak = leak_of(fd)
        assert leak.origin == "unknown" and leak.stack == []
        assert leak.verdict == "forgotten"
        assert leak.held_by[:1] == ["lg_app_cache.REGISTRY['eu'].conn"], leak.verdict_reason

    def test_a_descriptor_without_a_python_object(self, server: HangUpServer) -> None:
        conn = hung_up(server)
        fd = conn.detach()  # the descriptor stays open; no socket object holds it any more
        try:
            leak = leak_of(fd)
            assert leak.verdict == "forgotten" and leak.held_by == []
            assert leak.verdict_reason is not None and "no Python object" in leak.verdict_reason
        finally:
            socket.close(fd)


class TestCost:
    """Nothing is paid without leaks, nor before a diagnosis is read; the walk keeps to its budget."""

    def test_no_diagnosis_until_read(self, server: HangUpServer, app_module: types.ModuleType,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
        runs: list[int] = []
        real = diagnose.run

        def counting(*args: Any, **kwargs: Any) -> Any:
            runs.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(diagnose, "run", counting)
        clean = leakguard.snapshot()
        assert all(s[10] is None for s in clean.sockets) and clean.leaks == []
        clean.to_dict()
        assert runs == []
        fd = stash(app_module, server)
        leak_of(fd)  # snapshots with a leak, its verdict not read
        runs.clear()
        snap = leakguard.snapshot()
        assert snap.leaks and runs == []
        assert [s.verdict for s in snap.leaks if s.fd == fd] == ["forgotten"]
        snap.to_dict()
        [s.held_by for s in snap.leaks]
        assert runs == [1]  # once for all the snapshot's leaks

    def test_budget_on_a_million_object_heap(self, server: HangUpServer, app_module: types.ModuleType,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        conn = hung_up(server)
        fd = conn.fileno()
        # 1,000,000 live container objects, the socket below them.
        app_module.BIG = [[i] for i in range(1_000_000)]  # type: ignore[attr-defined]
        app_module.BIG[-1] = [[[conn]]]  # type: ignore[attr-defined]
        del conn
        try:
            leak_of(fd)
            monkeypatch.setattr(diagnose, "BUDGET_OBJECTS", 200_000)
            small = next(s for s in leakguard.snapshot().leaks if s.fd == fd)
            assert small.verdict == "forgotten" and small.held_by == []
            assert small.verdict_reason is not None and "gave up after" in small.verdict_reason
            monkeypatch.setattr(diagnose, "BUDGET_OBJECTS", 20_000_000)
            full = next(s for s in leakguard.snapshot().leaks if s.fd == fd)
            assert full.held_by == ["lg_app_cache.BIG[999999][0][0][0]"], full.verdict_reason
        finally:
            app_module.BIG[-1][0][0][0].close()  # type: ignore[attr-defined]
            del app_module.BIG  # type: ignore[attr-defined]


@pytest.mark.usefixtures("installed")
class TestPools:
    """Real pools whose server killed the connection: idle in the pool, or held by the code that checked it out."""

    def test_redis_idle_in_pool(self, redis_kill: Callable[[int], None]) -> None:
        import redis

        with redis.Redis(host="127.0.0.1", port=6379) as client:
            redis_kill(client.client_id())
            conn = client.connection_pool._available_connections[0]  # type: ignore[attr-defined]
            leak = leak_of(conn._sock.fileno())
            del conn
            assert leak.verdict == "idle_in_pool", leak.verdict_reason
            assert "redis ConnectionPool" in (leak.verdict_reason or "")
            assert leak.held_by, "the path to the pool that keeps it"

    def test_postgres_idle_in_pool_and_checked_out(self, pg_kill: Callable[[int], None]) -> None:
        require_service("postgres")
        import sqlalchemy

        engine = sqlalchemy.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/test", pool_size=2)
        try:
            with engine.connect() as c:
                pid = c.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                fd = c.connection.dbapi_connection.fileno()  # type: ignore[union-attr]
            pg_kill(pid)  # type: ignore[arg-type]
            leak = leak_of(fd)
            assert leak.verdict == "idle_in_pool", leak.verdict_reason
            # the owner of the descriptor libpq made: the psycopg2 connection, in the engine's pool
            # its place in the pool's queue depends on the version's checkin order (3.12/3.13 find queue[1])
            in_queue = r"local engine\.pool\._pool\.queue\[\d\]\.dbapi_connection$"
            assert any(re.search(in_queue, p) for p in leak.held_by), leak.held_by

            engine.dispose()  # the dead connection goes; the next checkout opens a new one
            conn = engine.connect()
            try:
                pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                fd = conn.connection.dbapi_connection.fileno()  # type: ignore[union-attr]
                pg_kill(pid)  # type: ignore[arg-type]
                leak = leak_of(fd)
                assert leak.verdict in ("in_use", "forgotten"), leak.verdict_reason
                assert any("local conn" in p for p in leak.held_by), leak.held_by
            finally:
                conn.invalidate()
                conn.close()
        finally:
            engine.dispose()


@pytest.mark.usefixtures("installed")
class TestHostUnchanged:
    """A diagnosis changes nothing in the program: no warning, collector state kept, objects untouched."""

    def test_differential(self, server: HangUpServer, app_module: types.ModuleType) -> None:
        fd = stash(app_module, server)

        def state() -> tuple[Any, ...]:  # read through the module: no local of this frame holds the socket
            holder = app_module.REGISTRY["eu"]
            return gc.isenabled(), sorted(vars(holder)), holder.conn.fileno(), registry.stats()["hook_errors"]

        before = state()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            leak = leak_of(fd)
            assert leak.verdict == "forgotten", leak.verdict_reason
        assert state() == before


@pytest.mark.usefixtures("installed")
class TestAcrossSnapshots:
    """A path found once is re-checked step by step by the next diagnosis (no walk while it holds); a broken one
    is walked again and names the new holder; what was unreachable stays so."""

    @pytest.fixture
    def walks(self, monkeypatch: pytest.MonkeyPatch) -> set[int]:
        """The ids of the objects held-by walks looked for (the in-use walk, bounded, runs every time); other
        leaks of this process may be walked for meanwhile."""
        counted: set[int] = set()
        real = diagnose._search

        def counting(starts: Any, seen: Any, budget: Any, targets: Any, max_level: Any = None) -> Any:
            if max_level is None:
                counted.update(map(id, targets))
            return real(starts, seen, budget, targets, max_level)

        monkeypatch.setattr(diagnose, "_search", counting)
        return counted

    def test_unchanged_then_moved(self, server: HangUpServer, app_module: types.ModuleType, walks: set[int]) -> None:
        fd = stash(app_module, server)
        assert leak_of(fd).held_by == ["lg_app_cache.REGISTRY['eu'].conn"]
        walks.clear()
        again = next(s for s in leakguard.snapshot().leaks if s.fd == fd)
        assert (again.verdict, again.held_by) == ("forgotten", ["lg_app_cache.REGISTRY['eu'].conn"])
        assert id(app_module.REGISTRY["eu"].conn) not in walks  # the path re-checked, not walked
        app_module.MOVED = [app_module.REGISTRY["eu"].conn]  # type: ignore[attr-defined]
        app_module.REGISTRY["eu"].conn = None
        try:
            moved = next(s for s in leakguard.snapshot().leaks if s.fd == fd)
            assert (moved.verdict, moved.held_by) == ("forgotten", ["lg_app_cache.MOVED[0]"]), moved.verdict_reason
            assert id(app_module.MOVED[0]) in walks  # type: ignore[attr-defined]  # the broken path: walked again
        finally:
            app_module.MOVED[0].close()  # type: ignore[attr-defined]
            app_module.REGISTRY.clear()

    def test_now_in_use_by_a_thread(self, server: HangUpServer, app_module: types.ModuleType, walks: set[int]) -> None:
        """The in-use check runs at every diagnosis: a thread that takes the socket from a global makes it in use."""
        fd = stash(app_module, server)
        assert leak_of(fd).verdict == "forgotten"
        lock = threading.Lock()
        lock.acquire()

        def worker(conn: socket.socket) -> None:
            with lock:
                pass

        t = threading.Thread(target=worker, args=(app_module.REGISTRY["eu"].conn,), name="taker", daemon=True)
        t.start()
        try:
            assert wait_for(lambda: next(s for s in leakguard.snapshot().leaks if s.fd == fd).verdict == "in_use")
            leak = next(s for s in leakguard.snapshot().leaks if s.fd == fd)
            assert leak.in_use is not None and leak.in_use["thread"] == "taker"
            assert "lg_app_cache.REGISTRY['eu'].conn" in leak.held_by
        finally:
            lock.release()
            t.join(5)

    def test_unreachable_stays_unreachable(self, server: HangUpServer, walks: set[int]) -> None:
        class Node:
            pass

        was_enabled = gc.isenabled()
        gc.disable()
        try:
            node = Node()
            node.me = node  # type: ignore[attr-defined]
            node.conn = hung_up(server)  # type: ignore[attr-defined]
            fd = node.conn.fileno()  # type: ignore[attr-defined]
            ref = weakref.ref(node)
            del node
            assert leak_of(fd).verdict == "unreachable"
            walks.clear()
            again = next(s for s in leakguard.snapshot().leaks if s.fd == fd)
            assert again.verdict == "unreachable" and id(ref().conn) not in walks  # type: ignore[union-attr]
        finally:
            obj = ref()
            if obj is not None:
                obj.conn.close()
            if was_enabled:
                gc.enable()


class TestWatcherCache:
    """The watcher walks the heap only for new or changed leak groups: an unchanged group keeps its diagnosis."""

    def test_unchanged_group_is_not_walked_again(self, server: HangUpServer, app_module: types.ModuleType) -> None:
        from structlog.testing import capture_logs

        from leakguard import watcher

        here = f"tests/{__name__.rsplit('.', 1)[-1]}.py"

        def open_a(name: str) -> None:  # only the module global keeps them (no local here): verdict forgotten
            app_module.REGISTRY[name] = app_module.Holder(socket.create_connection(server.address))

        def open_b(name: str) -> None:
            app_module.REGISTRY[name] = app_module.Holder(socket.create_connection(server.address))

        site_a, site_b = f"{here}:{this_line() - 5}", f"{here}:{this_line() - 2}"
        with capture_logs() as logs:
            leakguard.install(report_interval=0.05, integrations="none")
            try:
                w = watcher.current()
                assert w is not None
                cache = w.diagnoses

                def ticks(n: int) -> None:
                    start = w.ticks
                    assert wait_for(lambda: w.ticks >= start + n, timeout=30)

                def reported(site: str, count: int) -> bool:
                    return any(e.get("event") == "leakguard.leak" and e.get("site") == site and e.get("count") == count
                               and e.get("verdict") == "forgotten" for e in list(logs))  # fmt: skip

                open_a("a1")
                assert wait_for(lambda: reported(site_a, 1), timeout=30), [e for e in logs if "site" in e]
                reused = cache.reused
                ticks(5)
                assert cache.walks[site_a] == 1  # five more ticks took its verdict from the cache
                assert cache.reused >= reused + 5

                open_b("b1")
                assert wait_for(lambda: reported(site_b, 1), timeout=30), [e for e in logs if "site" in e]
                ticks(3)
                assert (cache.walks[site_a], cache.walks[site_b]) == (1, 1)  # only the new group was walked

                open_a("a2")  # group A changed: walked again (both its leaks), B still not
                assert wait_for(lambda: cache.walks[site_a] == 2, timeout=30)
                assert wait_for(lambda: reported(site_a, 2), timeout=30)
                ticks(3)
                assert (cache.walks[site_a], cache.walks[site_b]) == (2, 1)
            finally:
                leakguard.uninstall()
