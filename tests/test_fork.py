"""Fork safety: each forked worker reports its own leaks with its own watcher; inherited sockets are not its leaks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .helpers import HangUpServer
from .test_host_unchanged import other_pythons, source_path
from .test_cli import LEAKGUARD, PY, Running, clean_env, json_events, line_of

PREFORK = textwrap.dedent(
    """\
    import multiprocessing, os, socket, threading, time
    from leakguard import watcher

    def hangup_server():
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        def serve():
            while True:
                try:
                    c, _ = lst.accept()
                except OSError:
                    return
                c.close()
        threading.Thread(target=serve, daemon=True).start()
        return lst

    def wait_ticks(n):
        w = watcher.current()
        start = w.ticks
        while w.ticks < start + n:
            time.sleep(0.01)

    KEEP = []

    def worker(i):
        lst = hangup_server()
        for _ in range(i + 1):
            conn = socket.create_connection(lst.getsockname())  # WORKER
            KEEP.append(conn)
            conn.recv(1)
        print("worker", os.getpid(), i + 1, flush=True)
        wait_ticks(2)

    if __name__ == "__main__":
        lst = hangup_server()
        parent = socket.create_connection(lst.getsockname())  # PARENT
        parent.recv(1)
        wait_ticks(1)
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=worker, args=(i,)) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        print("parent", os.getpid(), *[p.exitcode for p in procs], flush=True)
        wait_ticks(1)
    """
)

GUNICORN_APP = textwrap.dedent(
    """\
    import os, socket

    KEEP = []
    PEER = (os.environ["LEAK_HOST"], int(os.environ["LEAK_PORT"]))

    def app(environ, start_response):
        KEEP.append(socket.create_connection(PEER))  # LEAK
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    """
)


def by_pid(events: list[dict[str, Any]], name: str) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if e.get("event") == name:
            out.setdefault(e["pid"], []).append(e)
    return out


class TestMultiprocessingFork:
    """multiprocessing workers (fork) each report their own leaks; the parent's are not reported twice."""

    def test_per_worker_reports(self, tmp_path: Path) -> None:
        prog = tmp_path / "prefork.py"
        prog.write_text(PREFORK)
        r = subprocess.run(
            [LEAKGUARD, "run", "--report-interval", "0.2", "--log-format", "json", "--", PY, str(prog)],
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120,
        )
        assert r.returncode == 0, r.stderr
        out = [line.split() for line in r.stdout.splitlines()]
        workers = {int(w[1]): int(w[2]) for w in out if w[0] == "worker"}
        parent_line = next(p for p in out if p[0] == "parent")
        parent, exitcodes = int(parent_line[1]), parent_line[2:]
        assert exitcodes == ["0", "0"] and len(workers) == 2
        events = json_events(r.stderr)
        leaks, summaries = by_pid(events, "leakguard.leak"), by_pid(events, "leakguard.summary")
        worker_site, parent_site = f"prefork.py:{line_of(PREFORK, '# WORKER')}", f"prefork.py:{line_of(PREFORK, '# PARENT')}"
        assert {e["site"] for e in leaks[parent]} == {parent_site}
        for pid, n in workers.items():
            assert {e["site"] for e in leaks[pid]} == {worker_site}, leaks[pid]  # never the parent's line
            verdicts = {e.get("verdict") for e in leaks[pid]}  # a group per site and verdict (held by a local or KEEP)
            assert sum(max(e["count"] for e in leaks[pid] if e.get("verdict") == v) for v in verdicts) == n  # its own only
            last = summaries[pid][-1]
            assert last["leaks"] == n
            assert last["inherited_leaks"] == 1  # the parent's CLOSE_WAIT socket, counted, not reported
            assert last["inherited"] >= 2  # and the parent's listener
        assert all(s["inherited"] == 0 for s in summaries[parent])


@pytest.mark.skipif(shutil.which("gunicorn", path=os.path.dirname(sys.executable)) is None, reason="gunicorn missing")
class TestGunicornPrefork:
    """Each gunicorn worker reports the leaks of the requests it served, at the application's line."""

    def test_per_worker_reports(self, tmp_path: Path) -> None:
        (tmp_path / "leakyapp.py").write_text(GUNICORN_APP)
        gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
        site = f"leakyapp.py:{line_of(GUNICORN_APP, '# LEAK')}"
        with HangUpServer() as peer:
            env = clean_env(LEAK_HOST=peer.host, LEAK_PORT=str(peer.port))
            cmd = [LEAKGUARD, "run", "--report-interval", "0.2", "--log-format", "json", "--",
                   gunicorn, "-w", "2", "-b", "127.0.0.1:0", "--chdir", str(tmp_path), "leakyapp:app"]
            with Running(cmd, tmp_path, env) as run:
                listening = run.wait_for(
                    lambda: [m for ln in run.lines if (m := re.search(r"Listening at: http://([\d.]+):(\d+)", ln))]
                )
                assert listening, run.lines
                host, port = listening[0].group(1), listening[0].group(2)
                assert run.wait_for(lambda: sum("Booting worker" in ln for ln in run.lines) >= 2), run.lines
                served: dict[int, int] = {}
                for _ in range(60):
                    with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as resp:
                        pid = int(resp.read())
                    served[pid] = served.get(pid, 0) + 1
                    if len(served) == 2 and min(served.values()) >= 2:
                        break

                def reported() -> bool:
                    leaks = by_pid(run.events(), "leakguard.leak")
                    return all(
                        any(e["site"] == site and e["count"] == n for e in leaks.get(pid, [])) for pid, n in served.items()
                    )

                assert run.wait_for(reported), (served, by_pid(run.events(), "leakguard.leak"))
                leaks = by_pid(run.events(), "leakguard.leak")
                for pid, n in served.items():
                    assert all(e["site"] == site and e["count"] <= n for e in leaks[pid])
                    assert all(e["state"] == "CLOSE_WAIT" and e["peer"] == f"{peer.host}:{peer.port}" for e in leaks[pid])
                master = set(by_pid(run.events(), "leakguard.summary")) - set(served)
                assert master and not any(pid in leaks for pid in master)  # the arbiter leaked nothing


# --------------------------------------------------------------------------- one at-fork handler, threads gone


def _pure_path(tmp_path: Path) -> str:
    """PYTHONPATH for another interpreter: this checkout and the pure-Python libraries the scripts use."""
    import packaging
    import prometheus_client
    import urllib3
    import wrapt  # pure Python where its extension was built for another interpreter

    path = source_path(tmp_path)
    for mod in (packaging, prometheus_client, urllib3, wrapt):
        link = tmp_path / "deps" / mod.__name__
        if not link.exists():
            link.symlink_to(Path(mod.__file__).parent)
    return path


def _run(tmp_path: Path, code: str, python: str = sys.executable, path: str | None = None) -> str:
    """*code* in a fresh interpreter under ``-W error``, outside the repository; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKGUARD_")}
    if path is not None:
        code = f"import sys; sys.path[:0] = {path.split(os.pathsep)!r}\n" + code
    proc = subprocess.run(
        [python, "-W", "error", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    other = [ln for ln in proc.stderr.splitlines() if not ln.startswith('{"')]  # leakguard's JSON reports only
    assert other == [], proc.stderr[-4000:]
    return proc.stdout


#: Shared by the scripts: what the kernel says (the count 3.12+'s "multi-threaded" warning reads).
_OS_THREADS = """
import os, sys, time, warnings
def os_threads():
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[17])
counted = []
# Registered before leakguard is imported: at-fork "before" hooks run last-registered first, so this
# one runs after leakguard's and sees what the fork itself sees.
os.register_at_fork(before=lambda: counted.append(os_threads()))
def settle(n, what):
    deadline = time.monotonic() + 30
    while os_threads() != n:
        assert time.monotonic() < deadline, (what, os_threads())
        time.sleep(0.005)
def fork_quietly(child):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        pid = os.fork()
    if pid == 0:
        try:
            code = child()
        except BaseException:
            code = 5
        os._exit(code)
    status = os.waitpid(pid, 0)[1]
    assert status == 0, os.waitstatus_to_exitcode(status)
    assert [str(x.message) for x in got] == [], [str(x.message) for x in got]
"""

_ALL_THREADS = _OS_THREADS + """
import urllib.request
import urllib3
import leakguard
from leakguard import _state, metrics, watcher
from leakguard.integrations import _pools

calls = []
for name in _state.FORK_ORDER:  # the order the child resets them in
    mod = sys.modules[name]
    original = mod.after_fork_in_child
    def spy(original=original, name=name):
        calls.append(name)
        original()
    mod.after_fork_in_child = spy

# A long interval: every thread of ours is idle at each fork (the test below forks in a tick).
leakguard.install(
    integrations="urllib3", report_interval=3600, metrics_port=0, checkout_threshold=3600, log_format="json"
)
pool = urllib3.HTTPConnectionPool("127.0.0.1", 9)
conn = pool._get_conn()  # checked out: the checkout timer watches it
w = watcher.current()
deadline = time.monotonic() + 30
while not w.alive or _pools._timer[0] is None:
    assert time.monotonic() < deadline
    time.sleep(0.005)
host, port = metrics.server_address()
def scrape():
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=20) as r:
        return r.read().decode()
assert "leakguard_sockets" in scrape()
import threading
assert threading.active_count() == 1, threading.enumerate()  # none of them is a threading.Thread
settle(4, "main, watcher, metrics server, checkout timer")

def child():
    if calls != list(_state.FORK_ORDER):
        return 6
    if metrics.server_address() is not None or _pools._timer[0] is not None or _pools._watched:
        return 3  # the parent's port, the parent's checkouts
    cw = watcher.current()
    if cw is None or cw is w:
        return 4
    return 0 if cw.alive else 7  # the child's own watcher runs

for i in range(5):
    fork_quietly(child)
    assert w.alive  # the parent's watcher again
    assert "leakguard_sockets" in scrape()  # its metrics server
    assert _pools._timer[0] is not None and _pools._timer[0].thread.is_alive()  # its checkout timer
    settle(4, "the parent's threads again")
assert counted == [1] * 5, counted  # each fork saw one thread: leakguard's had ended
assert calls == []  # the parent resets nothing
pool._put_conn(conn)
leakguard.uninstall()
settle(1, "uninstall ends them all")
print("ok")
"""

_REPORT_IN_PROGRESS = _OS_THREADS + """
import socket
import leakguard
from leakguard import watcher

lst = socket.create_server(("127.0.0.1", 0), backlog=100)
KEEP = []
for _ in range(100):
    KEEP.append(socket.create_connection(lst.getsockname()))
    lst.accept()[0].close()  # the peer hangs up: a CLOSE_WAIT leak, reported at every tick
leakguard.install(integrations="none", report_interval=0.01, log_format="json")
w = watcher.current()
while w.ticks < 3:
    time.sleep(0.005)
busy = []
os.register_at_fork(before=lambda: busy.append(w._busy and not w._writing))  # runs before leakguard's
settle(2, "main and watcher")
for i in range(20):
    deadline = time.monotonic() + 30
    while not (w._busy and not w._writing):  # a tick in progress, computing its report
        assert time.monotonic() < deadline
    fork_quietly(lambda: 0)
    start = w.ticks
    while w.ticks < start + 1:  # the parent's watcher goes on
        time.sleep(0.001)
assert counted == [1] * 20, counted
assert sum(busy) >= 5, busy  # forks found a report being computed
leakguard.uninstall()
print("ok")
"""


_LONG_TICK = _OS_THREADS + """
import gc, socket, weakref
import leakguard
from leakguard import watcher

refs = []  # weak: no path to the sockets for the walk to find
gc.disable()  # the leaks are kept by reference cycles only: the diagnosis walks the whole heap
lst = socket.create_server(("127.0.0.1", 0), backlog=100)
def leak(n):
    for _ in range(n):
        s = socket.create_connection(lst.getsockname())
        lst.accept()[0].close()  # the peer hangs up: CLOSE_WAIT
        cycle = [s]
        cycle.append(cycle)
        refs.append(weakref.ref(s))
leak(20)
HEAP = [[i] for i in range(1_000_000)]  # what the walk reads through: it lasts seconds
leakguard.install(integrations="none", report_interval=0.01, log_format="json")
w = watcher.current()

def walking():
    \"\"\"The watcher thread's frame of the diagnosis walk in progress, or None.\"\"\"
    t = w._thread
    f = sys._current_frames().get(t.ident) if t is not None else None
    while f is not None:
        if f.f_code.co_name == "_run" and f.f_globals.get("__name__") == "leakguard.diagnose":
            return f
        f = f.f_back
    return None

for walk_no in range(2):
    deadline = time.monotonic() + 120
    while (walk := walking()) is None:
        assert time.monotonic() < deadline, "no walk"
        time.sleep(0.001)
    ticks = w.ticks
    for i in range(3):
        pid = os.fork()
        if pid == 0:
            os._exit(0 if watcher.current() is not w else 3)
        assert os.waitpid(pid, 0)[1] == 0
        # The fork returned while the walk it found went on: it did not wait for the tick.
        assert walking() is walk and w.ticks == ticks, (walk_no, i, walking(), w.ticks, ticks)
    deadline = time.monotonic() + 120
    while w.ticks == ticks:  # and that tick completes
        assert time.monotonic() < deadline, "the tick never completed"
        time.sleep(0.01)
    leak(1)  # a changed group of leaks: the next tick walks again
leakguard.uninstall()
for r in refs:
    r().close()
print("ok")
"""


class TestForkDuringALongTick:
    """A fork never waits for leakguard's work: during a diagnosis that walks a big heap for
    seconds (an uninterruptible step of a tick), forks return while the walk goes on, and the
    tick completes after them.  The Python walk (another interpreter, pure Python): the compiled
    one holds the GIL throughout, so no thread of the host, forking or not, runs meanwhile."""

    @pytest.mark.parametrize("version", ["3.12", "3.13"])
    def test_forks_return_during_the_walk(self, tmp_path: Path, version: str) -> None:
        python = dict(other_pythons()).get(version)
        if python is None:
            pytest.skip(f"no Python {version} under ~/.pyenv/versions")
        assert _run(tmp_path, _LONG_TICK, python, _pure_path(tmp_path)).split() == ["ok"]


class TestOneForkHandler:
    """One at-fork handler: before a fork, leakguard's threads (watcher, metrics server, checkout
    timer) end and the fork sees one thread; the child resets each module in FORK_ORDER; the parent
    gets its threads back."""

    def test_one_registration(self, tmp_path: Path) -> None:
        code = textwrap.dedent(
            """
            import os, pkgutil, importlib, sys
            made = []
            real = os.register_at_fork
            def register(**kw):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller.startswith("leakguard"):  # not the standard library's own (logging, random, ...)
                    made.append((caller, sorted(kw)))
                real(**kw)
            os.register_at_fork = register
            import leakguard, leakguard.integrations
            for m in pkgutil.iter_modules(leakguard.__path__):
                if m.name != "__main__":  # that one runs the command line
                    importlib.import_module("leakguard." + m.name)
            importlib.import_module("leakguard.integrations._pools")
            print(made)
            """
        )
        assert _run(tmp_path, code).strip() == "[('leakguard._state', ['after_in_child', 'after_in_parent', 'before'])]"

    def test_all_threads(self, tmp_path: Path) -> None:
        assert _run(tmp_path, _ALL_THREADS).split() == ["ok"]

    def test_report_in_progress(self, tmp_path: Path) -> None:
        """A fork while the watcher computes or writes a report waits for it to end at its next step
        (or once the write is done): no thread left."""
        assert _run(tmp_path, _REPORT_IN_PROGRESS).split() == ["ok"]

    @pytest.mark.parametrize("version", ["3.12", "3.13"])
    @pytest.mark.parametrize("script", ["all_threads", "report_in_progress"])
    def test_no_multithreaded_warning(self, tmp_path: Path, version: str, script: str) -> None:
        """Where the warning exists (3.12+), pure Python: recorded warnings around each fork stay empty."""
        python = dict(other_pythons()).get(version)
        if python is None:
            pytest.skip(f"no Python {version} under ~/.pyenv/versions")
        code = _ALL_THREADS if script == "all_threads" else _REPORT_IN_PROGRESS
        assert _run(tmp_path, code, python, _pure_path(tmp_path)).split() == ["ok"]


_GEVENT = """
import os, subprocess, sys, threading, time, urllib.request
import urllib3
import leakguard
from leakguard import metrics, watcher
from leakguard.integrations import _pools
leakguard.install(integrations="urllib3", report_interval=0.01, metrics_port=0, checkout_threshold=3600,
                  log_format="json")
pool = urllib3.HTTPConnectionPool("127.0.0.1", 9)
conn = pool._get_conn()
w = watcher.current()
while w.ticks < 2 or _pools._timer[0] is None:
    time.sleep(0.005)
import warnings
from gevent import monkey
# urllib3 imported ssl before the patch: gevent's own warning about this script's import order
warnings.filterwarnings("ignore", category=monkey.MonkeyPatchWarning)
monkey.patch_all()
host, port = metrics.server_address()
def scrape():
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=20) as r:
        return r.read().decode()
assert "leakguard_sockets" in scrape()
start = w.ticks
while w.ticks < start + 2:  # real threads: they run while this one sleeps in gevent's hub
    time.sleep(0.01)
assert threading.active_count() == 1, threading.enumerate()
pid = os.fork()
if pid == 0:
    os._exit(0 if metrics.server_address() is None else 3)
assert os.waitpid(pid, 0)[1] == 0
assert "leakguard_sockets" in scrape()  # the server thread started again, with the original _thread
assert _pools._timer[0] is not None and _pools._timer[0].thread.is_alive()
pool._put_conn(conn)
print("ok", flush=True)
"""


class TestGeventAfterInstall:
    """gevent's patch_all() after install() (as under ``leakguard run``): the metrics server and the
    checkout timer stay real threads, serve and fork as before, and exit prints nothing (no KeyError
    from threading._delete)."""

    def test_patch_all_after_install(self, tmp_path: Path) -> None:
        pytest.importorskip("gevent")
        assert _run(tmp_path, _GEVENT).split() == ["ok"]
