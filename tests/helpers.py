"""Shared test helpers: real loopback peers, real services, waiting for kernel states."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

import leakguard

REQUIRE_SERVICES = os.environ.get("LEAKGUARD_REQUIRE_SERVICES") == "1"

SERVICES = {
    "postgres": ("127.0.0.1", 5432),
    "mariadb": ("127.0.0.1", 3306),
    "redis": ("127.0.0.1", 6379),
}


# Old libraries' own warnings under -W error, with or without leakguard (the versions in .ci/old-versions.txt):
# httpx < 0.23 imports cgi; urllib3 < 1.26 vendors a six whose meta path importer predates find_spec, and
# makes its TLS contexts with PROTOCOL_TLS and checks host names with ssl.match_hostname.
LIBRARY_WARNINGS = (
    "ignore:'cgi' is deprecated:DeprecationWarning",
    "ignore:_SixMetaPathImporter.:ImportWarning",
    "ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning",
    "ignore:ssl.match_hostname() is deprecated:DeprecationWarning",
)
#: a fresh interpreter with warnings as errors, but for those
PYTHON_STRICT = (sys.executable, "-W", "error", *(f"-W{w}" for w in LIBRARY_WARNINGS))


def driver_sql(conn: Any, sql: str) -> Any:
    """``conn.exec_driver_sql(sql)`` (SQLAlchemy 1.4 and later), or 1.3's ``conn.execute(sql)`` of a plain string."""
    run = getattr(conn, "exec_driver_sql", None)
    return run(sql) if run is not None else conn.execute(sql)


def dbapi(conn: Any) -> Any:
    """The DB-API connection under a SQLAlchemy ``Connection``: ``.connection.dbapi_connection``
    (1.4 and later), 1.3's ``.connection.connection``."""
    fairy = conn.connection
    inner = getattr(fairy, "dbapi_connection", None)
    return inner if inner is not None else fairy.connection


def checkout_args(pool: Any) -> tuple[str, ...]:
    """What a redis-py pool's ``get_connection`` needs: before 4.x (3.5) the command's name, nothing since
    (called at the test's own line, so that line is the checkout site)."""
    import inspect

    param = inspect.signature(pool.get_connection).parameters.get("command_name")
    return ("PING",) if param is not None and param.default is inspect.Parameter.empty else ()


def require_service(name: str) -> None:
    """Skip (or, with LEAKGUARD_REQUIRE_SERVICES=1, fail) when the service is unreachable."""
    host, port = SERVICES[name]
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError as exc:
        msg = f"{name} is not reachable at {host}:{port} ({exc})"
        if REQUIRE_SERVICES:
            pytest.fail(msg + " and LEAKGUARD_REQUIRE_SERVICES=1")
        pytest.skip(msg)


@contextlib.contextmanager
def raised_nofile(want: int) -> Iterator[int]:
    """RLIMIT_NOFILE's soft limit raised to the hard one for a block (skip if below *want*)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def site_module(tmp_path: Any, name: str, source: str) -> Any:
    """Import *source* as module *name* from a file: its functions are distinct creation sites."""
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


T = TypeVar("T")


def compiled_and_python(module: Any, name: str, fn: Callable[[], T]) -> tuple[T, T]:
    """``fn()`` with ``module.<name>`` (a compiled loop, or None without one) as it is, then with it None:
    the pure-Python loop it stands in for."""
    compiled = fn()
    saved = getattr(module, name)
    setattr(module, name, None)
    try:
        return compiled, fn()
    finally:
        setattr(module, name, saved)


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.005) -> Any:
    """Poll *predicate* until truthy; return its value (or the last falsy one on timeout)."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        interval = min(interval * 2, 0.1)
        value = predicate()
    return value


def leaks_for_fd(fd: int) -> list[leakguard.SocketInfo]:
    return [s for s in leakguard.snapshot().leaks if s.fd == fd]


def wait_close_wait(fd: int, timeout: float = 5.0) -> leakguard.SocketInfo:
    """Wait until the kernel reports *fd* in CLOSE_WAIT; return its leak entry."""
    found = wait_for(lambda: leaks_for_fd(fd), timeout)
    assert found, f"fd {fd} never reached CLOSE_WAIT; sockets: {leakguard.snapshot().sockets}"
    return found[0]


def this_line() -> int:
    """The line number of the caller (to compare creation sites against)."""
    import sys

    return sys._getframe(1).f_lineno


class HangUpServer:
    """A loopback TCP server that accepts connections and closes them at once (or on demand).

    Every accepted connection is closed by the server, so the client end goes to
    CLOSE_WAIT unless the client closes it.
    """

    def __init__(self, family: int = socket.AF_INET, hang_up: bool = True, greeting: bytes = b"") -> None:
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(128)
        self.address = self.listener.getsockname()[:2]
        self.host, self.port = self.address
        self.hang_up = hang_up
        self.greeting = greeting
        self.accepted: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self._stop:
                conn.close()
                return
            if self.greeting:
                try:
                    conn.sendall(self.greeting)
                except OSError:
                    pass
            if self.hang_up:
                conn.close()
            else:
                self.accepted.append(conn)

    def close(self) -> None:
        self._stop = True
        try:  # wake accept()
            socket.create_connection(self.address, timeout=1).close()
        except OSError:
            pass
        self.listener.close()
        self._thread.join(5)
        for c in self.accepted:
            c.close()
        self.accepted.clear()

    def __enter__(self) -> HangUpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PROCESS_SERVER = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
print(listener.getsockname()[1], flush=True)
wait = len(sys.argv) > 1
while True:
    conn, _ = listener.accept()
    if wait:  # until the client closes first
        conn.recv(1)
    conn.close()
"""


class ProcessHangUpServer:
    """Like :class:`HangUpServer`, in another process: its accepted sockets are not this process's."""

    def __init__(self, wait_for_eof: bool = False) -> None:
        import subprocess
        import sys

        args = [sys.executable, "-c", _PROCESS_SERVER] + (["wait"] if wait_for_eof else [])
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.host = "127.0.0.1"
        self.address = (self.host, self.port)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ProcessHangUpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
