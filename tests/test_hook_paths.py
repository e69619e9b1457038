"""Sockets built on an existing descriptor (the inherit case), through both hooks.

``accept()``, ``socket(fileno=...)``, ``fromfd()``, ``dup()`` and ssl's ``wrap_socket``
all construct a socket on a descriptor that already exists.  The compiled hook records
them itself (no Python frame, no call into registry.record_socket); the pure-Python hook
does the same through record_socket.  Each test runs through both (``hot_path``).
"""

from __future__ import annotations

import _thread
import os
import socket
import ssl
from typing import Any

import pytest

import leakguard
from leakguard import _sockets, registry

from .helpers import HangUpServer, this_line, wait_for
from .test_core import hot_path  # noqa: F401  (the fixture: compiled and pure-Python hook)

HERE = os.path.abspath(__file__)


def site_line(fd: int) -> int | None:
    """The line of this file that created the socket on *fd*, per its record."""
    rec = registry.get(fd)
    assert rec is not None, f"no record for fd {fd}"
    lines = [f.line for f in rec.stack() if os.path.abspath(f.file) == HERE]
    return lines[0] if lines else None


@pytest.fixture
def python_calls(monkeypatch: pytest.MonkeyPatch, hot_path: str) -> list[Any]:  # noqa: F811
    """The sockets that reached registry.record_socket (the Python path) during a test."""
    seen: list[Any] = []
    real = _sockets.record_socket

    def spy(sock: Any, inherit: bool = False) -> None:
        seen.append(sock)
        real(sock, inherit)

    monkeypatch.setattr(_sockets, "record_socket", spy)
    return seen


@pytest.mark.usefixtures("installed_quiet")
class TestInherit:
    def test_accept(self, hot_path: str, python_calls: list[Any]) -> None:  # noqa: F811
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            conn, _ = listener.accept(); line = this_line()  # noqa: E702
            with client, conn:
                assert site_line(conn.fileno()) == line
                rec = registry.get(conn.fileno())
                assert rec is not None and rec.ref() is conn and rec.origin == "socket"
        # the compiled hook records the accepted socket without the Python path
        assert (conn in python_calls) == (hot_path == "python")

    def test_fileno_argument(self, hot_path: str, python_calls: list[Any]) -> None:  # noqa: F811
        base = socket.socket()
        fd = os.dup(base.fileno())
        base.close()
        s = socket.socket(fileno=fd); line = this_line()  # noqa: E702
        with s:
            assert s.fileno() == fd and site_line(fd) == line
        assert (s in python_calls) == (hot_path == "python")

    def test_fromfd_and_dup(self, hot_path: str) -> None:  # noqa: F811
        with socket.socket() as base:
            first = this_line() - 1
            a = socket.fromfd(base.fileno(), socket.AF_INET, socket.SOCK_STREAM); a_line = this_line()  # noqa: E702
            b = base.dup(); b_line = this_line()  # noqa: E702
            with a, b:
                assert len({base.fileno(), a.fileno(), b.fileno()}) == 3
                assert site_line(base.fileno()) == first
                assert site_line(a.fileno()) == a_line
                assert site_line(b.fileno()) == b_line

    def test_handover_keeps_the_stack(self, hot_path: str, python_calls: list[Any], hangup_server: HangUpServer) -> None:  # noqa: F811
        raw = socket.create_connection(hangup_server.address); line = this_line()  # noqa: E702
        fd = raw.fileno()
        seq = registry.entry(fd)[2]  # type: ignore[index]
        tls = ssl.create_default_context().wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
        with tls:
            e = registry.entry(fd)
            assert e is not None and e[0]() is tls and e[2] == seq  # the same record, now the TLS socket's
            assert site_line(fd) == line
        assert (tls in python_calls) == (hot_path == "python")

    def test_handover_with_a_view_updates_the_view(self, hot_path: str) -> None:  # noqa: F811
        """A Record view built before the wrap (an integration annotated it) stays the record."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            raw = socket.create_connection(listener.getsockname())
            conn, _ = listener.accept()
            with conn:
                rec = registry.annotate(raw.fileno(), origin="mylib", target="example:1")
                assert rec is not None
                tls = ssl.create_default_context().wrap_socket(
                    raw, server_hostname="localhost", do_handshake_on_connect=False
                )
                with tls:
                    after = registry.get(tls.fileno())
                    assert after is rec and rec.ref() is tls and rec.origin == "mylib"

    def test_scope_applies(self, hot_path: str) -> None:  # noqa: F811
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            with registry.scope("myserver", "127.0.0.1:1"):
                conn, _ = listener.accept()
            with client, conn:
                rec = registry.get(conn.fileno())
                assert rec is not None and (rec.origin, rec.target) == ("myserver", "127.0.0.1:1")


class Stubborn(socket.socket):
    """A socket subclass whose fileno() raises once it is closed (as some wrappers do)."""

    def fileno(self) -> int:
        fd = super().fileno()
        if fd < 0:
            raise OSError("closed")
        return fd


@pytest.mark.usefixtures("installed_quiet", "hot_path")
class TestStaleOwner:
    """#14.8: the inherit path never asks the old socket object's fileno()."""

    def test_old_socket_whose_fileno_raises(self) -> None:
        with socket.socket() as base:
            old = Stubborn()
            fd = old.fileno()
            os.close(old.detach())  # the object lives on, holding no descriptor; its fileno() raises
            errors = registry.stats()["hook_errors"]
            new = socket.fromfd(base.fileno(), socket.AF_INET, socket.SOCK_STREAM); line = this_line()  # noqa: E702
            with new:
                assert new.fileno() == fd  # the lowest free descriptor: the old one's
                assert registry.entry(fd)[0]() is new  # type: ignore[index]
                assert site_line(fd) == line
            assert registry.stats()["hook_errors"] == errors
            del old

    def test_new_subclass_socket_whose_fileno_is_overridden(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        with listener:
            client = socket.create_connection(listener.getsockname())
            fd, _ = listener._accept()  # type: ignore[attr-defined]
            s = Stubborn(fileno=fd); line = this_line()  # noqa: E702
            with client, s:
                assert site_line(fd) == line


@pytest.mark.usefixtures("installed_quiet", "hot_path")
class TestNoPythonFrame:
    """#14.7: a socket made with no Python frame on a reused descriptor says 'unknown'."""

    def test_thread_on_a_c_callable(self) -> None:
        with registry.scope("somelib", "db:5432"):  # a Python-path record (frames, scope) ...
            first = socket.socket()
        fd = first.fileno()
        e = registry.entry(fd)
        assert e is not None and e[4].origin == "somelib"
        del e  # no view, nothing holds the entry but the table: the compiled hook may reuse it
        first.close()  # ... left in the table, stale, for the next socket on fd
        held: list[socket.socket] = []
        # held.extend(map(socket.socket, ...)) in a new thread: C calls all the way down
        _thread.start_new_thread(held.extend, (map(socket.socket, [socket.AF_INET]),))
        assert wait_for(lambda: held, timeout=10)
        (s,) = held
        with s:
            if s.fileno() != fd:
                pytest.skip("descriptor not reused")
            rec = registry.get(fd)
            assert rec is not None and rec.ref() is s
            assert rec.origin == "socket" and rec.target is None
            assert [f for f in rec.stack() if os.path.abspath(f.file) == HERE] == []
            info = [x for x in leakguard.snapshot().sockets if x.fd == fd][0]
            assert info.site is None or os.path.abspath(info.site.file) != HERE
