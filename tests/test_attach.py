"""``leakguard attach PID``: leakguard run inside a live process, which carries on unchanged.

The target processes are also those of test_procview.py and test_doctor.py.
Every target is a real process started here and ended by pid; it never imports
leakguard itself.  Attach tests run the target on each pyenv interpreter
3.10-3.13 that exists (leakguard imported there pure Python from this
installation when the versions differ).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from .helpers import wait_for

TARGET = """\
import os, socket, sys, threading

HELD = []
LATER = []
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(16)
addr = srv.getsockname()
HELD.append(socket.create_connection(addr))
peer, _ = srv.accept()
peer.close()
lock = threading.Lock()
lock.acquire()
ready = threading.Event()


def worker():
    conn = socket.create_connection(addr)
    p, _ = srv.accept()
    p.close()
    ready.set()
    with lock:  # STUCK
        conn.close()


t = threading.Thread(target=worker, name="stuck-worker", daemon=True)
t.start()
ready.wait()
print("READY", os.getpid(), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "open":
        LATER.append(socket.create_connection(addr))  # LATER
        p, _ = srv.accept()
        p.close()
        print("OPENED", flush=True)
    elif cmd == "quit":
        break
lock.release()
t.join()
print("DONE", len(HELD), len(LATER), flush=True)
for s in HELD + LATER + [srv]:
    s.close()
sys.exit(3)
"""

PYENV = Path.home() / ".pyenv" / "versions"


def _interpreter(version: str) -> str | None:
    if version == "current":
        return sys.executable
    for d in sorted(PYENV.glob(f"{version}.*")) if PYENV.is_dir() else []:
        exe = d / "bin" / f"python{version}"
        if exe.exists():
            return str(exe)
    return None


def line_of(marker: str, source: str = TARGET) -> int:
    return next(i for i, ln in enumerate(source.splitlines(), 1) if marker in ln)


def leakguard_cli(*args: str, timeout: float = 90, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = kw.pop("env", None) or dict(os.environ)
    env.pop("LEAKGUARD_REPORT_INTERVAL", None)
    return subprocess.run(
        [sys.executable, "-m", "leakguard", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        r = leakguard_cli(*args, user=65534, cwd="/")
    except PermissionError:
        pytest.skip("this Python installation cannot be run by uid 65534")
    if "No module named" in r.stderr:
        pytest.skip("this installation is not readable by uid 65534")
    return r


class Target:
    """The plain program above, running; ``finish()`` checks it ends with its normal output and exit code."""

    def __init__(self, exe: str, cwd: Path, source: str = TARGET) -> None:
        path = cwd / "target.py"
        path.write_text(source)
        self.path = path
        self.proc = subprocess.Popen(
            [exe, "-W", "error", str(path)],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first.startswith("READY"), first + self.proc.stderr.read()  # type: ignore[union-attr]
        self.pid = self.proc.pid

    def send(self, cmd: str, expect: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == expect

    def finish(self, later: int = 0, reports: bool = False) -> None:
        """*reports*: leakguard's watcher runs there and writes its reports on stderr (nothing else may)."""
        out, err = self.proc.communicate("quit\n", timeout=20)
        if reports:
            assert err and all(" leakguard." in ln for ln in err.splitlines()), err
            err = ""
        assert (self.proc.returncode, out, err) == (3, f"DONE 1 {later}\n", "")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, 9)
        self.proc.communicate(timeout=10)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    t = Target(sys.executable, tmp_path)
    try:
        yield t
    finally:
        t.kill()


def _kernel_view(pid: int) -> dict[int, tuple[str, str | None, str | None]]:
    out = {}
    for c in psutil.Process(pid).net_connections("tcp"):
        fmt = (lambda a: f"[{a[0]}]:{a[1]}") if c.family == socket.AF_INET6 else (lambda a: f"{a[0]}:{a[1]}")
        out[c.fd] = (c.status, fmt(c.laddr) if c.laddr else None, fmt(c.raddr) if c.raddr else None)
    return out


# -- attach --------------------------------------------------------------------------------------------


def _need_gdb() -> None:
    if shutil.which("gdb") is None:
        pytest.skip("gdb is not installed")
    if sys.version_info >= (3, 14):
        pytest.skip("3.14+ attaches through sys.remote_exec")


def _versioned_target(version: str, tmp_path: Path, source: str = TARGET) -> Iterator[Target]:
    _need_gdb()
    exe = _interpreter(version)
    if exe is None:
        pytest.skip(f"no Python {version} interpreter under {PYENV}")
    t = Target(exe, tmp_path, source)
    try:
        yield t
    finally:
        t.kill()


@pytest.fixture(params=["current", "3.10", "3.12", "3.13"])
def any_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    yield from _versioned_target(request.param, tmp_path)


def attach_json(pid: int, *extra: str) -> dict[str, Any]:
    r = leakguard_cli("attach", str(pid), "--json", "--timeout", "60", *extra)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return json.loads(r.stdout)  # type: ignore[no-any-return]


class TestAttach:
    """``leakguard attach PID`` runs leakguard inside a live process; the process carries on unchanged."""

    def test_snapshot_inside_and_nothing_left(self, any_target: Target) -> None:
        first = attach_json(any_target.pid)
        assert first["counts"] == {"LISTEN": 1, "CLOSE_WAIT": 2}
        assert first["attach"]["already_imported"] is False and first["attach"]["installed"] is False
        kernel = _kernel_view(any_target.pid)
        assert {s["fd"]: (s["state"], s["local"], s["remote"]) for s in first["sockets"] if s["type"] == "tcp"} == kernel
        second = attach_json(any_target.pid)  # twice in a row: the first left no leakguard behind
        assert second["attach"]["already_imported"] is False
        assert second["counts"] == first["counts"]
        any_target.finish()

    def test_text_report(self, target: Target) -> None:
        _need_gdb()
        r = leakguard_cli("attach", str(target.pid), "--timeout", "60")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"attached to pid {target.pid} (Python ")
        assert "nothing left behind" in r.stdout
        assert "2 leaked" in r.stdout
        target.finish()

    def test_install_traces_later_sockets(self, any_target: Target) -> None:
        got = attach_json(any_target.pid, "--install")
        assert got["attach"]["installed"] is True
        any_target.send("open", "OPENED")
        again = attach_json(any_target.pid)
        assert again["attach"]["already_imported"] is True
        later = [s for s in again["leaks"] if s["stack"]]
        assert len(later) == 1, again["leaks"]
        assert later[0]["site"].endswith(f"target.py:{line_of('# LATER')}"), later[0]["stack"]
        assert len(again["leaks"]) == 3
        any_target.finish(later=1)


HOLDERS = """\
import os, socket, sys, threading

srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(16)
addr = srv.getsockname()
KEEP = {"cache": socket.create_connection(addr)}
srv.accept()[0].close()
lock = threading.Lock()
lock.acquire()
ready = threading.Event()


def worker():
    conn = socket.create_connection(addr)
    srv.accept()[0].close()
    ready.set()
    with lock:  # STUCK
        conn.close()


def main():
    mine = socket.create_connection(addr)
    srv.accept()[0].close()
    t = threading.Thread(target=worker, name="stuck-worker", daemon=True)
    t.start()
    ready.wait()
    before = set(globals())
    print("READY", os.getpid(), flush=True)
    line = sys.stdin.readline()  # MAIN
    lock.release()
    t.join()
    for s in (mine, KEEP["cache"], srv):
        s.close()
    print("DONE", line.strip(), sorted(set(globals()) - before), flush=True)
    sys.exit(3)


main()
"""


@pytest.fixture(params=["current", "3.10", "3.12", "3.13"])
def holders(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    yield from _versioned_target(request.param, tmp_path, HOLDERS)


class TestAttachDiagnosis:
    """Who holds each leak and where the code holding it is now, read inside a process that never imported
    leakguard: a module global, a thread stuck on a lock, the main thread blocked in a read (the thread the
    code is injected into: its injected frames are leakguard's, never the application's)."""

    def test_holders_and_stuck_thread(self, holders: Target) -> None:
        got = attach_json(holders.pid)
        assert got["counts"] == {"LISTEN": 1, "CLOSE_WAIT": 3}
        assert got["attach"]["thread"] == holders.pid  # the main thread took the call
        by_holder = {tuple(s["held_by"]): s for s in got["leaks"]}
        assert set(by_holder) == {
            ("__main__.KEEP['cache']",),
            ("thread 'stuck-worker' in worker() local conn",),
            ("thread 'MainThread' in main() local mine",),
        }, [s["held_by"] for s in got["leaks"]]
        kept = by_holder[("__main__.KEEP['cache']",)]
        assert (kept["verdict"], kept["in_use"]) == ("forgotten", None)
        stuck = by_holder[("thread 'stuck-worker' in worker() local conn",)]
        assert stuck["verdict"] == "in_use"
        assert {k: stuck["in_use"][k] for k in ("thread", "task", "line", "function")} == {
            "thread": "stuck-worker", "task": None, "line": line_of("# STUCK", HOLDERS), "function": "worker",
        }  # fmt: skip
        assert stuck["in_use"]["file"].endswith("target.py")
        main = by_holder[("thread 'MainThread' in main() local mine",)]
        assert main["verdict"] == "in_use"
        assert (main["in_use"]["thread"], main["in_use"]["line"], main["in_use"]["function"]) == (
            "MainThread", line_of("# MAIN", HOLDERS), "main",
        )  # fmt: skip
        assert main["in_use"]["now_at"] == f"target.py:{line_of('# MAIN', HOLDERS)} in main()"
        assert "__leakguard_attach__" not in json.dumps(got) and "<string>" not in json.dumps(got)
        holders.send("go", "DONE go []")  # __main__ gained no name
        out, err = holders.proc.communicate(timeout=20)
        assert (holders.proc.returncode, out, err) == (3, "", "")

    def test_text_names_holders_and_where_the_thread_is(self, holders: Target) -> None:
        r = leakguard_cli("attach", str(holders.pid), "--timeout", "60", "--sample", "0")
        assert r.returncode == 0, r.stderr
        held = " ".join(ln for ln in r.stdout.splitlines() if ln.startswith("  held by: "))
        used = " ".join(ln for ln in r.stdout.splitlines() if ln.startswith("  in use at: "))
        for holder in ("__main__.KEEP['cache']", "thread 'stuck-worker' in worker() local conn",
                       "thread 'MainThread' in main() local mine"):  # fmt: skip
            assert holder in held, r.stdout
        # the two in_use sockets form one group (same site, unknown: no creation stack): both places are named
        assert f"thread 'stuck-worker' at target.py:{line_of('# STUCK', HOLDERS)} in worker()" in used, r.stdout
        assert f"thread 'MainThread' at target.py:{line_of('# MAIN', HOLDERS)} in main()" in used, r.stdout
        holders.send("go", "DONE go []")


class TestAttachProjection:
    """With leakguard installed by an earlier attach and its watcher running, attach prints the watcher's fd-limit
    projection by creation site (from outside it could only name state and peer)."""

    def test_watcher_projection_names_the_site(self, target: Target) -> None:
        _need_gdb()
        assert attach_json(target.pid, "--install", "--report-interval", "0.1", "--sample", "0")["attach"]["installed"]
        later = 0
        got: dict[str, Any] = {}
        # more leaks from one line before each attach, until a tick has seen the growth: each attach is a
        # second or more, and the watcher's history (64 samples at 0.1 s) forgets growth older than that
        for _ in range(10):
            for _ in range(3):
                target.send("open", "OPENED")
                later += 1
            got = attach_json(target.pid, "--sample", "0")
            if got["fd_projection"]:
                break
        p = got["fd_projection"]
        assert p and p["by"] == "site", got.get("fd_projection")
        assert p["sources"][0]["source"].endswith(f"target.py:{line_of('# LATER')}")
        assert p["message"].startswith("fd limit reached in ~") and f"target.py:{line_of('# LATER')}" in p["message"]
        assert p["message"] in got["text"]  # the target's own report says it
        target.finish(later=later, reports=True)


ASYNCIO_SERVER = """\
import asyncio, os, socket, sys

HELD = []


async def handle(reader, writer):
    HELD.append(writer)  # kept: once the client hangs up, this end sits in CLOSE_WAIT


async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    socket.create_connection(("127.0.0.1", port)).close()
    while not HELD:
        await asyncio.sleep(0.01)
    done = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin, done.set)
    print("READY", os.getpid(), flush=True)
    await done.wait()  # the main thread idles in epoll_wait, no timer pending
    for w in HELD:
        w.close()
    srv.close()
    await srv.wait_closed()
    print("DONE 1 0", flush=True)
    sys.exit(3)


asyncio.run(main())
"""

GUNICORN_APP = """\
import socket

HELD = []
peer = socket.create_server(("127.0.0.1", 0))


def app(environ, start_response):
    c = socket.create_connection(peer.getsockname())  # LEAK
    a, _ = peer.accept()
    a.close()
    HELD.append(c)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


class TestAttachServers:
    """An idle asyncio server and a gunicorn worker are attached to (twice) and carry on."""

    def test_asyncio_server(self, tmp_path: Path) -> None:
        _need_gdb()
        t = Target(sys.executable, tmp_path, ASYNCIO_SERVER)
        try:
            for _ in range(2):
                got = attach_json(t.pid)
                assert got["counts"].get("CLOSE_WAIT") == 1 and got["counts"].get("LISTEN") == 1
                assert got["attach"]["already_imported"] is False
            t.finish()
        finally:
            t.kill()

    def test_gunicorn_worker(self, tmp_path: Path) -> None:
        import urllib.request

        _need_gdb()
        gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
        if gunicorn is None:
            pytest.skip("gunicorn is not installed")
        (tmp_path / "leakyapp.py").write_text(GUNICORN_APP)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen(
            [gunicorn, "-w", "1", "-b", f"127.0.0.1:{port}", "leakyapp:app"], cwd=tmp_path,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            def served() -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                        return r.read() == b"ok"
                except OSError:
                    return False

            assert wait_for(served, timeout=30)
            workers = psutil.Process(proc.pid).children()
            assert len(workers) == 1
            for _ in range(2):
                got = attach_json(workers[0].pid)
                assert got["counts"].get("CLOSE_WAIT") == 1, got["counts"]
            assert served()  # the worker still serves
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err


class TestAttachRefusals:
    """Each refusal is one line and leaves the target untouched."""

    def refused(self, *args: str, **kw: Any) -> str:
        r = leakguard_cli("attach", *args, **kw)
        assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
        assert r.stderr.startswith("leakguard attach: ") and r.stderr.count("\n") == 1, r.stderr
        return r.stderr[len("leakguard attach: ") :].strip()

    def test_no_such_process(self) -> None:
        assert self.refused("999999999") == "no such process: 999999999"

    def test_not_python(self) -> None:
        proc = subprocess.Popen(["sleep", "60"])
        try:
            assert self.refused(str(proc.pid)) == f"process {proc.pid} is not a Python process (sleep)"
        finally:
            proc.kill()
            proc.wait()

    def test_unsupported_version(self, tmp_path: Path) -> None:
        exe = _interpreter("3.9") or _interpreter("3.8")
        if exe is None:
            pytest.skip(f"no Python 3.9 or 3.8 under {PYENV}")
        proc = subprocess.Popen([exe, "-c", "import sys; print(1, flush=True); sys.stdin.read()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "1\n"
            assert self.refused(str(proc.pid)).startswith("unsupported Python version 3.")
        finally:
            proc.kill()
            proc.communicate(timeout=10)

    def test_gdb_missing(self, target: Target, tmp_path: Path) -> None:
        if sys.version_info >= (3, 14):
            pytest.skip("3.14+ needs no gdb")
        env = {**os.environ, "PATH": str(tmp_path)}
        assert self.refused(str(target.pid), env=env).startswith("gdb is missing")
        target.finish()

    def test_another_attach_in_progress(self, target: Target) -> None:
        from leakguard import attach

        lock = attach._Lock(target.pid)
        try:
            assert self.refused(str(target.pid)) == f"another attach to process {target.pid} is in progress"
        finally:
            lock.release()
        target.finish()

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the check as another user")
    def test_ptrace_not_permitted_for_another_user(self, target: Target) -> None:
        r = as_nobody("attach", str(target.pid))
        assert r.returncode == 1
        assert r.stderr == (
            f"leakguard attach: permission denied: process {target.pid} runs as uid 0; attach as root or as that user\n"
        )
        target.finish()

    def test_no_safe_point_in_a_busy_process(self, tmp_path: Path) -> None:
        """Every thread runs Python code or waits for the GIL: nothing is called in, the process goes on."""
        _need_gdb()
        proc = subprocess.Popen(
            # no system call in either loop (os.path.exists would release the GIL in stat(): a safe point);
            # the end comes by a signal, whose handler only sets a flag
            [sys.executable, "-c", "import signal, threading\n"
             "def spin():\n    while True: pass\n"
             "stop = []\n"
             "signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))\n"
             "threading.Thread(target=spin, daemon=True).start()\n"
             "print('x', flush=True)\n"
             "while not stop: sum(range(100))\n"
             "print('done', flush=True)\n"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "x\n"
            why = self.refused(str(proc.pid), "--timeout", "5")
            assert why.startswith(f"no thread of process {proc.pid} was at a safe point"), why
            assert why.endswith("nothing was run")
            os.kill(proc.pid, signal.SIGUSR1)
            out, _ = proc.communicate(timeout=20)
            assert (proc.returncode, out) == (0, "done\n")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)

    def test_report_interval_needs_install(self, target: Target) -> None:
        assert self.refused(str(target.pid), "--report-interval", "5").startswith("--report-interval needs --install")
        target.finish()

    def test_bad_report_interval(self, target: Target) -> None:
        assert self.refused(str(target.pid), "--install", "--report-interval", "soon").startswith("--report-interval: ")
        target.finish()


@pytest.mark.skipif(not hasattr(sys, "remote_exec"), reason="sys.remote_exec needs Python 3.14+ (none installed here)")
def test_attach_through_remote_exec(target: Target) -> None:
    got = attach_json(target.pid)
    assert got["attach"]["method"] == "sys.remote_exec"
    assert got["counts"] == {"LISTEN": 1, "CLOSE_WAIT": 2}
    target.finish()
