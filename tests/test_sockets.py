"""The core: every creation path is recorded, the kernel state is joined, CLOSE_WAIT is a leak."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import ssl
import subprocess
import sys
import threading

import pytest

import leakguard
from leakguard import registry

from .helpers import HangUpServer, this_line, wait_close_wait

HERE = os.path.abspath(__file__)


def assert_site(info: leakguard.SocketInfo, line: int) -> None:
    site = info.site
    assert site is not None, info
    assert (os.path.abspath(site.file), site.line) == (HERE, line), info.stack
    assert info.site_str.endswith(f"test_sockets.py:{line}")


@pytest.fixture(params=["compiled", "python"])
def hot_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through the compiled hot path and through the pure-Python one."""
    from leakguard import _sockets

    if request.param == "python":
        monkeypatch.setattr(_sockets, "_fast", None)
        _sockets.instrument()  # swaps the compiled __init__ hook for the Python one
        assert vars(socket.socket)["__init__"] is _sockets._hook
    elif _sockets._fast is None:
        pytest.skip("the compiled hot path is not built here (pure-Python install)")
    else:
        assert vars(socket.socket)["__init__"] is not _sockets._hook  # the C method descriptor
    return str(request.param)


@pytest.mark.usefixtures("installed", "hot_path")
class TestCreationPaths:
    """Each way Python creates a socket is recorded with the line that created it."""

    def test_socket_socket_connect(self, hangup_server: HangUpServer) -> None:
        line = this_line() + 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.connect(hangup_server.address)
            info = wait_close_wait(s.fileno())
            assert_site(info, line)
            assert info.origin == "socket"
            assert info.state == "CLOSE_WAIT" and info.type == "tcp" and info.family == "AF_INET"
            assert info.remote == f"127.0.0.1:{hangup_server.port}"
            assert "closed the connection" in (info.reason or "")
        finally:
            s.close()

    def test_create_connection(self, hangup_server: HangUpServer) -> None:
        s = socket.create_connection(hangup_server.address); line = this_line()  # noqa: E702
        try:
            info = wait_close_wait(s.fileno())
            assert_site(info, line)
            # the full stack keeps the stdlib frame below the application's line
            assert info.stack[-1].function == "create_connection"
        finally:
            s.close()

    def test_ipv6(self) -> None:
        if not socket.has_ipv6:
            pytest.skip("no IPv6")
        try:
            srv = HangUpServer(socket.AF_INET6)
        except OSError as exc:
            pytest.skip(f"IPv6 loopback unavailable: {exc}")
        with srv:
            s = socket.create_connection(srv.address); line = this_line()  # noqa: E702
            try:
                info = wait_close_wait(s.fileno())
                assert_site(info, line)
                assert info.family == "AF_INET6" and info.remote == f"[::1]:{srv.port}"
            finally:
                s.close()

    def test_accept(self) -> None:
        """The accepted socket's stack is the accept() call; it leaks when the client hangs up."""
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        try:
            conn, _ = listener.accept(); line = this_line()  # noqa: E702
            client.close()
            try:
                info = wait_close_wait(conn.fileno())
                assert_site(info, line)
                assert info.local == f"127.0.0.1:{listener.getsockname()[1]}"
            finally:
                conn.close()
        finally:
            client.close()
            listener.close()

    def test_fromfd(self, hangup_server: HangUpServer) -> None:
        s = socket.create_connection(hangup_server.address); first = this_line()  # noqa: E702
        dup = socket.fromfd(s.fileno(), socket.AF_INET, socket.SOCK_STREAM); line = this_line()  # noqa: E702
        try:
            assert_site(wait_close_wait(dup.fileno()), line)
            assert_site(wait_close_wait(s.fileno()), first)
        finally:
            dup.close()
            s.close()

    def test_socketpair(self) -> None:
        a, b = socket.socketpair(); line = this_line()  # noqa: E702
        try:
            snap = leakguard.snapshot()
            by_fd = {s.fd: s for s in snap.sockets}
            for sock in (a, b):
                info = by_fd[sock.fileno()]
                assert info.type == "unix" and info.origin == "socket"
                assert_site(info, line)
            assert not [x for x in snap.leaks if x.fd in (a.fileno(), b.fileno())]
        finally:
            a.close()
            b.close()

    def test_ssl_wrap_keeps_creation_stack(self, hangup_server: HangUpServer) -> None:
        """The TLS socket takes over the descriptor and keeps the stack of the plain socket."""
        raw = socket.create_connection(hangup_server.address); line = this_line()  # noqa: E702
        ctx = ssl.create_default_context()
        tls = ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
        try:
            assert raw.fileno() == -1  # detached: the TLS socket owns the descriptor now
            info = wait_close_wait(tls.fileno())
            assert_site(info, line)
            assert info.record is not None and info.record.ref() is tls
        finally:
            tls.close()

    def test_thread(self, hangup_server: HangUpServer) -> None:
        holder: list[socket.socket] = []
        lines: list[int] = []

        def work() -> None:
            holder.append(socket.create_connection(hangup_server.address)); lines.append(this_line())  # noqa: E702

        t = threading.Thread(target=work)
        t.start()
        t.join()
        try:
            assert_site(wait_close_wait(holder[0].fileno()), lines[0])
        finally:
            holder[0].close()

    def test_asyncio_open_connection(self, hangup_server: HangUpServer) -> None:
        result: dict[str, object] = {}

        async def main() -> None:
            reader, writer = await asyncio.open_connection(*hangup_server.address); result["line"] = this_line()  # noqa: E702
            sock = writer.get_extra_info("socket")
            fd = sock.fileno()
            await reader.read()  # EOF: the server hung up
            result["info"] = await asyncio.get_running_loop().run_in_executor(None, wait_close_wait, fd)
            writer.close()
            await writer.wait_closed()

        asyncio.run(main())
        assert_site(result["info"], result["line"])  # type: ignore[arg-type]

    def test_asyncio_create_connection_and_server(self) -> None:
        """Server-side sockets accepted by an asyncio server are recorded too."""
        result: dict[str, object] = {}

        async def main() -> None:
            accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await accepted.put(writer)

            server = await asyncio.start_server(handle, "127.0.0.1", 0); result["server_line"] = this_line()  # noqa: E702
            port = server.sockets[0].getsockname()[1]
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port); result["line"] = this_line()  # noqa: E702
            server_writer = await accepted.get()
            transport.close()  # the client hangs up: the accepted socket goes to CLOSE_WAIT
            fd = server_writer.get_extra_info("socket").fileno()
            info = await loop.run_in_executor(None, wait_close_wait, fd)
            result["info"] = info
            listening = [s for s in leakguard.snapshot().sockets if s.state == "LISTEN" and s.local and s.local.endswith(f":{port}")]
            result["listener"] = listening[0]
            server_writer.close()
            server.close()
            await server.wait_closed()

        asyncio.run(main())
        info = result["info"]
        assert isinstance(info, leakguard.SocketInfo) and info.origin == "socket" and info.stack
        assert_site(result["listener"], result["server_line"])  # type: ignore[arg-type]


class TestJudgement:
    """Only CLOSE_WAIT is a leak; clean programs report nothing."""

    @pytest.mark.usefixtures("installed")
    def test_clean_program_has_no_leaks(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
        try:
            # TIME_WAIT churn: the client closes first, many times over
            for _ in range(50):
                c = socket.create_connection(listener.getsockname())
                a, _ = listener.accept()
                c.close()
                a.close()
            with socket.create_connection(listener.getsockname()):
                a2, _ = listener.accept()
                a2.close()
            snap = leakguard.snapshot()
            assert snap.leaks == []
            states = {s.fd: s.state for s in snap.sockets}
            assert states[listener.fileno()] == "LISTEN"
            assert states[client.fileno()] == "ESTABLISHED"
            assert states[server_side.fileno()] == "ESTABLISHED"
            assert states[udp.fileno()] is None
            assert snap.counts["ESTABLISHED"] >= 2 and "TIME_WAIT" not in snap.counts
        finally:
            for s in (client, server_side, udp, listener):
                s.close()

    @pytest.mark.usefixtures("installed")
    def test_closed_socket_disappears(self, hangup_server: HangUpServer) -> None:
        s = socket.create_connection(hangup_server.address)
        fd = s.fileno()
        wait_close_wait(fd)
        s.close()
        assert not [x for x in leakguard.snapshot().sockets if x.fd == fd and x.origin == "socket"]
        assert registry.get(fd) is None

    @pytest.mark.usefixtures("installed")
    def test_reason_in_words(self, hangup_server: HangUpServer) -> None:
        with socket.create_connection(hangup_server.address) as s:
            info = wait_close_wait(s.fileno())
            reason = info.reason or ""
            assert reason.startswith(f"peer 127.0.0.1:{hangup_server.port} closed the connection; ")
            assert "this process never closed its end, opened " in reason and " ago at " in reason
            text = leakguard.snapshot().format()
            assert "CLOSE_WAIT (the peer closed it" in text  # the test still holds s: in_use words
            assert "test_sockets.py:" in text

    def test_socket_opened_before_install_still_shows(self, hangup_server: HangUpServer) -> None:
        early = socket.create_connection(hangup_server.address)
        leakguard.install()
        try:
            info = wait_close_wait(early.fileno())
            assert info.origin == "unknown" and info.stack == [] and info.age_s is None
            assert "no creation stack" in (info.reason or "")
        finally:
            leakguard.uninstall()
            early.close()

    def test_snapshot_without_install(self, hangup_server: HangUpServer) -> None:
        assert not leakguard.installed()
        with socket.create_connection(hangup_server.address) as s:
            info = wait_close_wait(s.fileno())
            assert info.origin == "unknown" and info.stack == []

    def test_c_level_socket_is_not_dropped(self, hangup_server: HangUpServer) -> None:
        """A descriptor made without socket.socket (here _socket, the C module) appears as unknown."""
        import _socket

        leakguard.install()
        raw = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            raw.connect(hangup_server.address)
            info = wait_close_wait(raw.fileno())
            assert info.origin == "unknown" and info.stack == []
        finally:
            raw.close()
            leakguard.uninstall()


class TestSnapshotShape:
    """snapshot().to_dict() has the documented, JSON-serialisable shape."""

    @pytest.mark.usefixtures("installed")
    def test_shape(self, hangup_server: HangUpServer) -> None:
        with socket.create_connection(hangup_server.address) as s:
            wait_close_wait(s.fileno())
            d = json.loads(json.dumps(leakguard.snapshot().to_dict()))
        assert set(d) >= {"pid", "taken_at", "counts", "fds", "sockets", "leaks"}
        assert d["pid"] == os.getpid() and isinstance(d["taken_at"], float)
        assert set(d["fds"]) == {"open", "limit"} and d["fds"]["open"] > 0
        keys = {"fd", "family", "type", "state", "local", "remote", "age_s", "origin", "target", "pool", "stack", "reason"}
        for sock in d["sockets"] + d["leaks"]:
            assert set(sock) >= keys
            for fr in sock["stack"]:
                assert set(fr) == {"file", "line", "function"}
        assert d["counts"]["CLOSE_WAIT"] >= 1
        assert len(d["leaks"]) >= 1 and all(x["state"] == "CLOSE_WAIT" for x in d["leaks"])
        # outermost first: the innermost frame is last
        leak = d["leaks"][0]
        assert leak["stack"][-1]["function"] == "create_connection"


class TestInstallUninstall:
    """install() is idempotent and configurable; uninstall() restores socket exactly."""

    def test_round_trip_restores_socket(self) -> None:
        before_cls = dict(vars(socket.socket))
        before_mod = dict(vars(socket))
        meta = list(sys.meta_path)
        for _ in range(2):
            leakguard.install()
            leakguard.install(stack_depth=10)
            assert socket.socket.__init__ is not before_cls["__init__"]
            leakguard.uninstall()
            leakguard.uninstall()
        assert vars(socket.socket) == before_cls
        assert all(vars(socket.socket)[k] is v for k, v in before_cls.items())
        assert all(vars(socket)[k] is v for k, v in before_mod.items())
        assert sys.meta_path == meta
        assert registry.stats()["records"] == 0

    def test_uninstall_without_install(self) -> None:
        leakguard.uninstall()
        assert not leakguard.installed()

    def test_reconfigure(self) -> None:
        leakguard.install(stack_depth=5)
        try:
            assert leakguard.get_config().stack_depth == 5
            leakguard.install(stack_depth=7)
            assert leakguard.get_config().stack_depth == 7
        finally:
            leakguard.uninstall()

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("report_interval", -1),
            ("report_interval", "soon"),
            ("report_interval", True),
            ("stack_depth", 0),
            ("stack_depth", "deep"),
            ("integrations", ["nosuchlib"]),
            ("integrations", 3),
            ("log_format", "xml"),
            ("dump_signal", "SIGNOPE"),
            ("checkout_threshold", float("nan")),
        ],
    )
    def test_bad_option_value(self, option: str, value: object) -> None:
        with pytest.raises(ValueError, match=option):
            leakguard.install(**{option: value})
        assert not leakguard.installed()

    def test_unknown_option(self) -> None:
        with pytest.raises(ValueError, match="unknown leakguard option"):
            leakguard.install(repot_interval=3)

    def test_environment_fallback(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("LEAKGUARD_STACK_DEPTH", "9")
        leakguard.install()
        try:
            assert leakguard.get_config().stack_depth == 9
            leakguard.install(stack_depth=11)  # an explicit argument wins
            assert leakguard.get_config().stack_depth == 11
        finally:
            leakguard.uninstall()

    def test_bad_environment_value(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("LEAKGUARD_REPORT_INTERVAL", "often")
        with pytest.raises(ValueError, match="LEAKGUARD_REPORT_INTERVAL"):
            leakguard.install()

    def test_concurrent_install(self) -> None:
        original = vars(socket.socket)["__init__"]
        threads = [threading.Thread(target=leakguard.install) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        leakguard.uninstall()
        assert vars(socket.socket)["__init__"] is original


class TestRegistry:
    """Records vanish with their sockets: the registry never grows with churn."""

    @pytest.mark.usefixtures("installed")
    def test_churn_is_bounded(self) -> None:
        for _ in range(5000):
            socket.socket().close()
        socks = [socket.socket() for _ in range(10)]
        try:
            assert registry.stats()["records"] < 200
            assert registry.prune() >= 10
        finally:
            for s in socks:
                s.close()

    @pytest.mark.usefixtures("installed")
    def test_garbage_collected_socket_drops_record(self) -> None:
        s = socket.socket()
        fd = s.fileno()
        assert registry.get(fd) is not None
        s.close()
        del s
        gc.collect()
        assert registry.get(fd) is None

    @pytest.mark.usefixtures("installed")
    def test_detached_socket_drops_record(self) -> None:
        s = socket.socket()
        fd = s.detach()
        try:
            assert registry.get(fd) is None
        finally:
            os.close(fd)

    @pytest.mark.usefixtures("installed")
    def test_failure_inside_hook_is_contained(self, hot_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
        from leakguard import stacks

        class Broken:
            def __call__(self, *a: object, **k: object) -> None:
                raise RuntimeError("leakguard bug")

        if hot_path == "compiled":
            # No file is known yet and asking about one fails: the walk, inside the record, fails.
            sp = registry._speedups
            sp.configure(registry._records, {}, Broken(), registry.mark(), registry._scope, 48, 3)
            sp.clear_app_cache()

            def restore() -> None:
                sp.configure(
                    registry._records, stacks._app_files, stacks.is_app_file, registry.mark(), registry._scope, 48, 3
                )
                sp.clear_app_cache()

        else:
            monkeypatch.setattr(stacks, "capture", Broken())
            restore = lambda: None  # noqa: E731
        errors = registry.stats()["hook_errors"]
        try:
            with socket.socket() as s:
                assert s.fileno() >= 0 and registry.get(s.fileno()) is None
                s.bind(("127.0.0.1", 0))  # the socket itself works normally
        finally:
            restore()
        assert registry.stats()["hook_errors"] == errors + 1

    @pytest.mark.usefixtures("installed")
    def test_socket_errors_unchanged(self) -> None:
        with pytest.raises(OSError) as installed_exc:
            socket.socket(12345, socket.SOCK_STREAM)
        leakguard.uninstall()
        with pytest.raises(OSError) as plain_exc:
            socket.socket(12345, socket.SOCK_STREAM)
        leakguard.install()
        assert type(installed_exc.value) is type(plain_exc.value)
        assert installed_exc.value.args == plain_exc.value.args
        with pytest.raises(TypeError):
            socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, None, "extra")  # type: ignore[call-arg]


class TestDemo:
    """python -m leakguard demo shows a real CLOSE_WAIT leak with its creation site."""

    def test_demo(self) -> None:
        proc = subprocess.run(
            [sys.executable, "-W", "error", "-m", "leakguard", "demo"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert "CLOSE_WAIT (the peer closed it, your code never did)" in proc.stdout
        assert "demo.py:" in proc.stdout and "1 leaked" in proc.stdout
        assert proc.stderr == ""


class TestCompiledCapture:
    """The compiled stack walk captures exactly what the pure-Python one does."""

    def test_same_frames(self) -> None:
        from leakguard import stacks

        if registry._speedups is None:
            pytest.skip("the compiled hot path is not built here (pure-Python install)")

        def inner(skip: int) -> tuple[object, ...]:
            return (registry._speedups.capture(skip, 48), stacks.capture_py(skip, 48))

        def outer() -> tuple[object, ...]:
            return inner(1)

        compiled, python = outer()
        assert compiled == python and len(compiled) > 0
        assert stacks.frames(compiled)[-1].function == "outer"


@pytest.mark.usefixtures("installed", "hot_path")
class TestEntryReuse:
    """The compiled hook rewrites a reused descriptor's old entry in place when the table
    alone holds it: what anyone else holds never changes, and the new record is whole."""

    def make(self) -> socket.socket:
        return socket.socket()

    def test_reused_descriptor_describes_the_new_socket(self) -> None:
        a = self.make()
        fd = a.fileno()
        first = registry.entry(fd)
        assert first is not None
        a_seq, a_created = first[2], first[1]
        del first  # the table alone holds the entry now: it is rewritten in place
        a.close()
        b = socket.socket()
        line = this_line() - 1
        try:
            assert b.fileno() == fd
            e = registry.entry(fd)
            assert e is not None and e[0]() is b
            assert e[2] > a_seq and e[1] >= a_created
            rec = registry.get(fd)
            assert rec is not None and rec.seq == e[2] and rec.alive()
            assert (HERE, line, "test_reused_descriptor_describes_the_new_socket") in [
                (os.path.abspath(f.file), f.line, f.function) for f in rec.stack()
            ]
            assert "make" not in [f.function for f in rec.stack()]  # nothing left of the old stack
        finally:
            b.close()

    def test_held_entry_and_values_never_change(self) -> None:
        a = self.make()
        fd = a.fileno()
        held = registry.entry(fd)
        assert held is not None
        before = tuple(held)
        seq, created = held[2], held[1]
        seq_value, created_value = int(seq), float(created)
        a.close()
        for _ in range(3):  # the same descriptor again and again
            s = socket.socket()
            assert s.fileno() == fd
            assert registry.entry(fd) is not held
            s.close()
        assert tuple(held) == before and held[2] is seq and held[1] is created
        assert int(seq) == seq_value and float(created) == created_value

    def test_held_values_alone_never_change(self) -> None:
        """Holding only the seq or the time (as marks and reports do) keeps those objects as they were."""
        a = self.make()
        fd = a.fileno()
        e = registry.entry(fd)
        assert e is not None
        seq, created = e[2], e[1]
        seq_value, created_value = int(seq), float(created)
        del e
        a.close()
        b = self.make()
        try:
            assert b.fileno() == fd
            assert int(seq) == seq_value and float(created) == created_value
            new = registry.entry(fd)
            assert new is not None and new[2] == seq_value + 1 and new[2] is not seq and new[1] is not created
        finally:
            b.close()

    @pytest.mark.parametrize("start", [2**30 - 3, 2**60 - 3, 2**62])
    def test_sequence_numbers_across_digit_boundaries(self, start: int) -> None:
        """An int gains a digit at 2**30 and 2**60: one rewritten in place keeps its size, the others are new."""
        from leakguard import stacks

        sp = registry._speedups
        if sp is None:
            pytest.skip("the compiled hot path is not built here (pure-Python install)")
        before = registry.mark()
        sp.configure(registry._records, stacks._app_files, stacks.is_app_file, start, registry._scope, 48, 3)
        try:
            seen = []
            for _ in range(6):
                s = self.make()
                e = registry.entry(s.fileno())
                assert e is not None
                seen.append(e[2])
                del e
                s.close()
            assert seen == list(range(start + 1, start + 7))  # both hooks share the counter
            assert registry.mark() == start + 7
        finally:
            sp.configure(registry._records, stacks._app_files, stacks.is_app_file, before, registry._scope, 48, 3)
