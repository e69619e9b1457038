"""Containment: a failure of leakguard's own code never reaches the host, and installed the socket API behaves as plain.

Faults are injected into leakguard's *own* functions (stack capture, the
registry, the kernel reader), never into the kernel or the socket module: the
host's calls are real and must behave exactly as without leakguard.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import leakguard
from leakguard import _sockets, registry, stacks

from .helpers import HangUpServer, wait_close_wait, wait_for

HERE = os.path.abspath(__file__)


class Opaque:
    """An object of no accepted type, with a stable repr (test ids must match across xdist workers)."""

    def __repr__(self) -> str:
        return "<opaque>"


class Boom(RuntimeError):
    """The failure injected into leakguard's own code."""


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise Boom("injected failure inside leakguard")


#: leakguard's own functions a fault can be injected into: name -> (owner, attribute).  Faults in
#: the pure-Python path also turn the compiled fast path off (it would bypass them).
FAULTS: dict[str, tuple[Any, str]] = {
    "stack_capture": (stacks, "capture"),  # the stack walk raises
    "record_socket": (_sockets, "record_socket"),  # the registry as a whole fails
    "registry_ref": (registry, "_ref"),  # weakref creation fails ("registry full")
    "registry_clock": (registry, "_monotonic"),
    "fast_record": (_sockets, "_fast"),  # the compiled hot path raises
}


def inject(mp: pytest.MonkeyPatch, fault: str) -> None:
    owner, attr = FAULTS[fault]
    if fault != "fast_record":
        mp.setattr(_sockets, "_fast", None)
    mp.setattr(owner, attr, _raise)
    _sockets.instrument()  # the hook matching _fast: compiled (calling _raise as its record) or Python


def _plain_http_server() -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class TestContainment:
    """A failure of leakguard's own code never reaches the host: its sockets work, nothing is raised."""

    @pytest.mark.parametrize("fault", sorted(FAULTS))
    def test_creation_paths_survive(
        self, fault: str, installed_quiet: None, monkeypatch: pytest.MonkeyPatch, hangup_server: HangUpServer
    ) -> None:
        errors = registry.stats()["hook_errors"]
        inject(monkeypatch, fault)
        opened: list[socket.socket] = []
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            opened.append(s)
            s.settimeout(5)
            s.connect(hangup_server.address)
            assert s.getpeername() == hangup_server.address
            opened.append(socket.create_connection(hangup_server.address, timeout=5))
            a, b = socket.socketpair()
            opened += [a, b]
            a.sendall(b"ping")
            assert b.recv(4) == b"ping"
            opened.append(socket.fromfd(s.fileno(), socket.AF_INET, socket.SOCK_STREAM))
            listener = socket.create_server(("127.0.0.1", 0))
            opened.append(listener)
            client = socket.create_connection(listener.getsockname())
            opened.append(client)
            conn, _ = listener.accept()
            opened.append(conn)
            assert conn.getpeername() == client.getsockname()
        finally:
            for sock in opened:
                sock.close()
        assert registry.stats()["hook_errors"] > errors
        monkeypatch.undo()
        _sockets.instrument()  # the compiled hook is built around its record function: rebuilt without the fault
        # the hook still works once the fault is gone
        with socket.socket() as s2:
            assert registry.get(s2.fileno()) is not None

    @pytest.mark.parametrize("fault", ["stack_capture", "record_socket", "fast_record"])
    def test_unrecorded_socket_still_shows_as_unknown(
        self, fault: str, installed_quiet: None, monkeypatch: pytest.MonkeyPatch, hangup_server: HangUpServer
    ) -> None:
        inject(monkeypatch, fault)
        s = socket.create_connection(hangup_server.address)
        try:
            monkeypatch.undo()
            info = wait_close_wait(s.fileno())
            assert info.origin == "unknown" and info.stack == [] and info.record is None
        finally:
            s.close()

    def test_http_client_survives_stack_capture_failure(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """requests + urllib3 integrations: the request returns the same response."""
        requests = pytest.importorskip("requests")
        srv = _plain_http_server()
        leakguard.install()
        try:
            url = f"http://127.0.0.1:{srv.server_address[1]}/"
            inject(monkeypatch, "stack_capture")
            with requests.Session() as session:
                r = session.get(url, timeout=5)
                assert (r.status_code, r.content) == (200, b"hello")
            with pytest.raises(requests.ConnectionError):  # the same exception as without leakguard
                requests.get(f"http://127.0.0.1:{_closed_port()}/", timeout=5)
        finally:
            leakguard.uninstall()
            srv.shutdown()
            srv.server_close()

    def test_db_driver_survives_registry_failure(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """psycopg2 (a C-level socket adopted by the integration): the connection works."""
        from .helpers import require_service

        require_service("postgres")
        psycopg2 = pytest.importorskip("psycopg2")
        leakguard.install(integrations=["psycopg2"])
        try:
            monkeypatch.setattr(registry, "adopt", _raise)
            inject(monkeypatch, "stack_capture")
            conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="test", connect_timeout=5)
            try:
                with conn.cursor() as cur:
                    cur.execute("select 41 + 1")
                    assert cur.fetchone() == (42,)
            finally:
                conn.close()
            with pytest.raises(psycopg2.OperationalError):
                psycopg2.connect(host="127.0.0.1", port=_closed_port(), user="postgres", connect_timeout=5)
        finally:
            leakguard.uninstall()

    @pytest.mark.parametrize("broken", ["configure_raises", "missing_attributes"])
    def test_mismatched_compiled_module_falls_back(self, broken: str) -> None:
        """A stale or foreign ``leakguard._speedups`` never fails ``import leakguard``: pure Python takes over."""
        body = "raise RuntimeError('built from other sources')" if broken == "configure_raises" else "pass"
        prog = (
            "import sys, types, socket\n"
            "fake = types.ModuleType('leakguard._speedups')\n"
            f"def configure(*a):\n    {body}\n"
            "fake.configure = configure\n"
            "sys.modules['leakguard._speedups'] = fake\n"
            "import leakguard\n"
            "from leakguard import registry\n"
            "assert registry._speedups is None and registry.fast_record is None\n"
            "leakguard.install(integrations='none')\n"
            "s = socket.socket()\n"
            "assert registry.get(s.fileno()) is not None\n"
            "s.close()\n"
            "print('ok')\n"
        )
        proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout.strip()) == (0, "ok"), proc.stderr

    def test_watcher_survives_failing_snapshot(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A watcher whose every tick fails keeps ticking and raises nothing into any thread."""
        from leakguard import watcher

        hooked: list[Any] = []
        monkeypatch.setattr(threading, "excepthook", lambda args: hooked.append(args))
        monkeypatch.setattr(watcher, "take_snapshot", _raise)
        leakguard.install(report_interval=0.02, integrations="none", log_format="json")
        try:
            w = watcher.current()
            assert w is not None
            assert wait_for(lambda: w.ticks >= 3)
            assert w.alive
        finally:
            leakguard.uninstall()
        assert hooked == []


def _closed_port() -> int:
    """A loopback port nobody listens on (bound briefly, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- same behaviour, property based


class SubSocket(socket.socket):
    """A host's socket subclass with its own __init__ (keyword style)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra = "mine"


def _outcome(make: Callable[[], Any], then: Callable[[Any], Any] | None = None) -> tuple[Any, ...]:
    """What the host observes: the attributes of the result, or the exception's type, errno and args."""
    try:
        s = make()
    except Exception as exc:
        return ("raised", type(exc), getattr(exc, "errno", None), exc.args)
    try:
        seen: tuple[Any, ...] = (
            "ok",
            type(s),
            s.family,
            s.type,
            s.proto,
            s.gettimeout(),
            s.getblocking(),
            getattr(s, "extra", None),
        )
        if then is not None:
            try:
                seen += ("then", then(s))
            except Exception as exc:
                seen += ("then-raised", type(exc), getattr(exc, "errno", None), exc.args)
        return seen
    finally:
        s.close()


FAMILIES = [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, -1, 0, 9999, "inet", 2.0, None]
TYPES = [
    socket.SOCK_STREAM,
    socket.SOCK_DGRAM,
    socket.SOCK_RAW,
    socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
    -1,
    12345,
    "stream",
]
PROTOS = [0, -1, socket.IPPROTO_TCP, socket.IPPROTO_UDP, 255, 99999, "tcp"]
TIMEOUTS = [None, 0, 0.0, 0.5, 5, -1, math.nan, math.inf, "1", Opaque()]


@pytest.fixture(scope="module")
def refusing_port() -> Iterator[int]:
    """A loopback port bound but not listening: connect() is refused, deterministically."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield int(s.getsockname()[1])
    finally:
        s.close()


def _with_fault(fault: str | None, fn: Callable[[], Any]) -> Any:
    if fault is None:
        return fn()
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, fault)
        return fn()


def _compare(fn: Callable[[], Any], fault: str | None) -> None:
    leakguard.uninstall()
    plain = fn()
    leakguard.install(integrations="none")
    try:
        hooked = _with_fault(fault, fn)
    finally:
        leakguard.uninstall()
    assert hooked == plain


FAULT_MODES = st.sampled_from([None, *sorted(FAULTS)])
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class TestSameBehaviour:
    """Installed (even with leakguard's own code failing) the socket API returns and raises exactly as plain."""

    @HYP
    @given(
        cls=st.sampled_from([socket.socket, SubSocket]),
        family=st.sampled_from(FAMILIES),
        kind=st.sampled_from(TYPES),
        proto=st.sampled_from(PROTOS),
        keywords=st.booleans(),
        fault=FAULT_MODES,
    )
    def test_constructor(self, cls: type, family: Any, kind: Any, proto: Any, keywords: bool, fault: Any) -> None:
        if keywords:
            make = lambda: cls(family=family, type=kind, proto=proto)  # noqa: E731
        else:
            make = lambda: cls(family, kind, proto)  # noqa: E731
        _compare(lambda: _outcome(make), fault)

    @HYP
    @given(
        source=st.sampled_from(["socket", "udp", "unix", "file", "closed", "huge", "negative", "str", "float"]),
        family=st.sampled_from([-1, socket.AF_INET, socket.AF_UNIX]),
        kind=st.sampled_from([-1, socket.SOCK_STREAM, socket.SOCK_DGRAM]),
        fault=FAULT_MODES,
    )
    def test_fileno(self, source: str, family: int, kind: int, fault: Any) -> None:
        def run() -> tuple[Any, ...]:
            owned: list[Any] = []
            try:
                if source == "socket":
                    base = socket.socket()
                    owned.append(base)
                    fd: Any = os.dup(base.fileno())
                elif source == "udp":
                    base = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    owned.append(base)
                    fd = os.dup(base.fileno())
                elif source == "unix":
                    a, b = socket.socketpair()
                    owned += [a, b]
                    fd = os.dup(a.fileno())
                elif source == "file":
                    f = open(os.devnull, "rb")  # noqa: SIM115
                    owned.append(f)
                    fd = os.dup(f.fileno())
                elif source == "closed":
                    fd = _closed_fd()
                else:
                    fd = {"huge": 2**30, "negative": -5, "str": "3", "float": 3.0}[source]
                result = _outcome(lambda: socket.socket(family, kind, 0, fd))
                if result[0] == "raised" and isinstance(fd, int) and fd >= 0 and source in ("socket", "udp", "unix", "file"):
                    os.close(fd)  # the constructor failed: the descriptor is still ours
                return result
            finally:
                for o in owned:
                    o.close()

        _compare(run, fault)

    @HYP
    @given(
        family=st.sampled_from([socket.AF_INET, socket.AF_INET6]),
        kind=st.sampled_from([socket.SOCK_STREAM, socket.SOCK_DGRAM]),
        timeout=st.sampled_from(TIMEOUTS),
        fault=FAULT_MODES,
    )
    def test_timeouts_and_refused_connect(
        self, refusing_port: int, family: int, kind: int, timeout: Any, fault: Any
    ) -> None:
        host = "127.0.0.1" if family == socket.AF_INET else "::1"

        def then(s: socket.socket) -> Any:
            steps: list[Any] = []
            try:
                s.settimeout(timeout)
                steps.append(("timeout", s.gettimeout(), s.getblocking()))
            except Exception as exc:
                steps.append(("settimeout-raised", type(exc), exc.args))
            if s.gettimeout() == 0:
                return tuple(steps)  # a non-blocking connect's first answer depends on timing
            try:
                steps.append(("connect", s.connect_ex((host, refusing_port))))
            except Exception as exc:
                steps.append(("connect-raised", type(exc), getattr(exc, "errno", None)))
            return tuple(steps)

        _compare(lambda: _outcome(lambda: socket.socket(family, kind), then), fault)

    @settings(max_examples=60, deadline=None)
    @given(
        address=st.sampled_from(["refused", "bad-service", "bad-port", "tuple3", "none"]),
        timeout=st.sampled_from([None, 2.0]),  # a bad timeout makes the stdlib itself leak the socket
        fault=FAULT_MODES,
    )
    def test_create_connection(self, refusing_port: int, address: str, timeout: Any, fault: Any) -> None:
        addr: Any = {
            "refused": ("127.0.0.1", refusing_port),
            "bad-service": ("127.0.0.1", "no-such-service"),  # resolved locally, no DNS
            "bad-port": ("127.0.0.1", 70000),
            "tuple3": ("127.0.0.1", refusing_port, 0),
            "none": None,
        }[address]

        def run() -> tuple[Any, ...]:
            return _outcome(lambda: socket.create_connection(addr, timeout=timeout))

        _compare(run, fault)

    def test_connect_refused_exception_identical(self, refusing_port: int) -> None:
        """The exact exception object the host sees: type, errno, strerror, no chained leakguard context."""

        def run() -> tuple[Any, ...]:
            with socket.socket() as s:
                try:
                    s.connect(("127.0.0.1", refusing_port))
                except OSError as exc:
                    return (type(exc), exc.errno, exc.strerror, exc.__context__, exc.__cause__)
            return ("connected",)

        for fault in [None, *sorted(FAULTS)]:
            _compare(run, fault)
        leakguard.uninstall()
        assert run()[:2] == (ConnectionRefusedError, errno.ECONNREFUSED)


def _closed_fd() -> int:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return r
