"""The socket hook (leakguard._sockets): every way Python creates a socket is recorded with the line that created it."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading

import pytest

import leakguard

from .helpers import HangUpServer, this_line, wait_close_wait

HERE = os.path.abspath(__file__)


def assert_site(info: leakguard.SocketInfo, line: int) -> None:
    site = info.site
    assert site is not None, info
    assert (os.path.abspath(site.file), site.line) == (HERE, line), info.stack
    assert info.site_str.endswith(f"test_sockets.py:{line}")


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
