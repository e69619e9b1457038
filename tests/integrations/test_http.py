"""HTTP clients: a leaked connection carries its library, a redacted target and the line that asked for it.

Every test talks to a real loopback HTTP server started here.  The server
answers with a keep-alive response (no ``Connection: close``) and then hangs
up, so any connection the client still holds goes to CLOSE_WAIT in the kernel.
In the leak scenarios it hangs up only when the test says so, after the client
call returned: clients that drop a connection the server has already closed
(httpx, aiohttp do when a response completes) then cannot race the check.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import httpcore._async.connection
import httpcore._sync.connection
import httpx
import pytest
import requests
import urllib3
import urllib3.connection
import wrapt

import leakguard
from leakguard import registry, stacks
from leakguard.integrations import _attribution
from leakguard.integrations import httpx as lg_httpx

from ..helpers import this_line, wait_for

HERE = os.path.abspath(__file__)
BODY = b"hello from the loopback server\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        if self.server.announce_close:  # type: ignore[attr-defined]
            self.send_header("Connection", "close")
        self.end_headers()  # keep-alive as far as the client knows ...
        self.wfile.write(BODY)
        self.wfile.flush()
        if self.server.keep_alive:  # type: ignore[attr-defined]
            return
        self.server.hang_up.wait(30)  # type: ignore[attr-defined]
        self.close_connection = True  # ... but the server hangs up right after

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server:
    """A loopback HTTP/1.1 server in a thread that closes every connection after one response.

    With *hang_up_at_once* false it holds each connection open after the
    response until :meth:`hang_up_now`.  With *keep_alive* it never hangs up.
    """

    def __init__(
        self,
        hang_up_at_once: bool = False,
        keep_alive: bool = False,
        tls: ssl.SSLContext | None = None,
        announce_close: bool = False,
    ) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        # Announcing the hang-up (Connection: close) keeps a client from reusing a connection
        # the server is closing, a race that fails the request itself (not leakguard's concern).
        self.httpd.announce_close = announce_close  # type: ignore[attr-defined]
        self.scheme = "https" if tls is not None else "http"
        if tls is not None:
            # The handshake in the handler's thread, not in accept(): a client that connects and then
            # fails before its hello (an old urllib3's warning made an error) cannot block the server.
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.httpd.keep_alive = keep_alive  # type: ignore[attr-defined]
        self.httpd.hang_up = threading.Event()  # type: ignore[attr-defined]
        if hang_up_at_once:
            self.httpd.hang_up.set()  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.remote = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()

    def url(self, path: str = "/p", credentials: bool = True) -> str:
        auth = "user:secret@" if credentials else ""
        return f"{self.scheme}://{auth}127.0.0.1:{self.port}{path}?token=abc"

    @property
    def target(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def client_leaks(self) -> list[leakguard.SocketInfo]:
        """CLOSE_WAIT sockets of clients talking to this server (not the server's own)."""
        return [s for s in leakguard.snapshot().leaks if s.remote == self.remote]

    def hang_up_now(self) -> None:
        self.httpd.hang_up.set()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.hang_up_now()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server() -> Iterator[Server]:
    """Hangs up after each response, at once."""
    srv = Server(hang_up_at_once=True)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def held_server() -> Iterator[Server]:
    """Hangs up after each response when the test calls hang_up_now()."""
    srv = Server(hang_up_at_once=False)
    try:
        yield srv
    finally:
        srv.close()


def free_port() -> int:
    """A loopback port nobody listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ scenarios
# Each scenario leaks one connection to the server, calls check(line) with the
# line of the call that opened it while the connection is still held, then
# cleans up.  Async scenarios call check() from inside the event loop, which
# blocks it: the kernel moves the socket to CLOSE_WAIT regardless.

Check = Callable[[int], None]


def requests_session_never_closed(srv: Server, check: Check) -> None:
    s = requests.Session()
    try:
        line = this_line() + 1
        r = s.get(srv.url())
        assert r.content == BODY
        check(line)
    finally:
        s.close()


def requests_stream_never_read(srv: Server, check: Check) -> None:
    line = this_line() + 1
    r = requests.get(srv.url(), stream=True)
    try:
        check(line)
    finally:
        r.close()


def urllib3_preload_false_never_released(srv: Server, check: Check) -> None:
    pool = urllib3.PoolManager(retries=False)
    try:
        line = this_line() + 1
        r = pool.request("GET", srv.url(), preload_content=False)
        try:
            check(line)
        finally:
            r.release_conn()
    finally:
        pool.clear()


def http_client_connection_kept(srv: Server, check: Check) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port)
    try:
        line = this_line() + 1
        conn.request("GET", "/p?token=abc")
        assert conn.getresponse().read() == BODY
        check(line)
    finally:
        conn.close()


def urllib_request_response_never_closed(srv: Server, check: Check) -> None:
    line = this_line() + 1
    r = urllib.request.urlopen(srv.url(credentials=False))
    try:
        check(line)
    finally:
        r.close()


def httpx_client_never_closed(srv: Server, check: Check) -> None:
    client = httpx.Client()
    try:
        line = this_line() + 1
        assert client.get(srv.url()).content == BODY
        check(line)
    finally:
        client.close()


def httpx_stream_never_closed(srv: Server, check: Check) -> None:
    with httpx.Client() as client:
        line = this_line() + 1
        r = client.send(client.build_request("GET", srv.url()), stream=True)
        try:
            check(line)
        finally:
            r.close()


def httpx_async_client_never_closed(srv: Server, check: Check) -> None:
    async def main() -> None:
        client = httpx.AsyncClient()
        try:
            line = this_line() + 1
            r = await client.get(srv.url())
            assert r.content == BODY
            check(line)
        finally:
            await client.aclose()

    asyncio.run(main())


def httpx_async_stream_never_closed(srv: Server, check: Check) -> None:
    async def main() -> None:
        async with httpx.AsyncClient() as client:
            line = this_line() + 1
            r = await client.send(client.build_request("GET", srv.url()), stream=True)
            try:
                check(line)
            finally:
                await r.aclose()

    asyncio.run(main())


def aiohttp_session_never_closed(srv: Server, check: Check) -> None:
    async def main() -> None:
        session = aiohttp.ClientSession()
        try:
            line = this_line() + 1
            async with session.get(srv.url()) as r:
                assert await r.read() == BODY
            check(line)
        finally:
            await session.close()

    asyncio.run(main())


def aiohttp_response_never_released(srv: Server, check: Check) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            line = this_line() + 1
            r = await session.get(srv.url())
            try:
                check(line)
            finally:
                r.release()

    asyncio.run(main())


SCENARIOS: list[tuple[Callable[[Server, Check], None], str]] = [
    (requests_session_never_closed, "requests"),
    (requests_stream_never_read, "requests"),
    (urllib3_preload_false_never_released, "urllib3"),
    (http_client_connection_kept, "http.client"),
    (urllib_request_response_never_closed, "http.client"),
    (httpx_client_never_closed, "httpx"),
    (httpx_stream_never_closed, "httpx"),
    (httpx_async_client_never_closed, "httpx"),
    (httpx_async_stream_never_closed, "httpx"),
    (aiohttp_session_never_closed, "aiohttp"),
    (aiohttp_response_never_released, "aiohttp"),
]
IDS = [fn.__name__ for fn, _ in SCENARIOS]


def expect_leak(srv: Server, origin: str, seen: list[leakguard.SocketInfo]) -> Check:
    """A check(): exactly one client socket in CLOSE_WAIT, traced to *line*, *origin*, redacted target."""

    def check(line: int) -> None:
        srv.hang_up_now()
        found = wait_for(srv.client_leaks)
        assert len(found) == 1, leakguard.snapshot().format()
        info = found[0]
        site = info.site
        assert site is not None and (os.path.abspath(site.file), site.line) == (HERE, line), info.stack
        assert info.site_str.endswith(f"test_http.py:{line}")
        assert info.state == "CLOSE_WAIT"
        assert info.origin == origin
        assert info.target == srv.target
        text = json.dumps(leakguard.snapshot().to_dict())
        assert "secret" not in text and "token" not in text
        assert "secret" not in (info.reason or "")
        seen.append(info)

    return check


# ------------------------------------------------------------------ tests


@pytest.mark.usefixtures("installed")
class TestLeakedConnectionIsTraced:
    """A connection the client never gave back shows in CLOSE_WAIT with origin, redacted target and the app's line."""

    @pytest.mark.parametrize(("scenario", "origin"), SCENARIOS, ids=IDS)
    def test_leak(self, held_server: Server, scenario: Callable[[Server, Check], None], origin: str) -> None:
        server = held_server
        seen: list[leakguard.SocketInfo] = []
        scenario(server, expect_leak(server, origin, seen))
        assert len(seen) == 1
        # once the scenario cleaned up, nothing of the client's is left over
        assert wait_for(lambda: not server.client_leaks())

    def test_outer_scope_wins(self, held_server: Server) -> None:
        """An enclosing scope (another integration, or the application) keeps its origin and target."""
        seen: list[leakguard.SocketInfo] = []
        check = expect_leak(held_server, "billing-client", seen)
        with registry.scope("billing-client", held_server.target):
            requests_session_never_closed(held_server, check)

    def test_report_names_library_and_site(self, held_server: Server) -> None:
        server = held_server

        def check(line: int) -> None:
            server.hang_up_now()
            wait_for(server.client_leaks)
            text = leakguard.snapshot().format()
            assert f"test_http.py:{line}" in text
            assert "CLOSE_WAIT" in text and "requests" in text
            assert "secret" not in text and "token" not in text

        requests_session_never_closed(server, check)


@pytest.mark.usefixtures("installed")
class TestCleanUseReportsNothing:
    """Clients used with context managers or closed properly leave no CLOSE_WAIT socket."""

    @pytest.fixture
    def server(self) -> Iterator[Server]:
        """Hangs up after each response, at once, and says so."""
        srv = Server(hang_up_at_once=True, announce_close=True)
        try:
            yield srv
        finally:
            srv.close()

    def test_requests(self, server: Server) -> None:
        with requests.Session() as s:
            assert s.get(server.url()).content == BODY
            with s.get(server.url(), stream=True) as r:
                assert r.content == BODY
        # urllib3 2.8's PoolManager.clear() leaves closing the pools to the garbage
        # collector: a response kept after its session closed keeps its connection
        # (and a CLOSE_WAIT socket) alive through ``r.raw._pool``, and so can a
        # reference cycle until the collector runs.
        del r
        assert requests.get(server.url()).content == BODY
        gc.collect()
        assert not server.client_leaks()

    def test_urllib3(self, server: Server) -> None:
        with urllib3.HTTPConnectionPool("127.0.0.1", server.port) as pool:
            assert pool.request("GET", "/").data == BODY
            r = pool.request("GET", "/", preload_content=False)
            assert r.read() == BODY
            r.release_conn()
        with urllib3.PoolManager() as manager:
            assert manager.request("GET", server.url()).data == BODY
        gc.collect()  # see test_requests: PoolManager leaves closing its pools to the collector
        assert not server.client_leaks()

    def test_http_client_and_urllib_request(self, server: Server) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port)
        conn.request("GET", "/")
        assert conn.getresponse().read() == BODY
        conn.close()
        with urllib.request.urlopen(server.url(credentials=False)) as r:
            assert r.read() == BODY
        assert not server.client_leaks()

    def test_httpx(self, server: Server) -> None:
        with httpx.Client() as client:
            assert client.get(server.url()).content == BODY
            with client.stream("GET", server.url()) as r:
                assert r.read() == BODY

        async def main() -> None:
            async with httpx.AsyncClient() as client:
                assert (await client.get(server.url())).content == BODY

        asyncio.run(main())
        assert not server.client_leaks()

    def test_aiohttp(self, server: Server) -> None:
        async def main() -> None:
            async with aiohttp.ClientSession() as session:
                for _ in range(2):
                    async with session.get(server.url()) as r:
                        assert await r.read() == BODY

        asyncio.run(main())
        assert not server.client_leaks()


#: the (sync class, async class, method) of this httpcore that the httpx integration wraps
_HTTPCORE = next(o for o in lg_httpx._OPENERS if o[2] in vars(getattr(httpcore._sync.connection, o[0], object)))


def _patched_now() -> dict[str, Any]:
    """Every attribute the HTTP integrations patch, as stored in its class right now."""
    return {
        "http.client": vars(http.client.HTTPConnection)["connect"],
        "urllib3": vars(urllib3.connection.HTTPConnection)["_new_conn"],
        "httpx sync": vars(getattr(httpcore._sync.connection, _HTTPCORE[0]))[_HTTPCORE[2]],
        "httpx async": vars(getattr(httpcore._async.connection, _HTTPCORE[1]))[_HTTPCORE[2]],
        "aiohttp": vars(aiohttp.connector.TCPConnector)["_create_connection"],
    }


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1 (made by the openssl command)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("tls")
    certfile, keyfile = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", keyfile, "-out", certfile, "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return certfile, keyfile


@pytest.fixture
def tls_server(cert: tuple[str, str]) -> Iterator[Server]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    srv = Server(tls=ctx)
    try:
        yield srv
    finally:
        srv.close()


def _client_context(cert: tuple[str, str]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert[0])


@pytest.mark.usefixtures("installed")
class TestTls:
    """Over TLS the socket keeps its record through the wrap: origin, https target, the app's line."""

    def test_requests(self, tls_server: Server, cert: tuple[str, str]) -> None:
        seen: list[leakguard.SocketInfo] = []
        check = expect_leak(tls_server, "requests", seen)
        s = requests.Session()
        try:
            line = this_line() + 1
            assert s.get(tls_server.url(), verify=cert[0]).content == BODY
            check(line)
        finally:
            s.close()
        assert seen[0].target.startswith("https://")

    def test_http_client(self, tls_server: Server, cert: tuple[str, str]) -> None:
        seen: list[leakguard.SocketInfo] = []
        check = expect_leak(tls_server, "http.client", seen)
        conn = http.client.HTTPSConnection("127.0.0.1", tls_server.port, context=_client_context(cert))
        try:
            line = this_line() + 1
            conn.request("GET", "/p?token=abc")
            assert conn.getresponse().read() == BODY
            check(line)
        finally:
            conn.close()

    def test_httpx(self, tls_server: Server, cert: tuple[str, str]) -> None:
        seen: list[leakguard.SocketInfo] = []
        check = expect_leak(tls_server, "httpx", seen)
        with httpx.Client(verify=_client_context(cert)) as client:
            line = this_line() + 1
            r = client.send(client.build_request("GET", tls_server.url()), stream=True)
            try:
                check(line)
            finally:
                r.close()

    def test_aiohttp(self, tls_server: Server, cert: tuple[str, str]) -> None:
        seen: list[leakguard.SocketInfo] = []
        check = expect_leak(tls_server, "aiohttp", seen)

        async def main() -> None:
            async with aiohttp.ClientSession() as session:
                line = this_line() + 1
                r = await session.get(tls_server.url(), ssl=_client_context(cert))
                try:
                    check(line)
                finally:
                    r.release()

        asyncio.run(main())


_LEAKGUARD_DIRS = tuple(
    os.path.join(os.path.dirname(os.path.abspath(m.__file__)), "")  # type: ignore[arg-type]
    for m in (leakguard, _attribution)
)


def _collector(calls: list[str]) -> Callable[..., None]:
    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(_LEAKGUARD_DIRS):
            name = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"
            # httpx tries ``import sniffio`` on every async request; when it is not
            # installed the import system asks each finder again, leakguard's
            # post-import watcher too (one set lookup): that is the import's cost.
            if name != "_imports.py:find_spec":
                calls.append(name)

    return profile


def _leakguard_calls(fn: Callable[[], Any]) -> list[str]:
    """The leakguard functions (core or integrations) that run during fn() in this thread."""
    calls: list[str] = []
    sys.setprofile(_collector(calls))
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.usefixtures("installed")
class TestNothingRunsPerRequest:
    """A request on a kept-alive connection runs no leakguard code at all: only new connections pay."""

    @pytest.fixture
    def keep_server(self) -> Iterator[Server]:
        srv = Server(keep_alive=True)
        try:
            yield srv
        finally:
            srv.close()

    def test_requests_and_urllib3(self, keep_server: Server) -> None:
        # Only the pool's checkout and check-in bookkeeping (the pool view, see test_urllib3_pools.py):
        # the same few calls for every request, no socket or scope work.
        with requests.Session() as s:
            first = _leakguard_calls(lambda: s.get(keep_server.url()))  # the new connection
            assert "urllib3.py:_new_conn" in first
            one = _leakguard_calls(lambda: s.get(keep_server.url()))
            assert _leakguard_calls(lambda: [s.get(keep_server.url()) for _ in range(3)]) == one * 3
            assert one[0] == "urllib3.py:_get_conn" and "urllib3.py:_put_conn" in one and len(one) <= 15
            assert not [c for c in one if c.split(":")[0] not in ("urllib3.py", "_pools.py", "registry.py")]

    def test_http_client(self, keep_server: Server) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", keep_server.port)
        try:

            def get() -> None:
                conn.request("GET", "/")
                conn.getresponse().read()

            assert _leakguard_calls(get)
            assert _leakguard_calls(lambda: [get() for _ in range(3)]) == []
        finally:
            conn.close()

    def test_httpx(self, keep_server: Server) -> None:
        with httpx.Client() as client:
            assert _leakguard_calls(lambda: client.get(keep_server.url()))
            assert _leakguard_calls(lambda: [client.get(keep_server.url()) for _ in range(3)]) == []

    def test_async_clients(self, keep_server: Server) -> None:
        async def main() -> None:
            async with httpx.AsyncClient() as client, aiohttp.ClientSession() as session:

                async def both() -> None:
                    await client.get(keep_server.url())
                    async with session.get(keep_server.url()) as r:
                        await r.read()

                first: list[str] = []
                later: list[str] = []
                sys.setprofile(_collector(first))
                try:
                    await both()
                finally:
                    sys.setprofile(None)
                sys.setprofile(_collector(later))
                try:
                    for _ in range(3):
                        await both()
                finally:
                    sys.setprofile(None)
                assert first
                assert later == []

        asyncio.run(main())




class TestInstallUninstall:
    """install() wraps each library's connection entry point; uninstall() puts back the very same objects."""

    def test_uninstall_restores_by_identity(self) -> None:
        before = _patched_now()
        leakguard.install()
        try:
            during = _patched_now()
            for name, obj in during.items():
                assert isinstance(obj, wrapt.FunctionWrapper), name
                assert obj.__wrapped__ is before[name], name
        finally:
            leakguard.uninstall()
        after = _patched_now()
        for name, obj in after.items():
            assert obj is before[name], name
        assert not _attribution._packages

    def test_round_trips(self) -> None:
        before = _patched_now()
        for _ in range(3):
            server = Server()
            leakguard.install()
            leakguard.install()  # idempotent: no double wrapping
            try:
                assert all(o.__wrapped__ is before[n] for n, o in _patched_now().items())
                seen: list[leakguard.SocketInfo] = []
                requests_session_never_closed(server, expect_leak(server, "requests", seen))
            finally:
                leakguard.uninstall()
                server.close()
            assert _patched_now() == before

    def test_only_urllib3_enabled_names_urllib3(self, held_server: Server) -> None:
        server = held_server
        leakguard.install(integrations=["urllib3"])
        try:
            seen: list[leakguard.SocketInfo] = []
            requests_session_never_closed(server, expect_leak(server, "urllib3", seen))
        finally:
            leakguard.uninstall()

    def test_only_requests_enabled_still_hooks_urllib3(self, held_server: Server) -> None:
        server = held_server
        before = _patched_now()
        leakguard.install(integrations=["requests"])
        try:
            assert _patched_now()["urllib3"].__wrapped__ is before["urllib3"]
            assert _patched_now()["http.client"] is before["http.client"]
            seen: list[leakguard.SocketInfo] = []
            requests_session_never_closed(server, expect_leak(server, "requests", seen))
        finally:
            leakguard.uninstall()
        assert _patched_now() == before

    def test_reconfigure_drops_an_integration(self) -> None:
        before = _patched_now()
        leakguard.install()
        try:
            leakguard.install(integrations=["aiohttp"])
            now = _patched_now()
            assert now["aiohttp"] is not before["aiohttp"]
            assert all(now[n] is before[n] for n in now if n != "aiohttp")
        finally:
            leakguard.uninstall()
        assert _patched_now() == before

    def test_library_imported_after_install(self, tmp_path: Any) -> None:
        """In a fresh interpreter: install() first, then import the libraries, then leak."""
        script = textwrap.dedent(
            """
            import json, sys, threading, time
            import leakguard
            from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

            libs = ("requests", "urllib3", "httpx", "httpcore", "aiohttp")
            assert not [m for m in libs if m in sys.modules], [m for m in libs if m in sys.modules]
            leakguard.install()

            class H(BaseHTTPRequestHandler):
                protocol_version = "HTTP/1.1"
                def do_GET(self):
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                    self.close_connection = True
                def log_message(self, *a):
                    pass

            srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            port = srv.server_address[1]

            import requests, urllib3.connection, httpx, httpcore._sync.connection, aiohttp.connector
            # httpcore >= 0.14: HTTPConnection._connect; 0.13 (httpx 0.18-0.20): SyncHTTPConnection._open_socket
            opener = getattr(httpcore._sync.connection, "HTTPConnection", None) or httpcore._sync.connection.SyncHTTPConnection
            method = "_connect" if "_connect" in vars(opener) else "_open_socket"
            wrapped = {
                "urllib3": type(vars(urllib3.connection.HTTPConnection)["_new_conn"]).__name__,
                "httpx": type(vars(opener)[method]).__name__,
                "aiohttp": type(vars(aiohttp.connector.TCPConnector)["_create_connection"]).__name__,
            }
            s = requests.Session()
            line = sys._getframe().f_lineno + 1
            s.get(f"http://user:secret@127.0.0.1:{port}/p?token=abc")
            leaks = []
            for _ in range(200):
                leaks = [l for l in leakguard.snapshot().leaks if l.remote == f"127.0.0.1:{port}"]
                if leaks:
                    break
                time.sleep(0.02)
            out = {
                "wrapped": wrapped,
                "line": line,
                "leaks": [
                    {"origin": l.origin, "target": l.target, "site_line": l.site.line if l.site else None}
                    for l in leaks
                ],
                "json": json.dumps(leakguard.snapshot().to_dict()),
            }
            s.close()
            leakguard.uninstall()
            restored = type(vars(urllib3.connection.HTTPConnection)["_new_conn"]).__name__
            srv.shutdown()
            srv.server_close()
            print(json.dumps({**out, "restored": restored}))
            """
        )
        program = tmp_path / "app.py"
        program.write_text(script)
        proc = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert set(out["wrapped"].values()) == {"FunctionWrapper"}, out["wrapped"]
        assert out["restored"] == "function"
        assert out["leaks"] == [
            {"origin": "requests", "target": out["leaks"][0]["target"], "site_line": out["line"]}
        ]
        assert out["leaks"][0]["target"].startswith("http://127.0.0.1:")
        assert "secret" not in out["json"] and "token" not in out["json"]


# ------------------------------------------------------------------ behaviour unchanged


def _refused_requests(port: int) -> Any:
    return requests.get(f"http://127.0.0.1:{port}/")


def _refused_urllib3(port: int) -> Any:
    with urllib3.PoolManager(retries=False) as pool:
        return pool.request("GET", f"http://127.0.0.1:{port}/")


def _refused_http_client(port: int) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    try:
        conn.request("GET", "/")
    finally:
        conn.close()


def _refused_urllib_request(port: int) -> Any:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/")


def _refused_httpx(port: int) -> Any:
    with httpx.Client() as client:
        return client.get(f"http://127.0.0.1:{port}/")


def _refused_httpx_async(port: int) -> Any:
    async def main() -> Any:
        async with httpx.AsyncClient() as client:
            return await client.get(f"http://127.0.0.1:{port}/")

    return asyncio.run(main())


def _refused_aiohttp(port: int) -> Any:
    async def main() -> Any:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/") as r:
                return await r.read()

    return asyncio.run(main())


REFUSED = [
    _refused_requests,
    _refused_urllib3,
    _refused_http_client,
    _refused_urllib_request,
    _refused_httpx,
    _refused_httpx_async,
    _refused_aiohttp,
]


def _exception_chain(fn: Callable[[int], Any], port: int) -> list[type[BaseException]]:
    with pytest.raises(Exception) as info:
        fn(port)
    chain: list[type[BaseException]] = []
    exc: BaseException | None = info.value
    while exc is not None and len(chain) < 10:
        chain.append(type(exc))
        exc = exc.__cause__ or exc.__context__
    return chain


class TestBehaviourUnchanged:
    """With leakguard installed every client returns and raises exactly what it does without it."""

    @pytest.mark.parametrize("client", REFUSED, ids=[f.__name__.removeprefix("_refused_") for f in REFUSED])
    def test_connection_refused_raises_the_same(self, client: Callable[[int], Any]) -> None:
        port = free_port()
        plain = _exception_chain(client, port)
        leakguard.install()
        try:
            instrumented = _exception_chain(client, port)
        finally:
            leakguard.uninstall()
        assert instrumented == plain
        assert plain  # the chain ends in the kernel's refusal
        assert issubclass(plain[-1], OSError) or any(issubclass(t, OSError) for t in plain)

    def test_responses_are_the_same(self, server: Server) -> None:
        def fetch_all() -> list[Any]:
            out: list[Any] = []
            r = requests.get(server.url())
            out.append((r.status_code, r.content, r.headers.get("Content-Length")))
            with urllib3.PoolManager() as pool:
                r3 = pool.request("GET", server.url())
                out.append((r3.status, r3.data))
            with urllib.request.urlopen(server.url(credentials=False)) as ru:
                out.append((ru.status, ru.read()))
            with httpx.Client() as client:
                rx = client.get(server.url())
                out.append((rx.status_code, rx.content))

            async def aio() -> tuple[int, bytes]:
                async with aiohttp.ClientSession() as session:
                    async with session.get(server.url()) as ra:
                        return ra.status, await ra.read()

            out.append(asyncio.run(aio()))
            return out

        plain = fetch_all()
        leakguard.install()
        try:
            instrumented = fetch_all()
        finally:
            leakguard.uninstall()
        assert instrumented == plain

    def test_failure_of_ours_is_contained(self, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
        """If leakguard's own bookkeeping breaks, the request still succeeds, only the attribution is lost."""
        leakguard.install()
        try:

            def broken(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("leakguard bug")

            monkeypatch.setattr(stacks, "capture", broken)
            errors = registry.stats()["hook_errors"]
            with requests.Session() as s:
                assert s.get(server.url()).content == BODY
            assert registry.stats()["hook_errors"] > errors
        finally:
            monkeypatch.undo()
            leakguard.uninstall()

    def test_scope_does_not_outlive_the_call(self, server: Server) -> None:
        """After the library call (and after a failed one) no scope is left open in the caller's context."""
        leakguard.install()
        try:
            with requests.Session() as s:
                s.get(server.url())
            assert registry.current_scope() is None
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://127.0.0.1:{free_port()}/")
            assert registry.current_scope() is None

            async def main() -> None:
                async with aiohttp.ClientSession() as session:
                    async with session.get(server.url()) as r:
                        await r.read()
                assert registry.current_scope() is None

            asyncio.run(main())
        finally:
            leakguard.uninstall()
