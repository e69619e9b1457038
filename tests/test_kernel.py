"""The kernel reader's compiled loop and the watcher's cheap repeated scans, against the exact view.

``leakguard.snapshot()`` asks every socket (``getsockopt(TCP_INFO)``) after
listing ``/proc/self/fd``.  The watcher's scans keep a :class:`kernel.StateCache`
(an edge-triggered epoll set and the last listing) and skip most of that.  These
tests drive real loopback connections through every kind of state change and
check, after each one, that the cheap scan sees exactly what an exact scan sees.  And when /proc fails,
snapshot() degrades (psutil, then leakguard's own objects) instead of raising.
"""

from __future__ import annotations

import _socket
import json
import os
import random
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

import leakguard
from leakguard import kernel

from .helpers import HangUpServer, this_line, wait_close_wait, wait_for
from .test_containment import _raise

HERE = os.path.abspath(__file__)

take = sys.modules["leakguard.snapshot"].take  # the module (leakguard.snapshot is the function)

View = dict[int, tuple[Any, ...]]

needs_compiled = pytest.mark.skipif(
    kernel._scan is None, reason="the compiled kernel loop is not built here (pure Python, or not Linux)"
)


def view(cache: kernel.StateCache | None = None) -> View:
    return {s.fd: (s.type, s.state, s.local, s.remote, s.record is not None) for s in take(cache).sockets if s.fd is not None}


def settled() -> View:
    """The exact view, once two exact scans 5 ms apart agree (loopback packets are delivered by then)."""
    prev = view()
    for _ in range(200):
        time.sleep(0.005)
        cur = view()
        if cur == prev:
            return cur
        prev = cur
    raise AssertionError("the kernel's view did not settle")


def assert_same(cache: kernel.StateCache, what: object) -> None:
    """The cached scan equals the exact one.  A socket still moving between transient states
    (FIN_WAIT1 -> FIN_WAIT2 can wait for a delayed ACK) gets one more look 100 ms later: a
    stale cached state would still differ then, as the cache keeps it until epoll reports."""
    exact = settled()
    cached = view(cache)
    if cached != exact:
        time.sleep(0.1)
        exact = settled()
        cached = view(cache)
    assert cached == exact, what


class World:
    """Loopback connections with both ends here, untracked sockets and plain files, changed one step at a time."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.ends: list[socket.socket] = []
        self.raw: list[Any] = []  # _socket.socket: leakguard's hook never sees these
        self.files: list[Any] = []

    def connect(self) -> None:
        c = socket.create_connection(self.listener.getsockname())
        self.ends += [c, self.listener.accept()[0]]

    def close(self, i: int) -> None:
        self.ends.pop(i).close()  # a FIN: the other end goes to CLOSE_WAIT

    def reset(self, i: int) -> None:
        s = self.ends.pop(i)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # an RST: the other end goes to CLOSE

    def shutdown_both(self, i: int) -> None:
        try:
            self.ends[i].shutdown(socket.SHUT_RDWR)
        except OSError:  # reset by the peer already: nothing to shut
            pass

    def raw_socket(self) -> None:
        s = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        self.raw.append(s)

    def open_file(self) -> None:
        self.files.append(open(os.devnull, "rb"))  # noqa: SIM115

    def close_all(self) -> None:
        for s in self.ends + self.raw:
            s.close()
        for f in self.files:
            f.close()
        self.listener.close()


@pytest.fixture
def world(installed: None) -> Iterator[World]:
    w = World()
    try:
        yield w
    finally:
        w.close_all()


@pytest.fixture
def cache() -> Iterator[kernel.StateCache]:
    c = kernel.StateCache()
    try:
        yield c
    finally:
        c.close()


@needs_compiled
class TestCachedScansMatchExact:
    def test_every_kind_of_change(self, world: World, cache: kernel.StateCache) -> None:
        """Each step changes one thing; the cached scan after it equals the exact one."""
        for _ in range(6):
            world.connect()
        steps = [
            lambda: world.close(0),  # client closes: its server end -> CLOSE_WAIT
            lambda: world.close(1),  # a server end closes: its client -> CLOSE_WAIT
            lambda: world.reset(0),  # an RST: the other end -> CLOSE
            lambda: world.shutdown_both(0),  # both directions shut on an ESTABLISHED socket
            world.raw_socket,  # an untracked socket appears
            world.open_file,  # a plain file: the count changes, no socket
            world.connect,  # new sockets, possibly on descriptors closed above
            lambda: world.raw.pop().close(),  # the untracked socket goes
            lambda: world.files.pop().close(),
            lambda: world.close(len(world.ends) - 1),
        ]
        view(cache)  # the first (full) scan registers everything
        for step in steps:
            step()
            assert_same(cache, step)

    def test_random_walk(self, world: World, cache: kernel.StateCache) -> None:
        """Hundreds of random steps, with descriptors reused again and again."""
        rnd = random.Random(1234)
        for _ in range(4):
            world.connect()
        view(cache)
        for n in range(300):
            ops: list[Any] = [world.connect, world.raw_socket, world.open_file]
            if world.ends:
                i = rnd.randrange(len(world.ends))
                ops += [lambda: world.close(i), lambda: world.reset(i), lambda: world.shutdown_both(i)] * 2
            if world.raw:
                ops.append(lambda: world.raw.pop(rnd.randrange(len(world.raw))).close())
            if world.files:
                ops.append(lambda: world.files.pop(rnd.randrange(len(world.files))).close())
            if len(world.ends) > 40:
                ops = [lambda: world.close(0)]
            rnd.choice(ops)()
            assert_same(cache, f"step {n}")

    def test_descriptor_swap_is_seen_within_full_every_scans(self, world: World, cache: kernel.StateCache) -> None:
        """A file closed and an untracked socket opened on the same descriptor keep every count equal:
        the documented blind spot, bounded by the periodic full listing."""
        world.connect()
        world.open_file()
        view(cache)
        world.files.pop().close()
        world.raw_socket()  # takes the file's descriptor
        exact = settled()
        seen = [view(cache) == exact for _ in range(kernel.StateCache.FULL_EVERY)]
        assert seen[-1], seen

    def test_half_close_by_this_process_is_seen_once_the_peer_answers(
        self, world: World, cache: kernel.StateCache
    ) -> None:
        world.connect()
        client, server = world.ends
        view(cache)
        client.shutdown(socket.SHUT_WR)  # FIN_WAIT1/2: the one change epoll does not report
        assert settled()[client.fileno()][1] in ("FIN_WAIT1", "FIN_WAIT2")  # FIN_WAIT1 until the peer's ACK
        server.close()  # the peer answers: the client end leaves FIN_WAIT2
        assert_same(cache, "after the peer's FIN")

    def test_registrations_follow_a_reused_descriptor(self, world: World, cache: kernel.StateCache) -> None:
        world.connect()
        fd = world.ends[0].fileno()
        view(cache)
        world.close(0)
        world.close(0)
        world.connect()  # the lowest free descriptors again
        assert fd in {s.fileno() for s in world.ends}
        assert_same(cache, "new socket on the old descriptor")
        world.close(1)  # the peer of the new socket on the old descriptor hangs up
        assert_same(cache, "its peer hung up")


class TestCompiledLoopMatchesPython:
    @needs_compiled
    def test_same_view(self, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
        for _ in range(5):
            world.connect()
        world.close(0)
        world.reset(2)
        world.raw_socket()
        world.open_file()
        compiled = settled()
        monkeypatch.setattr(kernel, "_scan", None)
        assert settled() == compiled

    def test_pure_python_ignores_the_cache(
        self, world: World, cache: kernel.StateCache, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(kernel, "_scan", None)
        world.connect()
        world.close(0)
        assert_same(cache, "pure Python")
        assert cache.ep is None


@needs_compiled
class TestResources:
    def test_the_watcher_closes_its_epoll_descriptor(self) -> None:
        def epolls() -> set[str]:
            out = set()
            for n in os.listdir("/proc/self/fd"):
                try:
                    if os.readlink(f"/proc/self/fd/{n}") == "anon_inode:[eventpoll]":
                        out.add(n)
                except OSError:
                    pass  # listdir's own descriptor
            return out

        before = epolls()
        leakguard.install(report_interval=0.01, integrations="none", log_format="json")
        try:
            from leakguard import watcher

            w = watcher.current()
            assert w is not None
            start = w.ticks
            assert wait_for(lambda: w.ticks >= start + 3, timeout=30)
            assert w._cache.ep is not None
            assert len(epolls() - before) == 1
        finally:
            leakguard.uninstall()
        assert w._cache.ep is None
        assert epolls() == before

    def test_scan_rejects_bad_arguments_clearly(self) -> None:
        with pytest.raises(TypeError, match="kernel_socket must be a tuple subclass"):
            kernel._scan({}, {}, dict, kernel._STATE_NAMES)
        with pytest.raises(TypeError, match="fds a list or None"):
            kernel._scan({}, {}, kernel.KernelSocket, kernel._STATE_NAMES, {}, "0 1 2")

    def test_a_closed_cache_reopens_on_use(self, cache: kernel.StateCache) -> None:
        cache.close()
        cache.close()  # twice is fine
        assert_same(cache, "reopened")


class _Readers:
    """How often each of the pure-Python kernel readers ran (calls counted, then passed through unchanged)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = {"proc": 0, "psutil": 0, "objects": 0}
        self._mp = monkeypatch
        # The compiled scan reads /proc itself and returns before any of these run: off, so the
        # Python path each test claims is the one taken.
        monkeypatch.setattr(kernel, "_scan", None)
        self.set_proc(kernel._list_fds)
        for name, attr in (("psutil", "_read_psutil"), ("objects", "_read_objects")):
            monkeypatch.setattr(kernel, attr, self._counted(name, getattr(kernel, attr)))

    def _counted(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return run

    def set_proc(self, list_fds: Callable[[], list[int]]) -> None:
        """The /proc/self/fd listing the Python path uses (a failing one injects the fault)."""
        self._mp.setattr(kernel, "_list_fds", self._counted("proc", list_fds))

    def reset(self) -> None:
        self.calls = dict.fromkeys(self.calls, 0)


@pytest.fixture
def readers(monkeypatch: pytest.MonkeyPatch) -> _Readers:
    return _Readers(monkeypatch)


class TestDegradedKernelView:
    """snapshot() degrades instead of raising: /proc failing -> psutil -> leakguard's own objects.

    Each test takes the pure-Python reader (the compiled scan off) and asserts which
    of its three sources answered.
    """

    def _leak(self, server: HangUpServer) -> tuple[socket.socket, int]:
        s = socket.create_connection(server.address); line = this_line()  # noqa: E702
        return s, line

    def _check_leak(self, s: socket.socket, line: int) -> leakguard.SocketInfo:
        info = wait_close_wait(s.fileno())
        assert info.site is not None
        assert (os.path.abspath(info.site.file), info.site.line) == (HERE, line)
        return info

    def test_linux_path_off_uses_psutil(
        self,
        installed_quiet: None,
        monkeypatch: pytest.MonkeyPatch,
        hangup_server: HangUpServer,
        readers: _Readers,
    ) -> None:
        monkeypatch.setattr(kernel, "_IS_LINUX", False)
        s, line = self._leak(hangup_server)
        try:
            info = self._check_leak(s, line)
            assert info.remote == f"127.0.0.1:{hangup_server.port}" and info.origin == "socket"
            json.dumps(leakguard.snapshot().to_dict())
            assert readers.calls["proc"] == 0 and readers.calls["objects"] == 0
            assert readers.calls["psutil"] > 0
        finally:
            s.close()

    def test_the_proc_path_itself_answers_when_it_works(
        self, installed_quiet: None, hangup_server: HangUpServer, readers: _Readers
    ) -> None:
        """The counterpart of the fallbacks below: with /proc readable, psutil is never asked."""
        s, line = self._leak(hangup_server)
        try:
            info = self._check_leak(s, line)
            assert info.state == "CLOSE_WAIT"
            assert readers.calls["proc"] > 0
            assert readers.calls["psutil"] == 0 and readers.calls["objects"] == 0
        finally:
            s.close()

    @pytest.mark.parametrize("failure", ["list_fds_oserror", "list_fds_runtime", "read_one_raises"])
    def test_proc_failure_falls_back_to_psutil(
        self,
        failure: str,
        installed_quiet: None,
        monkeypatch: pytest.MonkeyPatch,
        hangup_server: HangUpServer,
        readers: _Readers,
    ) -> None:
        s, line = self._leak(hangup_server)
        try:
            wait_close_wait(s.fileno())
            if failure == "list_fds_oserror":
                readers.set_proc(lambda: [int(n) for n in os.listdir("/proc/self/no-such-dir")])
            elif failure == "list_fds_runtime":
                readers.set_proc(_raise)
            else:
                monkeypatch.setattr(kernel, "_read_one", _raise)
            readers.reset()
            info = self._check_leak(s, line)
            assert info.state == "CLOSE_WAIT"
            assert readers.calls["proc"] > 0  # tried first, failed
            assert readers.calls["psutil"] > 0 and readers.calls["objects"] == 0
        finally:
            s.close()

    def test_psutil_failing_too_keeps_tracked_sockets(
        self,
        installed_quiet: None,
        monkeypatch: pytest.MonkeyPatch,
        hangup_server: HangUpServer,
        readers: _Readers,
    ) -> None:
        """Neither /proc nor psutil: the sockets leakguard tracks are still judged."""
        s, line = self._leak(hangup_server)
        try:
            wait_close_wait(s.fileno())
            monkeypatch.setattr(kernel, "_IS_LINUX", False)

            def denied(self: Any, *args: Any, **kwargs: Any) -> Any:
                raise psutil.AccessDenied(os.getpid())

            monkeypatch.setattr(psutil.Process, "net_connections", denied)
            readers.reset()
            snap = leakguard.snapshot()
            assert readers.calls == {"proc": 0, "psutil": 1, "objects": 1}  # psutil refused, then our own objects
            info = self._check_leak(s, line)
            assert info.state == "CLOSE_WAIT"
            assert all(x.record is not None for x in snap.sockets)  # only what leakguard tracks
            json.dumps(snap.to_dict())
        finally:
            s.close()

    def test_snapshot_without_install_and_without_proc(
        self, monkeypatch: pytest.MonkeyPatch, hangup_server: HangUpServer, readers: _Readers
    ) -> None:
        monkeypatch.setattr(kernel, "_IS_LINUX", False)
        s = socket.create_connection(hangup_server.address)
        try:
            info = wait_close_wait(s.fileno())
            assert info.origin == "unknown"
            assert readers.calls["psutil"] > 0 and readers.calls["proc"] == 0 and readers.calls["objects"] == 0
        finally:
            s.close()
