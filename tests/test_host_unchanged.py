"""leakguard never changes the host: descriptor flags, exceptions, forks, descriptors it does not own.

Each class is one defect a hostile review found (issue 14); each test failed before its fix.
Programs whose global state matters (``socket.setdefaulttimeout``, fork, gc thresholds) run
in a fresh interpreter, from a directory that is not the repository root, under ``-W error``.
"""

from __future__ import annotations

import _socket
import io
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import leakguard
from leakguard import registry



def run_py(tmp_path: Path, code: str, *, python: str = sys.executable, timeout: float = 120) -> str:
    """Run *code* in a fresh interpreter under ``-W error``; its stdout (it must exit 0).

    Its stderr may hold leakguard's JSON report lines and nothing else.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKGUARD_")}
    proc = subprocess.run(
        [python, "-W", "error", "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    other = [line for line in proc.stderr.splitlines() if not line.startswith('{"')]
    assert other == [], proc.stderr
    return proc.stdout


# Shared by the flag tests: blocking sockets leakguard never saw created (made before install()),
# a TCP pair and a UNIX pair, while socket.setdefaulttimeout() is set.
_BLOCKING_SOCKETS = """
import fcntl, os, socket, threading, time
socket.setdefaulttimeout(5.0)
lst = socket.create_server(("127.0.0.1", 0))
tcp = socket.create_connection(lst.getsockname())
tcp_peer, _ = lst.accept()
unix, unix_peer = socket.socketpair()
HOST = [tcp, unix]
PEERS = {tcp: tcp_peer, unix: unix_peer}
for s in HOST:
    s.settimeout(None)  # blocking: O_NONBLOCK cleared
FLAGS = {s.fileno(): fcntl.fcntl(s.fileno(), fcntl.F_GETFL) for s in HOST}

def check_blocking(where):
    for s in HOST:
        now = fcntl.fcntl(s.fileno(), fcntl.F_GETFL)
        assert now == FLAGS[s.fileno()], (where, s, oct(FLAGS[s.fileno()]), oct(now))
        # A blocking recv() waits for the peer's data instead of raising BlockingIOError.
        t = threading.Timer(0.2, PEERS[s].sendall, (b"x",))
        t.start()
        assert s.recv(1) == b"x", where
        t.join()

def close_all():
    for s in [lst, *HOST, *PEERS.values()]:
        s.close()
"""


class TestDescriptorFlags:
    """snapshot() and the watcher never change a descriptor's flags, even under socket.setdefaulttimeout()."""

    def test_snapshot_keeps_blocking_sockets_blocking(self, tmp_path: Path) -> None:
        code = _BLOCKING_SOCKETS + textwrap.dedent(
            """
            import leakguard
            leakguard.install(integrations="none")
            snap = leakguard.snapshot()
            assert {s.fileno() for s in HOST} <= {i.fd for i in snap.sockets}, snap.sockets
            assert all(i.origin == "unknown" for i in snap.sockets if i.fd in FLAGS)
            check_blocking("snapshot")
            leakguard.snapshot()  # not installed: the same
            leakguard.uninstall()
            leakguard.snapshot()
            check_blocking("snapshot without install")
            close_all()
            print("ok")
            """
        )
        assert run_py(tmp_path, code).split() == ["ok"]

    def test_watcher_keeps_blocking_sockets_blocking(self, tmp_path: Path) -> None:
        code = _BLOCKING_SOCKETS + textwrap.dedent(
            """
            import leakguard
            from leakguard import watcher
            leakguard.install(integrations="none", report_interval=0.01, log_format="json")
            w = watcher.current()
            while w.ticks < 3:
                time.sleep(0.01)
            leakguard.uninstall()
            check_blocking("watcher")
            close_all()
            print("ok")
            """
        )
        assert run_py(tmp_path, code).split() == ["ok"]

    def test_forked_child_keeps_parents_sockets_blocking(self, tmp_path: Path) -> None:
        """The flag lives on the open file description: a child's snapshot would change the parent's socket."""
        code = _BLOCKING_SOCKETS + textwrap.dedent(
            """
            import leakguard
            leakguard.install(integrations="none")
            pid = os.fork()
            if pid == 0:
                try:
                    leakguard.snapshot()
                    leakguard.install(integrations="none", report_interval=0.01, log_format="json")
                    from leakguard import watcher
                    w = watcher.current()
                    while w.ticks < 3:
                        time.sleep(0.01)
                finally:
                    os._exit(0)
            assert os.waitpid(pid, 0)[1] == 0
            check_blocking("after the child's snapshot and watcher")
            close_all()
            print("ok")
            """
        )
        assert run_py(tmp_path, code).split() == ["ok"]


_OPENING_DURING_SNAPSHOT = """
import gc, socket, threading
import leakguard
leakguard.install(integrations="none")
base = [socket.socket() for _ in range(100)]  # a table big enough to be copied for a while
OPENED = []

def open_one():
    if len(OPENED) < 2000:
        OPENED.append(socket.socket())

def snapshots(n):
    for _ in range(n):
        leakguard.snapshot()
        leakguard.snapshot().to_dict()
"""


class TestSnapshotWhileSocketsOpen:
    """snapshot() never raises when a gc callback or another thread opens sockets meanwhile.

    The table is copied in one step that runs no Python code: copying it item by
    item allocated a tuple per item, and a collection triggered by one ran a gc
    callback (or a finalizer) that opened a socket, changing the table's size.
    """

    def test_gc_callback_opens_sockets(self, tmp_path: Path) -> None:
        code = _OPENING_DURING_SNAPSHOT + textwrap.dedent(
            """
            gc.callbacks.append(lambda phase, info: open_one() if phase == "start" else None)
            gc.set_threshold(1)  # a collection at nearly every allocation: inside snapshot's loops too
            snapshots(3)
            gc.set_threshold(700)
            gc.callbacks.clear()
            assert OPENED
            for s in base + OPENED:
                s.close()
            leakguard.uninstall()
            print("ok")
            """
        )
        assert run_py(tmp_path, code).split() == ["ok"]

    def test_threads_open_and_close_sockets(self, tmp_path: Path) -> None:
        code = _OPENING_DURING_SNAPSHOT + textwrap.dedent(
            """
            import sys
            sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
            stop = threading.Event()
            def churn():
                while not stop.is_set():
                    socket.socket().close()
            threads = [threading.Thread(target=churn) for _ in range(3)]
            for t in threads:
                t.start()
            try:
                snapshots(100)
            finally:
                stop.set()
                for t in threads:
                    t.join()
            for s in base:
                s.close()
            leakguard.uninstall()
            print("ok")
            """
        )
        assert run_py(tmp_path, code).split() == ["ok"]


class _Guarded(socket.socket):
    """A socket subclass whose fileno() refuses once it is closed (as some wrappers do)."""

    def fileno(self) -> int:
        if self._closed:  # type: ignore[attr-defined]
            raise OSError("closed")
        return super().fileno()


class _NoFileno(socket.socket):
    """A socket subclass that hides its descriptor altogether."""

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


@pytest.mark.usefixtures("installed_quiet", "hot_path")
class TestSubclassFileno:
    """A subclass's fileno() never costs a record: leakguard reads the descriptor of the C socket itself."""

    def test_stale_subclass_object_on_the_descriptor(self) -> None:
        old = _Guarded()
        fd = old.fileno()
        assert registry.get(fd) is not None
        old.close()  # the object stays referenced; its record is stale, and its fileno() raises
        raw = _socket.socket()  # the lowest free number: the one old had
        assert raw.fileno() == fd
        new = socket.socket(fileno=raw.detach())  # the inherit path (as ssl's wrap_socket)
        try:
            rec = registry.get(fd)
            assert rec is not None and rec.ref is not None and rec.ref() is new
            assert [s.origin for s in leakguard.snapshot().sockets if s.fd == fd] == ["socket"]
        finally:
            new.close()
        del old

    def test_subclass_without_fileno(self) -> None:
        s = _NoFileno()
        try:
            fd = _socket.socket.fileno(s)
            rec = registry.get(fd)
            assert rec is not None and rec.ref is not None and rec.ref() is s
            twin = _NoFileno(fileno=os.dup(fd))  # the inherit path too
            try:
                twin_rec = registry.get(_socket.socket.fileno(twin))
                assert twin_rec is not None and twin_rec.ref is not None and twin_rec.ref() is twin
            finally:
                twin.close()
        finally:
            s.close()


_RESOURCE_WARNING_SUITE = '''
import gc, re, socket, sys, warnings

def drop():
    s = socket.socket()
    del s  # DROP

def drop_cycle():
    box = [socket.socket()]
    box.append(box)  # freed only by the collector
    del box
    gc.collect()  # COLLECT

def seen(record):
    return [
        (w.category.__name__, re.sub(r"fd=\\d+", "fd=N", str(w.message)), w.filename, w.lineno, w.source is not None)
        for w in record
    ]

def test_recorded():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        drop()
        drop_cycle()
    print("\\nRECORDED", seen(record))
    assert [w.filename for w in record] == [__file__, __file__]

def test_filter_by_module():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=ResourceWarning, module=__name__)
        drop()
    print("\\nBY MODULE", seen(record))
    assert record == []

def test_once_per_location():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for _ in range(3):
            drop()
    print("\\nONCE", seen(record))
    assert len(record) == 1

def test_as_error():
    hooked = []
    old, sys.unraisablehook = sys.unraisablehook, hooked.append
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            drop()
    finally:
        sys.unraisablehook = old
    print("\\nUNRAISABLE", [(type(h.exc_value).__name__, re.sub(r"fd=\\d+", "fd=N", repr(h.object)), h.err_msg,
                         h.exc_traceback.tb_frame.f_code.co_name if h.exc_traceback else None) for h in hooked])
    assert len(hooked) == 1 and isinstance(hooked[0].object, socket.socket)
'''


class TestResourceWarningUnchanged:
    """With the plugin on, a socket's ResourceWarning keeps its category, message, file, line and module:
    filters by module, once-per-location and -W error::ResourceWarning behave as without it."""

    def _run(self, pytester: pytest.Pytester, *args: str) -> list[str]:
        pytester.makepyfile(test_rw=_RESOURCE_WARNING_SUITE)
        result = pytester.runpytest_subprocess(
            "-p", "no:hypothesispytest", "-p", "no:cacheprovider", "-s", "-q", "-W", "error::ResourceWarning", *args,
            timeout=120,
        )
        result.assert_outcomes(passed=4)
        keys = ("RECORDED", "BY MODULE", "ONCE", "UNRAISABLE")
        return [line for line in result.outlines if line.startswith(keys)]

    def test_same_warnings_with_and_without_the_plugin(self, pytester: pytest.Pytester) -> None:
        plain = self._run(pytester)
        assert len(plain) == 4 and "test_rw.py" in plain[0]
        with_plugin = self._run(pytester, "--leakguard", "--leakguard-gc=warn")
        assert with_plugin == plain


_EPOLL_REUSED = """
import os, select, time
import leakguard
from leakguard import kernel, watcher
if kernel._scan is None:
    print("skip: no compiled scan, no epoll set")
    raise SystemExit(0)
leakguard.install(integrations="none", report_interval=0.2, log_format="json")
w = watcher.current()
AFTER_INSTALL()
while w._cache.ep is None or w.ticks < 2:
    time.sleep(0.01)
ours = w._cache.ep
ours = ours if isinstance(ours, int) else ours.fileno()
t0 = w.ticks
while w.ticks == t0:  # right after a tick: the next is 0.2 s away (else it may take the number again)
    time.sleep(0.001)
os.closerange(3, 4096)  # daemon style: the host closes every descriptor it did not open on purpose
held = []
while ours not in [fd for f in held for fd in (f if isinstance(f, tuple) else (f.fileno(),))]:
    held.append(REOPEN())  # until the host's new file gets the number leakguard's epoll set had
    assert len(held) < 100, held
start = w.ticks
while w.ticks < start + 3:  # the watcher keeps scanning meanwhile
    time.sleep(0.01)
CHECK_DURING()
leakguard.uninstall()
os.fstat(ours)  # still open: leakguard closed nothing of the host's
CHECK_AFTER()
print("ok")
"""


class TestDescriptorsLeakguardDoesNotOwn:
    """After the host's os.closerange() reuses the number of leakguard's epoll descriptor, leakguard
    neither closes nor uses the host's file there (a pipe, or the host's own epoll set)."""

    def test_host_pipe_on_the_number(self, tmp_path: Path) -> None:
        code = _EPOLL_REUSED.replace("REOPEN()", "os.pipe()").replace("AFTER_INSTALL()", "pass")
        code = code.replace("CHECK_DURING()", "pass").replace(
            "CHECK_AFTER()",
            "pair = next(f for f in held if ours in f)\n"
            "os.write(pair[1], b'x'); assert os.read(pair[0], 1) == b'x'",
        )
        out = run_py(tmp_path, code)
        if out.startswith("skip:"):
            pytest.skip(out)
        assert out.split() == ["ok"]

    def test_host_epoll_on_the_number(self, tmp_path: Path) -> None:
        code = (
            _EPOLL_REUSED.replace("REOPEN()", "select.epoll()")
            .replace(
                "AFTER_INSTALL()",  # settled TCP sockets leakguard tracks: the scan registers those in its set
                "import socket\n"
                "lst = socket.create_server(('127.0.0.1', 0))\n"
                "TRACKED = [(socket.create_connection(lst.getsockname()), lst.accept()[0]) for _ in range(3)]",
            )
            .replace(
                "os.closerange(3, 4096)",
                "keep = {s.fileno() for p in TRACKED for s in p} | {lst.fileno()}\n"
                "for fd in range(3, 4096):\n"
                "    if fd not in keep:\n"
                "        try:\n"
                "            os.close(fd)\n"
                "        except OSError:\n"
                "            pass",
            )
            .replace(
                "CHECK_DURING()",
                "import pathlib\ninfo = pathlib.Path(f'/proc/self/fdinfo/{ours}').read_text()\n"
                "assert 'tfd:' not in info, info  # nothing of leakguard's registered in the host's epoll set",
            )
            .replace("CHECK_AFTER()", "next(f for f in held if f.fileno() == ours).poll(0)\n[s.close() for p in TRACKED for s in p]\nlst.close()")
        )
        out = run_py(tmp_path, code)
        if out.startswith("skip:"):
            pytest.skip(out)
        assert out.split() == ["ok"]


def other_pythons() -> list[tuple[str, str]]:
    """(version, path) of the pyenv interpreters 3.10, 3.12 and 3.13 this machine has."""
    root = Path.home() / ".pyenv" / "versions"
    out = []
    for want in ("3.10", "3.12", "3.13"):
        found = sorted(root.glob(f"{want}.*/bin/python3")) if root.is_dir() else []
        if found:
            out.append((want, str(found[-1])))
    return out


def source_path(tmp_path: Path) -> str:
    """PYTHONPATH for another interpreter: this checkout (pure Python there) and structlog (pure Python)."""
    import structlog

    deps = tmp_path / "deps"
    deps.mkdir(exist_ok=True)
    link = deps / "structlog"
    if not link.exists():
        link.symlink_to(Path(structlog.__file__).parent)
    return os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(deps)])


_FORK_WITH_WATCHER = """
import os, sys, threading, time, warnings
import leakguard
from leakguard import watcher
leakguard.install(integrations="none", report_interval=0.01, log_format="json")
w = watcher.current()
while w.ticks < 3:
    time.sleep(0.005)
assert threading.active_count() == 1, threading.enumerate()  # the watcher is not a threading.Thread
for i in range(20):
    # Recorded, not raised: os.fork() clears the exception -W error would make of 3.12+'s
    # "multi-threaded" DeprecationWarning, so only a record shows it.
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        pid = os.fork()
    if pid == 0:
        cw = watcher.current()
        ok = cw is not None and cw is not w
        while ok and cw.ticks < 1:  # the child's own watcher runs
            time.sleep(0.005)
        os._exit(0 if ok else 3)
    assert os.waitpid(pid, 0)[1] == 0
    assert [str(x.message) for x in got] == [], [str(x.message) for x in got]
    if i % 5 == 0:
        start = w.ticks
        while w.ticks < start + 2:  # and the parent's again
            time.sleep(0.005)
leakguard.uninstall()
assert not watcher.running()
print("ok")
"""


class TestForkWithTheWatcher:
    """A single-threaded host forks single-threaded: the idle watcher thread ends before the fork and
    starts again after it, in the parent and in the child; no warning under -W error (3.12+)."""

    def test_this_interpreter(self, tmp_path: Path) -> None:
        assert run_py(tmp_path, _FORK_WITH_WATCHER).split() == ["ok"]

    @pytest.mark.parametrize("version", ["3.12", "3.13"])
    def test_other_interpreter(self, tmp_path: Path, version: str) -> None:
        python = dict(other_pythons()).get(version)
        if python is None:
            pytest.skip(f"no Python {version} under ~/.pyenv/versions")
        env_path = source_path(tmp_path)
        code = f"import sys; sys.path[:0] = {env_path.split(os.pathsep)!r}\n" + _FORK_WITH_WATCHER
        assert run_py(tmp_path, code, python=python).split() == ["ok"]


_FULL_STDERR = """
import os, sys, threading, time, traceback
def main():
    import leakguard
    from leakguard import watcher
    WRITE = {"x86_64": "1", "aarch64": "64"}.get(os.uname().machine)
    leakguard.install(integrations="none", report_interval=0.01, log_format="json")
    w = watcher.current()

    def writer_blocked():
        t = w._thread
        if t is None or t.native_id is None:
            return False
        try:
            with open(f"/proc/self/task/{t.native_id}/syscall") as f:
                return f.read().split()[:2] == [WRITE, "0x2"]  # in write(2, ...) on the full pipe
        except OSError:
            return False

    deadline = time.monotonic() + 60
    while not writer_blocked():
        assert time.monotonic() < deadline, "the watcher never blocked on stderr"
        time.sleep(0.01)
    ticks = w.ticks

    # Every lock the forking thread tries to take is seen: none may be held by someone else, but the
    # watcher thread's "ended" lock, polled in 1 ms slices while the fork checks that the thread is
    # blocked (asleep in the kernel, no CPU spent: ten polls in a row), then the fork goes on.
    waited, polled = [], []
    def profile(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", "") == "acquire":
            lock = getattr(arg, "__self__", None)
            if lock is not None and hasattr(lock, "locked") and lock.locked():
                (polled if lock is w._thread._done else waited).append(repr(lock))

    sys.setprofile(profile)
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            sys.setprofile(None)
            os._exit(0)
        status = os.waitpid(pid, 0)[1]
        assert status == 0, os.waitstatus_to_exitcode(status)
    sys.setprofile(None)
    assert waited == [], waited
    assert len(polled) <= 3 * 10, polled  # the writer was seen blocked at once: no wait for its I/O
    assert writer_blocked() and w.ticks == ticks  # the forks returned while the writer was still blocked
    print("forked", flush=True)
    sys.stdin.readline()  # the test drains stderr now
    leakguard.uninstall()
    print("ok", flush=True)
try:
    main()
except BaseException:
    print("FAILED", traceback.format_exc().replace("\\n", " | "), flush=True)  # stderr is the full pipe
    os._exit(1)
"""


class TestForkDoesNotWaitForReports:
    """A watcher tick blocked writing to a full stderr pipe: three forks wait for nothing of leakguard's."""

    def test_three_forks_while_the_report_is_blocked(self, tmp_path: Path) -> None:
        import fcntl
        import threading

        if os.uname().machine not in ("x86_64", "aarch64"):
            pytest.skip("the write(2) syscall number is known here for x86_64 and aarch64 only")
        r, w = os.pipe()
        flags = fcntl.fcntl(w, fcntl.F_GETFL)
        fcntl.fcntl(w, fcntl.F_SETFL, flags | os.O_NONBLOCK)  # the test's own pipe: filled up front
        try:
            while True:
                os.write(w, b"." * 65536)
        except BlockingIOError:
            pass
        fcntl.fcntl(w, fcntl.F_SETFL, flags)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKGUARD_")}
        # The watcher thread is busy (blocked) at each fork: the process is honestly multi-threaded then.
        proc = subprocess.Popen(
            [sys.executable, "-W", "error", "-W", "ignore::DeprecationWarning", "-c", _FULL_STDERR],
            cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=w, text=True,
        )
        os.close(w)
        drained: list[bytes] = []
        try:
            assert proc.stdout is not None and proc.stdin is not None
            first = proc.stdout.readline()
            assert first == "forked\n", first

            def drain() -> None:
                while chunk := os.read(r, 65536):
                    drained.append(chunk)

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "ok\n"
            assert proc.wait(60) == 0
            reader.join(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
            os.close(r)
        tail = b"".join(drained).lstrip(b".").decode()
        assert "Traceback" not in tail and "Fatal" not in tail, tail[-2000:]


_GEVENT_AFTER_INSTALL = """
import os, sys, time
import leakguard
from leakguard import watcher
leakguard.install(integrations="none", report_interval=0.01, log_format="json")
from gevent import monkey
monkey.patch_all()  # after install(), as always under `leakguard run`

def busy_until_ticks(n):
    w = watcher.current()
    start, deadline = w.ticks, time.monotonic() + 60
    while w.ticks < start + n:  # no yield to gevent's hub: only a real thread can tick meanwhile
        assert time.monotonic() < deadline, "the watcher does not run while the host does not yield"

busy_until_ticks(3)
pid = os.fork()  # the watcher starts again after the fork, in both processes: as a real thread still
if pid == 0:
    busy_until_ticks(2)
    os._exit(0)
busy_until_ticks(2)
assert os.waitpid(pid, 0)[1] == 0
print("ok", flush=True)
"""


class TestGevent:
    """gevent's monkey.patch_all() after install(): no KeyError at exit, and the watcher (restarted after a
    fork too) stays a real thread that ticks while the host never yields."""

    def test_patch_after_install(self, tmp_path: Path) -> None:
        pytest.importorskip("gevent")
        assert run_py(tmp_path, _GEVENT_AFTER_INSTALL).split() == ["ok"]
