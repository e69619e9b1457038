"""Concurrency and fork: no lost or phantom records, exact leak counts, no deadlock.

Sizes: the default run uses sizes that fit CI (2 cores, a few minutes for the
whole suite); ``LEAKGUARD_STRESS=1`` runs the sizes the hardening issue names
(32 threads x 5,000 connect/close).  Programs that fork or monkey-patch the
socket module (gevent) run in subprocesses so they cannot disturb the test
process; each prints one JSON line the test checks.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import leakguard
from leakguard import registry, watcher

from .helpers import HangUpServer, raised_nofile, this_line, wait_for

STRESS = os.environ.get("LEAKGUARD_STRESS") == "1"
HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))

CHURN_THREADS = 32
CHURN_PER_THREAD = 5000 if STRESS else 250
LEAK_THREADS = 20
LEAKS_PER_THREAD = 5
ASYNC_CONNECTIONS = 10_000

_LINGER0 = struct.pack("ii", 1, 0)  # close() sends RST: no TIME_WAIT pile-up from the churn


def run_script(source: str, timeout: float = 120, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run *source* in a fresh interpreter; its last stdout line is a JSON object."""
    # A real file, so that its lines count as application code in creation sites.
    with tempfile.NamedTemporaryFile("w", suffix="_lgprog.py", delete=False) as f:
        f.write(textwrap.dedent(source))
    try:
        proc = subprocess.run(
            [sys.executable, "-W", "ignore::DeprecationWarning", f.name],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
        )
    finally:
        os.unlink(f.name)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture
def watched() -> Iterator[None]:
    leakguard.install(integrations="none", report_interval=0.05, log_format="json")
    try:
        yield
    finally:
        leakguard.uninstall()


@pytest.mark.slow
class TestThreads:
    """32 threads churning connections and 20 threads leaking, with a watcher at 50 ms: every record exact."""

    def test_churn_and_leaks(
        self, hangup_server: HangUpServer, watched: None, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        hooked: list[Any] = []
        monkeypatch.setattr(threading, "excepthook", lambda args: hooked.append(args))
        w = watcher.current()
        assert w is not None
        ticks_before = w.ticks
        addr = hangup_server.address
        lost: list[tuple[int, str]] = []
        leaked: list[socket.socket] = []
        leaked_lock = threading.Lock()
        start = threading.Barrier(CHURN_THREADS + LEAK_THREADS)
        leak_line = 0

        def churn() -> None:
            start.wait(30)
            for _ in range(CHURN_PER_THREAD):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    rec = registry.get(s.fileno())
                    if rec is None or rec.ref() is not s:
                        lost.append((s.fileno(), repr(rec)))
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                    s.settimeout(10)
                    s.connect(addr)
                finally:
                    s.close()

        def leak() -> None:
            nonlocal leak_line
            start.wait(30)
            for _ in range(LEAKS_PER_THREAD):
                leak_line = this_line() + 1
                s = socket.create_connection(addr, timeout=10)
                with leaked_lock:
                    leaked.append(s)
                rec = registry.get(s.fileno())
                if rec is None or rec.ref() is not s:
                    lost.append((s.fileno(), repr(rec)))

        threads = [threading.Thread(target=churn) for _ in range(CHURN_THREADS)]
        threads += [threading.Thread(target=leak) for _ in range(LEAK_THREADS)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            assert not [t for t in threads if t.is_alive()], "deadlock: threads still running"
            assert lost == []
            fds = {s.fileno() for s in leaked}
            assert len(fds) == LEAK_THREADS * LEAKS_PER_THREAD

            # no phantom records: every live record is one of the sockets still open, with its own stack
            live = registry.live()
            assert set(live) == fds, sorted(set(live) ^ fds)
            for s in leaked:
                assert live[s.fileno()].ref() is s

            def our_leaks() -> list[leakguard.SocketInfo]:
                return [x for x in leakguard.snapshot().leaks if x.remote == f"127.0.0.1:{hangup_server.port}"]

            found = wait_for(lambda: len(our_leaks()) == len(fds) and our_leaks(), timeout=20)
            assert found, our_leaks()
            assert {x.fd for x in found} == fds
            for x in found:
                assert x.origin == "socket" and x.site is not None
                assert (os.path.abspath(x.site.file), x.site.line) == (HERE, leak_line)
            snap = leakguard.snapshot()
            assert len(snap.leaks) == len(fds)  # exact: nothing else in the process is judged leaked
            assert wait_for(lambda: w.ticks >= ticks_before + 3)
            assert w.alive
        finally:
            for s in leaked:
                s.close()
        assert hooked == []
        err = capsys.readouterr().err
        events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert events, err[-2000:]
        assert any(e.get("leaks") == len(fds) for e in events if "leaks" in e), events[-3:]


_ASYNC_SERVER = r"""
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
conns = []
async def main():
    async def handle(reader, writer):
        conns.append(writer)
    srv = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    print(srv.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).strip()
        if not line:
            break
        if line == b"count":
            print(len(conns), flush=True)
        elif line == b"close":
            for w in conns:
                w.close()
            conns.clear()
            print("closed", flush=True)
    srv.close()
asyncio.run(main())
"""


@pytest.fixture
def nofile_raised() -> Iterator[int]:
    with raised_nofile(ASYNC_CONNECTIONS + 1000) as hard:
        yield hard


@pytest.mark.slow
class TestAsyncio:
    """10,000 concurrent asyncio connections are each recorded with the coroutine line that opened them."""

    def test_ten_thousand(self, nofile_raised: int, installed_quiet: None) -> None:
        server = subprocess.Popen(
            [sys.executable, "-c", _ASYNC_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert server.stdin is not None and server.stdout is not None
        try:
            port = int(server.stdout.readline())

            def ask(cmd: str) -> str:
                assert server.stdin is not None and server.stdout is not None
                server.stdin.write(cmd + "\n")
                server.stdin.flush()
                return server.stdout.readline().strip()

            line = 0
            results: dict[str, Any] = {}

            async def main() -> None:
                nonlocal line
                writers: list[asyncio.StreamWriter] = []
                gate = asyncio.Semaphore(500)  # connects in flight; all stay open together

                async def one() -> None:
                    nonlocal line
                    async with gate:
                        line = this_line() + 1
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                        writers.append(writer)

                try:
                    await asyncio.gather(*(one() for _ in range(ASYNC_CONNECTIONS)))
                    assert len(writers) == ASYNC_CONNECTIONS
                    fds = {w.get_extra_info("socket").fileno() for w in writers}
                    for _ in range(200):
                        if int(ask("count")) == ASYNC_CONNECTIONS:
                            break
                        await asyncio.sleep(0.05)
                    snap = leakguard.snapshot()
                    ours = [s for s in snap.sockets if s.fd in fds]
                    results["established"] = sum(s.state == "ESTABLISHED" for s in ours)
                    results["sites"] = {(os.path.abspath(s.site.file), s.site.line) for s in ours if s.site}
                    results["untracked"] = sum(s.record is None for s in ours)
                    assert ask("close") == "closed"
                    for _ in range(400):
                        leaks = [s for s in leakguard.snapshot().leaks if s.fd in fds]
                        if len(leaks) == ASYNC_CONNECTIONS:
                            break
                        await asyncio.sleep(0.05)
                    results["leaks"] = len(leaks)
                    results["leak_sites"] = {s.site_str for s in leaks}
                finally:
                    for w in writers:
                        w.close()
                    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
                results["after_close"] = len([s for s in leakguard.snapshot().leaks if s.remote and s.remote.endswith(f":{port}")])

            asyncio.run(main())
        finally:
            if server.stdin:
                server.stdin.close()
            server.wait(30)
            if server.stdout:
                server.stdout.close()
        assert results["established"] == ASYNC_CONNECTIONS
        assert results["untracked"] == 0
        assert results["sites"] == {(HERE, line)}
        assert results["leaks"] == ASYNC_CONNECTIONS
        assert len(results["leak_sites"]) == 1 and next(iter(results["leak_sites"])).endswith(f"test_concurrency.py:{line}")
        assert results["after_close"] == 0


_GEVENT = r"""
import json, sys, time
ORDER = sys.argv[1]
INTEGRATIONS = sys.argv[2]
if ORDER == "patch-first":
    from gevent import monkey; monkey.patch_all()
import leakguard
if ORDER == "import-patch-install":
    from gevent import monkey; monkey.patch_all()
leakguard.install(integrations=INTEGRATIONS, report_interval=0.05, log_format="json")
if ORDER == "install-first":
    from gevent import monkey; monkey.patch_all()
import gevent, socket
from leakguard import registry

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(128)
addr = listener.getsockname()

def serve():
    while True:
        conn, _ = listener.accept()
        conn.close()

server = gevent.spawn(serve)
def churn():
    for _ in range(100):
        with socket.create_connection(addr) as s:
            s.sendall(b"x")
gevent.joinall([gevent.spawn(churn) for _ in range(10)], raise_error=True)
LINE = sys._getframe().f_lineno + 1
leaked = [socket.create_connection(addr) for _ in range(5)]
fds = {s.fileno() for s in leaked}
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    leaks = [x for x in leakguard.snapshot().leaks if x.fd in fds]
    if len(leaks) == len(fds):
        break
    gevent.sleep(0.02)
import threading
out = {
    "gevent_socket": socket.socket.__module__,
    "leaks": len(leaks),
    "origins": sorted({x.origin for x in leaks}),
    "sites": sorted({x.site_str for x in leaks if x.stack}),
    "line": LINE,
    "hook_errors": registry.stats()["hook_errors"],
}
for s in leaked:
    s.close()
server.kill()
listener.close()
leakguard.uninstall()
print(json.dumps(out))
"""


class TestGevent:
    """gevent.monkey.patch_all() before or after install(): nothing breaks, every socket is recorded.

    gevent's ``socket`` class does not derive from ``socket.socket``.  When
    ``patch_all()`` runs before leakguard is imported (gevent's own advice:
    patch first), the hook sits on gevent's class.  When leakguard was imported
    or installed first (``leakguard run`` installs before the program's first
    line), the gevent integration hooks gevent's class: at install when the patch
    came first, else when gevent announces it (``gevent.events``).  Without that
    integration such sockets are listed with origin ``unknown`` and no stack,
    like sockets made in C, and nothing breaks.
    """

    @pytest.mark.parametrize("order", ["patch-first", "import-patch-install", "install-first"])
    @pytest.mark.parametrize("integrations", ["gevent", "none"])
    def test_patch_all(self, order: str, integrations: str) -> None:
        pytest.importorskip("gevent")
        script = _GEVENT.replace("sys.argv[1]", repr(order)).replace("sys.argv[2]", repr(integrations))
        out = run_script(script)
        assert out["gevent_socket"].startswith("gevent")
        assert out["leaks"] == 5
        assert out["hook_errors"] == 0
        if integrations == "none" and order != "patch-first":
            assert out["origins"] == ["unknown"] and out["sites"] == []
            return
        assert out["origins"] == ["socket"]
        assert len(out["sites"]) == 1 and out["sites"][0].endswith(f"_lgprog.py:{out['line']}")

    def test_uninstall_restores_gevent_class(self) -> None:
        pytest.importorskip("gevent")
        out = run_script(_GEVENT_UNINSTALL)
        assert out == {"hooked": True, "restored": True, "subscribed_after": False, "works": True}


_GEVENT_UNINSTALL = r"""
import json
import leakguard
leakguard.install(integrations=["gevent"])
from gevent import monkey; monkey.patch_all()
import socket
from gevent import events
cls = socket.socket
hooked = "__init__" in vars(cls) and vars(cls)["__init__"].__module__ == "leakguard._sockets"
leakguard.uninstall()
restored = vars(cls)["__init__"].__module__.startswith("gevent")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    works = s.getsockname()[1] > 0
print(json.dumps({"hooked": hooked, "restored": restored,
                  "subscribed_after": any(getattr(f, "__module__", "") == "integrations.gevent" or "leakguard" in getattr(f, "__module__", "") for f in events.subscribers),
                  "works": works}))
"""


_FORK_WORKERS = r"""
import json, multiprocessing as mp, os, socket, sys, time
import leakguard
from leakguard import judge, watcher
from tests.helpers import HangUpServer

def leaks_of(fds, n):
    deadline = time.monotonic() + 10
    while True:
        snap = leakguard.snapshot()
        got = [x for x in snap.leaks if x.fd in fds]
        if len(got) >= n or time.monotonic() > deadline:
            return snap

def worker(n, addr, parent_fd, q):
    WORKER_LINE = sys._getframe().f_lineno + 1
    mine = [socket.create_connection(addr) for _ in range(n)]
    fds = {s.fileno() for s in mine} | {parent_fd}
    snap = leaks_of(fds, n + 1)
    w = watcher.current()
    q.put({
        "n": n,
        "pid": os.getpid(),
        "mine": sorted(s.fileno() for s in mine),
        "own_leaks": sorted(x.fd for x in snap.leaks if x.record is not None),
        "own_sites": sorted({x.site_str for x in snap.leaks if x.record is not None}),
        "line": WORKER_LINE,
        "parent_leak": [(x.origin, x.record is None) for x in snap.leaks if x.fd == parent_fd],
        "inherited": sorted(judge.inherited_fds(snap)),
        "watcher": w is not None and w.alive and w.pid == os.getpid(),
    })
    for s in mine:
        s.close()

if __name__ == "__main__":
    leakguard.install(integrations="none", report_interval=0.05, log_format="json")
    srv = HangUpServer()
    PARENT_LINE = sys._getframe().f_lineno + 1
    parent = socket.create_connection(srv.address)
    leaks_of({parent.fileno()}, 1)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    counts = [0, 1, 3, 0, 2]
    procs = [ctx.Process(target=worker, args=(n, srv.address, parent.fileno(), q)) for n in counts]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    snap = leakguard.snapshot()
    print(json.dumps({
        "workers": results,
        "exitcodes": [p.exitcode for p in procs],
        "parent_pid": os.getpid(),
        "parent_fd": parent.fileno(),
        "parent_line": PARENT_LINE,
        "parent_leaks": [(x.fd, x.site_str) for x in snap.leaks],
    }))
    parent.close()
    srv.close()
    leakguard.uninstall()
"""


_FORK_LOCKS = r"""
import json, os, socket, threading, time
import leakguard
from leakguard import _state, registry
import leakguard.metrics as metrics

leakguard.install(integrations="none", report_interval=0.01, log_format="json")
locks = {"registry._views_lock": registry._views_lock, "_state.lock": _state._state.lock, "metrics._lock": metrics._lock}
results = {}

def child_body():
    s = socket.socket()
    snap = leakguard.snapshot()
    ok = any(x.fd == s.fileno() and x.record is not None for x in snap.sockets)
    leakguard.install(integrations="none", report_interval=0.01, log_format="json")
    time.sleep(0.05)
    leakguard.uninstall()
    s.close()
    return ok

def fork_and_wait():
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if child_body() else 3)
        except BaseException:
            os._exit(4)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "deadlock"

for name, lock in locks.items():
    held, release = threading.Event(), threading.Event()
    def hold():
        with lock:
            held.set()
            release.wait(30)
    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    results[name] = fork_and_wait()
    release.set()
    t.join()

# forks while the watcher ticks every 10 ms and other threads open sockets
stop = threading.Event()
def churn():
    while not stop.is_set():
        socket.socket().close()
threads = [threading.Thread(target=churn) for _ in range(3)]
for t in threads:
    t.start()
results["busy"] = [fork_and_wait() for _ in range(25)]
stop.set()
for t in threads:
    t.join()
leakguard.uninstall()
print(json.dumps(results))
"""


@pytest.mark.slow
class TestFork:
    """Forked workers report only their own leaks; forking while a thread holds leakguard's locks never deadlocks."""

    def test_multiprocessing_workers(self) -> None:
        out = run_script(_FORK_WORKERS, timeout=180)
        assert out["exitcodes"] == [0] * 5
        by_n = sorted(out["workers"], key=lambda r: (r["n"], r["pid"]))
        assert [r["n"] for r in by_n] == [0, 0, 1, 2, 3]
        for r in by_n:
            assert r["pid"] != out["parent_pid"]
            assert r["own_leaks"] == r["mine"], r  # exactly its own, none of the parent's or siblings'
            if r["n"]:
                assert len(r["own_sites"]) == 1 and r["own_sites"][0].endswith(f"_lgprog.py:{r['line']}"), r
            # the parent's leak is visible (every CLOSE_WAIT socket is in leaks) but as inherited, not its own
            assert r["parent_leak"] == [["unknown", True]], r
            assert r["inherited"] == [out["parent_fd"]] or out["parent_fd"] in r["inherited"], r
            assert r["watcher"], r
        assert [fd for fd, _ in out["parent_leaks"]] == [out["parent_fd"]]
        assert out["parent_leaks"][0][1].endswith(f":{out['parent_line']}")

    def test_fork_while_locks_held(self) -> None:
        pytest.importorskip("prometheus_client")
        out = run_script(_FORK_LOCKS, timeout=240)
        assert out["registry._views_lock"] == 0
        assert out["_state.lock"] == 0
        assert out["metrics._lock"] == 0
        assert out["busy"] == [0] * 25
