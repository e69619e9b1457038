"""urllib3 pools (and so requests Sessions): a dead keep-alive connection says where it is.

The loopback server here answers with a keep-alive response and then hangs up,
as a server with an idle timeout does: a connection urllib3 returned to its pool
sits there in CLOSE_WAIT.  The snapshot says it is idle in which pool
(``scheme://host:port``, maxsize), since when, and which ``requests.Session``
owns the pool; a response never released keeps its connection checked out,
with the checkout stack and age.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3

import leakguard
from leakguard import registry
from leakguard.integrations import _pools

from ..helpers import PYTHON_STRICT, this_line, wait_for
from .test_http import Server, cert, server, tls_server  # noqa: F401  (fixtures)

HERE = os.path.abspath(__file__)


def dead(srv: Server) -> leakguard.SocketInfo:
    """The one client connection to *srv* in CLOSE_WAIT."""
    leaks = wait_for(srv.client_leaks)
    assert len(leaks) == 1, leakguard.snapshot().sockets
    return leaks[0]  # type: ignore[no-any-return]


def at(frames: list[dict[str, Any]], line: int) -> bool:
    ours = [f for f in frames if os.path.abspath(f["file"]) == HERE]
    return bool(ours) and ours[-1]["line"] == line


def site_line(info: leakguard.SocketInfo) -> int | None:
    site = info.site
    return site.line if site is not None and os.path.abspath(site.file) == HERE else None


@pytest.mark.usefixtures("installed")
class TestPoolState:
    """Idle or checked out, which pool, since when, and whose."""

    def test_session_connection_idle_in_pool(self, server: Server) -> None:
        session = requests.Session()
        session_line = this_line() - 1
        try:
            assert session.get(server.url(credentials=False)).text.startswith("hello")
            get_line = this_line() - 1
            leak = dead(server)
            assert leak.origin == "requests" and site_line(leak) == get_line
            pool = leak.pool
            assert pool is not None
            assert pool["name"] == f"urllib3 HTTPConnectionPool(http://127.0.0.1:{server.port}, maxsize=10)"
            assert pool["checked_out"] is False and pool["checkout_stack"] == []
            assert isinstance(pool["idle_s"], float) and pool["idle_s"] >= 0
            assert pool["owner"].startswith(f"requests.Session {id(session):#x} created at ")
            assert pool["owner"].endswith(f"{Path(HERE).name}:{session_line}")
            assert leak.reason is not None
            assert f"idle in pool {pool['name']} (owned by requests.Session" in leak.reason
            assert " for " in leak.reason.split("idle in pool", 1)[1]
            assert json.dumps(leakguard.snapshot().to_dict())  # the pool view serialises
        finally:
            session.close()
        assert wait_for(lambda: not server.client_leaks())  # closing the Session closed it

    def test_response_never_released_is_checked_out(self, server: Server) -> None:
        with urllib3.PoolManager(maxsize=3) as manager:
            resp = manager.request("GET", server.url(credentials=False), preload_content=False)
            line = this_line() - 1
            leak = dead(server)
            assert leak.origin == "urllib3" and site_line(leak) == line
            pool = leak.pool
            assert pool is not None and pool["checked_out"] is True
            assert pool["name"] == f"urllib3 HTTPConnectionPool(http://127.0.0.1:{server.port}, maxsize=3)"
            assert at(pool["checkout_stack"], line)
            assert isinstance(pool["checkout_age_s"], float) and pool["checkout_age_s"] >= 0
            assert pool["owner"] is None  # no Session: the manager belongs to the application
            assert leak.reason is not None and f"checked out of pool {pool['name']}" in leak.reason
            resp.release_conn()
            after = wait_for(lambda: [s for s in server.client_leaks() if s.pool and not s.pool["checked_out"]])
            assert after and after[0].pool is not None and after[0].pool["idle_s"] is not None

    def test_session_stream_never_read_is_checked_out(self, server: Server) -> None:
        with requests.Session() as session:
            resp = session.get(server.url(credentials=False), stream=True)
            line = this_line() - 1
            leak = dead(server)
            assert leak.pool is not None and leak.pool["checked_out"] is True
            assert at(leak.pool["checkout_stack"], line)
            assert leak.pool["owner"] is not None and leak.pool["owner"].startswith("requests.Session 0x")
            resp.close()

    def test_connection_opened_before_install_is_adopted_at_checkout(self, server: Server) -> None:
        leakguard.uninstall()
        with urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=1) as pool:
            keep = Server(keep_alive=True)
            try:
                with urllib3.HTTPConnectionPool("127.0.0.1", keep.port, maxsize=1) as kpool:
                    assert kpool.request("GET", "/").status == 200  # a socket made before leakguard
                    leakguard.install()
                    resp = kpool.request("GET", "/", preload_content=False)
                    line = this_line() - 1
                    sock = resp.connection.sock  # type: ignore[union-attr]
                    (entry,) = [s for s in leakguard.snapshot().sockets if s.fd == sock.fileno()]
                    assert entry.origin == "urllib3" and entry.stack == []  # creation unknown, and said so
                    assert entry.pool is not None and entry.pool["checked_out"] is True
                    assert at(entry.pool["checkout_stack"], line)
                    resp.release_conn()
            finally:
                keep.close()
            assert pool.num_connections == 0

    def test_https_pool_keeps_the_link_through_the_tls_wrap(self, tls_server: Server, cert: tuple[str, str]) -> None:
        with requests.Session() as session:
            assert session.get(tls_server.url(credentials=False), verify=cert[0]).ok
            line = this_line() - 1
            tls_server.hang_up_now()
            leak = dead(tls_server)
            assert site_line(leak) == line and leak.target == f"https://127.0.0.1:{tls_server.port}"
            assert leak.pool is not None and leak.pool["checked_out"] is False
            assert leak.pool["name"] == f"urllib3 HTTPSConnectionPool(https://127.0.0.1:{tls_server.port}, maxsize=10)"
            assert leak.pool["owner"] is not None and leak.pool["owner"].startswith("requests.Session")

    def test_clean_use_reports_nothing(self) -> None:
        srv = Server(keep_alive=True)
        try:
            for _ in range(3):
                with requests.Session() as s:
                    assert s.get(srv.url(credentials=False)).status_code == 200
                with urllib3.PoolManager() as m:
                    assert m.request("GET", srv.url(credentials=False)).status == 200
            assert not srv.client_leaks()
            ours = [s for s in leakguard.snapshot().sockets if s.remote == srv.remote]
            assert ours == []
        finally:
            srv.close()

    def test_bookkeeping_failure_is_contained(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("leakguard bug (injected)")

        monkeypatch.setattr(_pools, "_link", broken)
        before = registry.stats()["hook_errors"]
        srv = Server(keep_alive=True)  # no hang-up: the second request reuses the connection
        try:
            with requests.Session() as s:
                assert s.get(srv.url(credentials=False)).text.startswith("hello")
                resp = s.get(srv.url(credentials=False), stream=True)
                assert resp.raw.read() == b"hello from the loopback server\n"
                resp.close()
        finally:
            srv.close()
        assert registry.stats()["hook_errors"] > before


class TestProcessWide:
    """A pool reachable from a module global, directly or one attribute down."""

    def test_default_pool_and_module_globals(self, server: Server, tmp_path: Path) -> None:
        leakguard.install()
        try:
            if hasattr(urllib3, "_DEFAULT_POOL"):  # urllib3 2.x: urllib3.request() uses urllib3._DEFAULT_POOL
                urllib3.request("GET", server.url(credentials=False))
                leak = dead(server)
                assert leak.record is not None and leak.record.pool is not None
                try:
                    assert _pools.process_wide(leak.record.pool) == "urllib3._DEFAULT_POOL"
                finally:  # the process-wide pool would keep this CLOSE_WAIT socket for every later test
                    urllib3._DEFAULT_POOL.clear()
            with requests.Session() as s:
                s.get(server.url("/s", credentials=False))
                (info,) = wait_for(lambda: [x for x in server.client_leaks() if x.pool and x.pool["owner"]])
                assert info.record is not None and info.record.pool is not None
                assert _pools.process_wide(info.record.pool) is None  # a local Session
                holder = type(sys)("pools_test_holder")
                holder.__dict__["client"] = type("C", (), {})()
                holder.client.session = s
                sys.modules["pools_test_holder"] = holder
                try:
                    assert _pools.process_wide(info.record.pool) == "pools_test_holder.client.session"
                finally:
                    del sys.modules["pools_test_holder"]
        finally:
            leakguard.uninstall()


class TestClose:
    """``HTTPConnection.close()`` ends a checkout: a connection closed and dropped is not held."""

    @pytest.fixture(autouse=True)
    def _threshold(self) -> Any:
        leakguard.install(checkout_threshold=3600)
        try:
            yield
        finally:
            leakguard.uninstall()
            assert _pools._timer[0] is None

    def test_closed_and_dropped_is_not_reported_as_held(self) -> None:
        keep = Server(keep_alive=True)
        try:
            with urllib3.HTTPConnectionPool("127.0.0.1", keep.port, maxsize=1) as pool:
                resp = pool.request("GET", "/", preload_content=False)
                info = _pools.info_of(resp.connection)
                assert info is not None and info.checked_out
                resp.close()  # urllib3 closes the connection; it never goes back to the pool
                assert not info.checked_out
                assert _pools.check_thresholds(now=time.monotonic() + 3601) == []
                assert id(info) not in _pools._watched
                assert pool.request("GET", "/").status == 200  # the pool goes on with a new connection
        finally:
            keep.close()

    def test_held_connection_is_reported_with_its_creation_site(self) -> None:
        keep = Server(keep_alive=True)
        try:
            with urllib3.HTTPConnectionPool("127.0.0.1", keep.port, maxsize=1) as pool:
                resp = pool.request("GET", "/", preload_content=False)
                line = this_line() - 1
                try:
                    # checked out before urllib3 opened its socket: the watch follows the socket opened after
                    (event,) = _pools.check_thresholds(now=time.monotonic() + 3601)
                finally:
                    resp.release_conn()
        finally:
            keep.close()
        assert event["checkout_site"].endswith(f"{Path(HERE).name}:{line}")
        assert event["created_at"] is not None and event["created_at"].endswith(f"{Path(HERE).name}:{line}")
        assert event["fd"] is not None and event["origin"] == "urllib3"


# ------------------------------------------------------------------ fresh interpreters

CHILD = """\
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ORDER = sys.argv[1]
if ORDER == "before":
    import requests
import leakguard
leakguard.install()
if ORDER == "after":
    import requests


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
        self.close_connection = True  # keep-alive as far as the client knows, then hang up

    def log_message(self, *a):
        pass


srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
port = srv.server_address[1]
session = requests.Session()  # SESSION
session.get(f"http://127.0.0.1:{port}/")  # GET
out = []
for _ in range(250):
    out = [s for s in leakguard.snapshot().leaks if s.remote == f"127.0.0.1:{port}"]
    if out:
        break
    time.sleep(0.02)
print(json.dumps([{"origin": s.origin, "line": s.site.line if s.site else None, "pool": s.pool} for s in out]))
session.close()
srv.shutdown()
srv.server_close()
leakguard.uninstall()
"""


def _line(marker: str) -> int:
    return next(n for n, text in enumerate(CHILD.splitlines(), 1) if marker in text)


@pytest.mark.parametrize("order", ["before", "after"])
def test_both_import_orders_in_a_fresh_interpreter(order: str, tmp_path: Path) -> None:
    program = tmp_path / "app.py"
    program.write_text(textwrap.dedent(CHILD))
    proc = subprocess.run(
        [*PYTHON_STRICT, str(program), order],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # not the repo root: the installed package, not ./leakguard
        env={k: v for k, v in os.environ.items() if not k.startswith("LEAKGUARD_")},
    )
    assert proc.returncode == 0, proc.stderr
    assert "leakguard" not in proc.stderr, proc.stderr  # nothing printed by us
    (leak,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert leak["origin"] == "requests" and leak["line"] == _line("# GET")
    pool = leak["pool"]
    assert pool["checked_out"] is False and pool["idle_s"] is not None
    assert pool["name"].startswith("urllib3 HTTPConnectionPool(http://127.0.0.1:") and "maxsize=10" in pool["name"]
    assert pool["owner"].startswith("requests.Session 0x") and pool["owner"].endswith(f"app.py:{_line('# SESSION')}")


# ------------------------------------------------------------------ behaviour unchanged


def _observe(port: int) -> list[Any]:
    """What a program can see of urllib3's pools: results, errors, counts, introspection."""
    import inspect

    out: list[Any] = []
    cp = urllib3.connectionpool.HTTPConnectionPool
    out.append([str(inspect.signature(getattr(cp, m))) for m in ("_get_conn", "_put_conn")])
    out.append([getattr(cp, m).__name__ for m in ("_get_conn", "_put_conn")])
    pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1, block=True)
    r = pool.request("GET", "/", preload_content=False)
    try:
        pool.request("GET", "/", pool_timeout=0.01, retries=False)
    except Exception as exc:  # the only connection is out and the pool blocks
        out.append(type(exc).__name__)
    r.release_conn()
    out.append((pool.num_connections, pool.num_requests, pool.pool.qsize()))  # type: ignore[union-attr]
    try:
        pool._put_conn(pool._new_conn())  # a full blocking pool refuses the extra connection
    except Exception as exc:
        out.append(type(exc).__name__)
    out.append(pool.pool.qsize())  # type: ignore[union-attr]
    pool.close()
    try:
        pool._get_conn()
    except Exception as exc:
        out.append(type(exc).__name__)
    pool._put_conn(None)  # urllib3 tolerates None
    with requests.Session() as s:
        out.append(s.get(f"http://127.0.0.1:{port}/").status_code)
        out.append(sorted(s.adapters))
    return out


def test_installed_and_plain_behave_the_same() -> None:
    srv = Server(keep_alive=True)
    try:
        plain = _observe(srv.port)
        leakguard.install()
        try:
            installed = _observe(srv.port)
        finally:
            leakguard.uninstall()
        assert installed == plain
        assert plain[2] in ("EmptyPoolError", "MaxRetryError")
    finally:
        srv.close()
