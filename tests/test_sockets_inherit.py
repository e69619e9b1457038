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

HERE = os.path.abspath(__file__)


def site_line(fd: int) -> int | None:
    """The line of this file that created the socket on *fd*, per its record."""
    rec = registry.get(fd)
    assert rec is not None, f"no record for fd {fd}"
    lines = [f.line for f in rec.stack() if os.path.abspath(f.file) == HERE]
    return lines[0] if lines else None


@pytest.fixture
def python_calls(monkeypatch: pytest.MonkeyPatch, hot_path: str) -> list[Any]:
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
    def test_accept(self, hot_path: str, python_calls: list[Any]) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            conn, _ = listener.accept(); line = this_line()  # noqa: E702
            with client, conn:
                assert site_line(conn.fileno()) == line
                rec = registry.get(conn.fileno())
                assert rec is not None and rec.ref() is conn and rec.origin == "socket"
        # the compiled hook records the accepted socket without the Python path
        assert (conn in python_calls) == (hot_path == "python")

    def test_fileno_argument(self, hot_path: str, python_calls: list[Any]) -> None:
        base = socket.socket()
        fd = os.dup(base.fileno())
        base.close()
        s = socket.socket(fileno=fd); line = this_line()  # noqa: E702
        with s:
            assert s.fileno() == fd and site_line(fd) == line
        assert (s in python_calls) == (hot_path == "python")

    def test_fromfd_and_dup(self, hot_path: str) -> None:
        with socket.socket() as base:
            first = this_line() - 1
            a = socket.fromfd(base.fileno(), socket.AF_INET, socket.SOCK_STREAM); a_line = this_line()  # noqa: E702
            b = base.dup(); b_line = this_line()  # noqa: E702
            with a, b:
                assert len({base.fileno(), a.fileno(), b.fileno()}) == 3
                assert site_line(base.fileno()) == first
                assert site_line(a.fileno()) == a_line
                assert site_line(b.fileno()) == b_line

    def test_handover_keeps_the_stack(self, hot_path: str, python_calls: list[Any], hangup_server: HangUpServer) -> None:
        raw = socket.create_connection(hangup_server.address); line = this_line()  # noqa: E702
        fd = raw.fileno()
        seq = registry.entry(fd)[2]  # type: ignore[index]
        tls = ssl.create_default_context().wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
        with tls:
            e = registry.entry(fd)
            assert e is not None and e[0]() is tls and e[2] == seq  # the same record, now the TLS socket's
            assert site_line(fd) == line
        assert (tls in python_calls) == (hot_path == "python")

    def test_handover_with_a_view_updates_the_view(self, hot_path: str) -> None:
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

    def test_scope_applies(self, hot_path: str) -> None:
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


def _introspect() -> dict[str, object]:
    """What introspecting code sees of socket.socket.__init__."""
    import inspect

    f = socket.socket.__init__
    out: dict[str, object] = {a: getattr(f, a, "<missing>") for a in ("__name__", "__qualname__", "__module__", "__doc__")}
    out["signature"] = str(inspect.signature(f))
    out["isroutine"] = inspect.isroutine(f)
    errors: list[object] = []
    with socket.socket() as s:
        misuse: list[tuple[tuple[object, ...], dict[str, object]]] = [
            ((), {}), ((1,), {}), ((s, "x"), {}), ((s,), {"bogus": 1}), ((s, 1, 2, 3, 4, 5), {}), ((), {"family": 2}),
        ]  # fmt: skip
        for args, kwargs in misuse:
            try:
                f(*args, **kwargs)  # type: ignore[misc]
            except Exception as exc:
                errors.append((type(exc).__name__, str(exc)))
            else:
                errors.append("no error")
    out["errors"] = errors
    with socket.socket() as s:
        out["bound"] = repr(s.__init__).split(" of ")[0]
        out["bound_func_name"] = s.__init__.__func__.__qualname__  # type: ignore[attr-defined]
    return out


@pytest.mark.usefixtures("installed_quiet")
def test_init_introspection_unchanged(hot_path: str) -> None:
    """#14.10: name, qualname, module, doc, signature and every misuse's TypeError as plain."""
    installed = _introspect()
    assert vars(socket.socket)["__init__"].__wrapped__ is _sockets._original_init
    leakguard.uninstall()
    try:
        plain = _introspect()
    finally:
        leakguard.install(integrations="none")
    assert installed == plain


def _weak_views(rounds: int) -> list[object]:
    """What code holding weak references to sockets sees while new sockets reuse descriptors."""
    import gc
    import weakref

    seen: list[object] = []
    fired: list[int] = []
    dead: list[Any] = []  # weak references to closed sockets, held on: they must stay dead
    for i in range(rounds):
        s = socket.socket()
        r = weakref.ref(s)
        cb = weakref.ref(s, lambda _r, i=i: fired.append(i))
        ws: weakref.WeakSet[socket.socket] = weakref.WeakSet([s])
        seen.append((r() is s, cb() is s, r is weakref.ref(s), s in ws, weakref.getweakrefcount(s)))
        seen.append([x() for x in dead])
        s.close()
        del s
        gc.collect()
        seen.append((r(), cb(), len(ws), fired[-1:] == [i]))
        if i % 2:
            dead.append(r)  # every other round's reference outlives its socket
        del r, cb, ws
        for _ in range(3):  # sockets whose weak references nobody but leakguard holds
            socket.socket().close()
        before = socket.socket()  # closed but still bound while the next one takes its descriptor
        before.close()
        after = socket.socket()
        seen.append((weakref.getweakrefcount(before), weakref.ref(before)() is before))
        r_after = weakref.ref(after)
        del before
        gc.collect()
        seen.append((r_after() is after, weakref.getweakrefcount(after) - (r_after is not None)))
        after.close()
        del after
        seen.append(r_after())
    return seen


@pytest.mark.usefixtures("installed_quiet", "hot_path")
class TestReusedDescriptor:
    """A descriptor reused by socket after socket: the compiled hook rewrites the old entry in
    place and points the dead socket's weak reference at the new one; nobody may see that."""

    def test_weak_references_behave_as_without_leakguard(self) -> None:
        installed = _weak_views(12)
        leakguard.uninstall()
        try:
            plain = _weak_views(12)
        finally:
            leakguard.install(integrations="none")
        assert installed == plain

    def test_record_follows_each_new_socket(self) -> None:
        def here() -> tuple[socket.socket, int]:
            return socket.socket(), this_line()

        def there() -> tuple[socket.socket, int]:
            return socket.socket(), this_line()

        for i in range(8):
            s, line = (here if i % 2 else there)()  # same depth, another site: frame items replaced
            with s:
                fd = s.fileno()
                rec = registry.get(fd)
                assert rec is not None and [f.line for f in rec.stack() if os.path.abspath(f.file) == HERE][-1] == line
                del rec
                e = registry.entry(fd)
                assert e is not None and e[0]() is s
                del e
            del s  # gone before the next one: its weak reference is the one pointed at that
            assert registry.get(fd) is None  # stale once closed: nothing reports it

    def test_site_far_into_a_long_function(self) -> None:
        """A creation site whose bytecode offset is beyond the hook's table of offset ints."""
        body = "".join(f"    x{i} = {i}\n" for i in range(3000))
        src = f"def far():\n{body}    return socket.socket(), this_line()\n"
        ns: dict[str, Any] = {"socket": socket, "this_line": this_line}
        exec(compile(src, HERE, "exec"), ns)
        for _ in range(3):
            s, line = ns["far"]()
            with s:
                rec = registry.get(s.fileno())
                assert rec is not None
                assert [f.line for f in rec.stack() if os.path.abspath(f.file) == HERE][-1] == line
