"""No secret ever leaves leakguard: not in snapshot(), not in the watcher's logs, not in metrics.

Every case connects for real (local PostgreSQL, MariaDB, Redis, loopback HTTP
servers) through the real integrations with credentials and tokens in every
place a client accepts them (URL userinfo, ``?password=``, libpq keywords,
connect() arguments, ``Authorization`` headers, unix-socket DSNs).  Each
connection is then made to leak (the server hangs up while the client holds
it) so that it appears in every output with its redacted target; the test
proves the connection is visible with a target *and* that no secret appears.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import leakguard
from leakguard import watcher

from .helpers import require_service, wait_for


class Outputs:
    """Everything leakguard can emit, gathered after the connections exist."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def collect(self, fds: set[int]) -> tuple[str, list[leakguard.SocketInfo]]:
        """Wait until every TCP fd in *fds* is in CLOSE_WAIT, let the watcher report, return all text."""

        def ours() -> list[leakguard.SocketInfo]:
            return [s for s in leakguard.snapshot().sockets if s.fd in fds and (s.leaked or s.type != "tcp")]

        found = wait_for(lambda: len(ours()) == len(fds) and ours(), timeout=10)
        assert found, [s for s in leakguard.snapshot().sockets if s.fd in fds]
        w = watcher.current()
        assert w is not None
        ticks = w.ticks
        # two ticks: under load a tick's diagnosis may spend its budget (2 s) on a big test worker's heap
        assert wait_for(lambda: w.ticks >= ticks + 2, timeout=60)
        snap = leakguard.snapshot()
        parts = [json.dumps(snap.to_dict()), snap.format(stack_limit=50), repr(snap.sockets)]
        parts += [repr(s.record) for s in snap.sockets]
        try:
            import prometheus_client

            from leakguard import metrics

            reg = prometheus_client.CollectorRegistry()
            metrics.register(reg)
            try:
                metrics.update(snap)
                parts.append(prometheus_client.generate_latest(reg).decode())
            finally:
                metrics.unregister(reg)
        except ImportError:
            pass
        captured = self.capsys.readouterr()
        parts += [captured.err, captured.out]
        return "\n".join(parts), found


@pytest.fixture
def outputs(capsys: pytest.CaptureFixture[str]) -> Iterator[Outputs]:
    leakguard.install(report_interval=0.05, log_format="json", max_events_per_minute=100_000)
    try:
        yield Outputs(capsys)
    finally:
        leakguard.uninstall()


def assert_clean(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"secret {secret!r} found in leakguard output"


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    """Answers, then hangs up: a client holding the response sits in CLOSE_WAIT."""

    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def do_GET(self) -> None:
        _Handler.seen.append(self.headers.get("Authorization", ""))
        body = b"x" * 100_000  # more than the socket buffers: the client keeps the connection until read
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body[:1000])
        except OSError:
            pass
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, int]]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield "127.0.0.1", srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _fd_of_response(resp: Any) -> int:
    """The descriptor under a requests/urllib3 streaming response."""
    raw = getattr(resp, "raw", resp)
    fp = getattr(raw, "_fp", None)
    sock = fp.fp.raw._sock if fp is not None else None
    return int(sock.fileno())


HTTP_SECRETS = {
    "user": "httpUs3r",
    "pass": "Basic-Pa55w0rd",
    "q_password": "QueryPa55wd",
    "q_token": "QueryT0ken123",
    "header": "Bearer-Hdr-T0ken-xyz",
    "path": "PathS3gment",
    "fragment": "FragS3cret",
}


def _http_secrets() -> list[str]:
    s = HTTP_SECRETS
    basic = base64.b64encode(f"{s['user']}:{s['pass']}".encode()).decode()
    return [s["pass"], s["q_password"], s["q_token"], s["header"], s["path"], s["fragment"], basic]


def _url(host: str, port: int, userinfo: bool = True) -> str:
    s = HTTP_SECRETS
    auth = f"{s['user']}:{s['pass']}@" if userinfo else ""
    return (
        f"http://{auth}{host}:{port}/{s['path']}"
        f"?password={s['q_password']}&token={s['q_token']}&access_token={s['q_token']}#{s['fragment']}"
    )


class TestHTTP:
    """requests, urllib3, httpx and http.client: userinfo, query, path and Authorization never appear."""

    def test_requests(self, outputs: Outputs, http_server: tuple[str, int]) -> None:
        requests = pytest.importorskip("requests")
        host, port = http_server
        with requests.Session() as session:
            r1 = session.get(_url(host, port, userinfo=False), headers={"Authorization": HTTP_SECRETS["header"]}, stream=True, timeout=5)
            r2 = requests.get(_url(host, port), auth=(HTTP_SECRETS["user"], HTTP_SECRETS["pass"]), stream=True, timeout=5)
            try:
                text, found = outputs.collect({_fd_of_response(r1), _fd_of_response(r2)})
                assert {s.origin for s in found} == {"requests"}
                assert {s.target for s in found} == {f"http://{host}:{port}"}
                assert_clean(text, _http_secrets())
            finally:
                r1.close()
                r2.close()
        assert HTTP_SECRETS["header"] in _Handler.seen  # the header really went out

    def test_urllib3(self, outputs: Outputs, http_server: tuple[str, int]) -> None:
        urllib3 = pytest.importorskip("urllib3")
        host, port = http_server
        headers = urllib3.util.make_headers(basic_auth=f"{HTTP_SECRETS['user']}:{HTTP_SECRETS['pass']}")
        with urllib3.PoolManager() as pm:
            r = pm.request("GET", _url(host, port), headers=headers, preload_content=False, timeout=5)
            try:
                text, found = outputs.collect({_fd_of_response(r)})
                assert found[0].origin == "urllib3" and found[0].target == f"http://{host}:{port}"
                assert_clean(text, _http_secrets())
            finally:
                r.release_conn()
                r.close()

    def test_httpx(self, outputs: Outputs, http_server: tuple[str, int]) -> None:
        httpx = pytest.importorskip("httpx")
        host, port = http_server
        with httpx.Client(auth=(HTTP_SECRETS["user"], HTTP_SECRETS["pass"]), timeout=5) as client:
            before = {s.fd for s in leakguard.snapshot().sockets}
            with client.stream("GET", _url(host, port), headers={"Authorization": HTTP_SECRETS["header"]}):
                fds = {
                    s.fd for s in leakguard.snapshot().sockets
                    if s.fd not in before and s.remote == f"{host}:{port}" and s.fd is not None
                }
                assert len(fds) == 1
                text, found = outputs.collect(fds)
                assert found[0].origin == "httpx" and found[0].target == f"http://{host}:{port}"
                assert_clean(text, _http_secrets())

    def test_http_client(self, outputs: Outputs, http_server: tuple[str, int]) -> None:
        import http.client

        host, port = http_server
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.request("GET", _url(host, port), headers={"Authorization": HTTP_SECRETS["header"]})
            resp = conn.getresponse()
            assert conn.sock is not None
            text, found = outputs.collect({conn.sock.fileno()})
            assert found[0].target is None or found[0].target == f"http://{host}:{port}"
            assert_clean(text, _http_secrets())
            resp.close()
        finally:
            conn.close()


# --------------------------------------------------------------------------- databases


def _kill_from_server(kind: str, ids: list[Any]) -> None:
    """Make the server hang up on the given sessions (their client ends go to CLOSE_WAIT)."""
    if kind == "postgres":
        import psycopg2

        admin = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="test")
        admin.autocommit = True
        try:
            with admin.cursor() as cur:
                for pid in ids:
                    cur.execute("select pg_terminate_backend(%s)", (pid,))
        finally:
            admin.close()
    elif kind == "mariadb":
        import pymysql

        admin = pymysql.connect(host="127.0.0.1", user="root", database="test")
        try:
            with admin.cursor() as cur:
                for tid in ids:
                    cur.execute(f"KILL {int(tid)}")
        finally:
            admin.close()
    elif kind == "redis":
        import redis

        admin = redis.Redis(host="127.0.0.1", port=6379)
        try:
            for cid in ids:
                admin.client_kill_filter(_id=cid)
        finally:
            admin.close()


PG = {"url": "PgUrlPa55", "kv": "PgKvPa55", "kw": "PgKwPa55", "query": "PgQueryPa55", "sa": "PgSaPa55", "unix": "PgUnixPa55"}


class TestPostgres:
    """psycopg2, psycopg, asyncpg and SQLAlchemy DSNs (URL, ?password=, libpq keywords, unix socket)."""

    def test_psycopg2_and_sqlalchemy(self, outputs: Outputs) -> None:
        require_service("postgres")
        psycopg2 = pytest.importorskip("psycopg2")
        sqlalchemy = pytest.importorskip("sqlalchemy")
        conns = [
            psycopg2.connect(f"postgresql://postgres:{PG['url']}@127.0.0.1:5432/test?application_name=x"),
            psycopg2.connect(f"host=127.0.0.1 port=5432 user=postgres password={PG['kv']} dbname=test"),
            psycopg2.connect(host="127.0.0.1", user="postgres", password=PG["kw"], dbname="test"),
            psycopg2.connect(f"postgresql://postgres@127.0.0.1/test?password={PG['query']}"),
        ]
        unix_dir = "/var/run/postgresql"
        if os.path.exists(os.path.join(unix_dir, ".s.PGSQL.5432")):
            try:
                conns.append(psycopg2.connect(f"postgresql://postgres:{PG['unix']}@/test?host={unix_dir}"))
            except psycopg2.OperationalError:
                pass  # local auth is not trust here: the TCP cases still cover the driver
        engine = sqlalchemy.create_engine(f"postgresql+psycopg2://postgres:{PG['sa']}@127.0.0.1:5432/test")
        sa_conn = engine.connect()
        try:
            raw = sa_conn.connection.dbapi_connection
            pids = [c.get_backend_pid() for c in conns] + [raw.get_backend_pid()]
            fds = {c.fileno() for c in conns} | {raw.fileno()}
            _kill_from_server("postgres", pids)
            text, found = outputs.collect(fds)
            assert {s.origin for s in found} <= {"psycopg2", "sqlalchemy"} and "sqlalchemy" in {s.origin for s in found}
            assert all(s.target and "postgres:***@" in s.target for s in found), [(s.fd, s.target) for s in found]
            assert_clean(text, list(PG.values()))
        finally:
            for c in conns:
                c.close()
            sa_conn.invalidate()
            sa_conn.close()
            engine.dispose()

    def test_psycopg3_and_asyncpg(self, outputs: Outputs) -> None:
        require_service("postgres")
        psycopg = pytest.importorskip("psycopg")
        asyncpg = pytest.importorskip("asyncpg")
        import asyncio

        c1 = psycopg.connect(f"postgresql://postgres:{PG['url']}@127.0.0.1:5432/test")
        c2 = psycopg.connect(f"host=127.0.0.1 user=postgres password={PG['kv']} dbname=test")
        try:
            fds = {c1.fileno(), c2.fileno()}
            _kill_from_server("postgres", [c1.info.backend_pid, c2.info.backend_pid])
            text, found = outputs.collect(fds)
            assert {s.origin for s in found} == {"psycopg"}
            assert_clean(text, list(PG.values()))
        finally:
            c1.close()
            c2.close()

        async def run() -> str:
            conn = await asyncpg.connect(f"postgresql://postgres:{PG['query']}@127.0.0.1:5432/test")
            try:
                # asyncio closes a transport on EOF, so this one is checked while ESTABLISHED
                fd = conn._transport.get_extra_info("socket").fileno()
                snap = leakguard.snapshot()
                found = [s for s in snap.sockets if s.fd == fd]
                assert found and found[0].origin == "asyncpg" and found[0].target, found
                w = watcher.current()
                assert w is not None
                ticks = w.ticks
                while w.ticks < ticks + 2:
                    await asyncio.sleep(0.02)
                return json.dumps(snap.to_dict()) + snap.format(stack_limit=50) + repr(found[0].record)
            finally:
                conn.terminate()

        assert_clean(asyncio.run(run()), list(PG.values()))


MY_USER, MY_PASS = "lg_secret_user", "MyPa55-w0rd"


@pytest.fixture
def mariadb_user() -> Iterator[None]:
    require_service("mariadb")
    pymysql = pytest.importorskip("pymysql")
    admin = pymysql.connect(host="127.0.0.1", user="root", database="test")
    try:
        with admin.cursor() as cur:
            for host in ("127.0.0.1", "localhost"):
                cur.execute(f"CREATE USER IF NOT EXISTS '{MY_USER}'@'{host}' IDENTIFIED BY '{MY_PASS}'")
                cur.execute(f"GRANT ALL ON test.* TO '{MY_USER}'@'{host}'")
        yield
    finally:
        with admin.cursor() as cur:
            for host in ("127.0.0.1", "localhost"):
                cur.execute(f"DROP USER IF EXISTS '{MY_USER}'@'{host}'")
        admin.close()


class TestMariaDB:
    """pymysql and SQLAlchemy with a real password (TCP and unix socket)."""

    def test_pymysql_and_sqlalchemy(self, outputs: Outputs, mariadb_user: None) -> None:
        import pymysql
        import sqlalchemy

        conns = [pymysql.connect(host="127.0.0.1", user=MY_USER, password=MY_PASS, database="test")]
        if os.path.exists("/run/mysqld/mysqld.sock"):
            conns.append(
                pymysql.connect(unix_socket="/run/mysqld/mysqld.sock", user=MY_USER, password=MY_PASS, database="test")
            )
        engine = sqlalchemy.create_engine(f"mysql+pymysql://{MY_USER}:{MY_PASS}@127.0.0.1:3306/test")
        sa_conn = engine.connect()
        try:
            raw = sa_conn.connection.dbapi_connection
            all_conns = conns + [raw]
            ids = [c.thread_id() for c in all_conns]
            fds = {c._sock.fileno() for c in all_conns}
            _kill_from_server("mariadb", ids)
            text, found = outputs.collect(fds)
            origins = {s.origin for s in found}
            assert origins <= {"pymysql", "sqlalchemy"} and "sqlalchemy" in origins, found
            assert all(s.target and MY_USER in s.target for s in found), found
            assert_clean(text, [MY_PASS])
        finally:
            for c in conns:
                c.close()
            sa_conn.invalidate()
            sa_conn.close()
            engine.dispose()


R_USER, R_PASS = "lg_secret_user", "RedisPa55-w0rd"


@pytest.fixture
def redis_user() -> Iterator[None]:
    require_service("redis")
    redis = pytest.importorskip("redis")
    admin = redis.Redis(host="127.0.0.1", port=6379)
    try:
        admin.acl_setuser(R_USER, enabled=True, passwords=[f"+{R_PASS}"], keys=["*"], commands=["+@all"])
        yield
    finally:
        admin.acl_deluser(R_USER)
        admin.close()


class TestRedis:
    """redis-py with ACL credentials in the URL and as arguments."""

    def test_redis(self, outputs: Outputs, redis_user: None) -> None:
        import redis

        clients = [
            redis.Redis.from_url(f"redis://{R_USER}:{R_PASS}@127.0.0.1:6379/0"),
            redis.Redis(host="127.0.0.1", port=6379, username=R_USER, password=R_PASS),
            redis.Redis.from_url(f"redis://127.0.0.1:6379/0?username={R_USER}&password={R_PASS}"),
        ]
        try:
            ids = [c.client_id() for c in clients]  # one real connection each, returned to the pool
            fds = set()
            for c in clients:
                pool = c.connection_pool
                for conn in pool._available_connections:
                    fds.add(conn._sock.fileno())
            assert len(fds) == 3
            _kill_from_server("redis", ids)
            text, found = outputs.collect(fds)
            assert {s.origin for s in found} == {"redis"}
            assert all(s.target and s.target.startswith("redis://") for s in found), found
            assert_clean(text, [R_PASS])
        finally:
            for c in clients:
                c.close()
                c.connection_pool.disconnect()
