"""Database drivers: a connection the server killed is traced to the line that opened it.

Every test talks to the real server on this machine (PostgreSQL, MariaDB,
Redis).  The server ends the connection (``pg_terminate_backend``, ``KILL``,
``CLIENT KILL``) while the client still holds it, so the client's socket goes
to CLOSE_WAIT in the kernel; ``snapshot()`` must then name the driver, the
redacted target and the test's own ``connect()`` line, and never the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import asyncpg.connection
import asyncpg.pool
import psycopg
import psycopg2
import psycopg2.pool
import psycopg_pool
import psycopg_pool.null_pool
import psycopg_pool.null_pool_async
import psycopg_pool.pool
import psycopg_pool.pool_async
import pymysql
import pymysql.connections
import pytest
import redis
import redis.connection
import sqlalchemy.engine.default
import sqlalchemy.pool.base
from sqlalchemy import event
from sqlalchemy.engine.url import make_url
from sqlalchemy.pool import Pool

import leakguard
from leakguard.integrations import _pools

try:  # redis-py 4.1 and later: one attempt, no retry
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    NO_RETRY: dict[str, Any] = {"retry": Retry(NoBackoff(), 0)}
except ImportError:  # 3.5: no Retry; a refused connection is not retried
    NO_RETRY = {}
try:  # redis-py 4.2 and later
    import redis.asyncio
    import redis.asyncio.connection

    HAVE_REDIS_ASYNCIO = True
except ImportError:
    HAVE_REDIS_ASYNCIO = False
needs_redis_asyncio = pytest.mark.skipif(
    not HAVE_REDIS_ASYNCIO, reason=f"redis-py {redis.__version__} has no redis.asyncio (4.2 and later)"
)
from leakguard.integrations import sqlalchemy as lg_sqlalchemy

from ..helpers import dbapi, driver_sql, require_service, this_line, wait_close_wait

HERE = os.path.abspath(__file__)
PASSWORD = "s3cret-pw"  # trust auth on the test server: PostgreSQL accepts any password
PG_KW = dict(host="127.0.0.1", port=5432, dbname="test", user="postgres", password=PASSWORD)
PG_DSN = f"host=127.0.0.1 port=5432 dbname=test user=postgres password={PASSWORD}"
PG_URL = f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/test"
PG_TARGET = "postgresql://postgres:***@127.0.0.1:5432/test"
DB_ORIGINS = {"psycopg2", "psycopg", "asyncpg", "pymysql", "redis", "sqlalchemy"}


def assert_traced(info: leakguard.SocketInfo, line: int, origin: str, target: str) -> None:
    """The leak names the test's line, the origin and the redacted target, and no password."""
    assert info.state == "CLOSE_WAIT"
    assert info.origin == origin, info
    assert info.target == target, info
    site = info.site
    assert site is not None, info
    assert (os.path.abspath(site.file), site.line) == (HERE, line), info.stack
    assert info.reason is not None and f"test_db.py:{line}" in info.reason
    assert PASSWORD not in json.dumps(leakguard.snapshot().to_dict())
    assert PASSWORD not in leakguard.snapshot().format()


def db_sockets() -> list[leakguard.SocketInfo]:
    return [s for s in leakguard.snapshot().sockets if s.origin in DB_ORIGINS]


# --------------------------------------------------------------------------- fixtures (the killers are in conftest.py)


@pytest.fixture
def mysql_user() -> Iterator[str]:
    """A MariaDB user with a password (root has none here), dropped afterwards."""
    require_service("mariadb")
    name = f"lg_app_{os.getpid()}"
    admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")
    try:
        with admin.cursor() as cur, warnings.catch_warnings():
            # PyMySQL < 1.0 turns the server's note "user doesn't exist" into a Python warning
            warnings.simplefilter("ignore", pymysql.err.Warning)
            cur.execute(f"DROP USER IF EXISTS '{name}'@'%'")
            cur.execute(f"CREATE USER '{name}'@'%' IDENTIFIED BY '{PASSWORD}'")
            cur.execute(f"GRANT ALL ON test.* TO '{name}'@'%'")
        yield name
    finally:
        with admin.cursor() as cur, warnings.catch_warnings():
            warnings.simplefilter("ignore", pymysql.err.Warning)
            cur.execute(f"DROP USER IF EXISTS '{name}'@'%'")
        admin.close()


# --------------------------------------------------------------------------- drivers


@pytest.mark.usefixtures("installed")
class TestPsycopg2:
    """psycopg2's libpq socket (created in C) is adopted through ``conn.fileno()``."""

    def test_killed_connection_traced_to_connect_line(self, pg_kill: Callable[[int], None]) -> None:
        conn = psycopg2.connect(PG_DSN)
        line = this_line() - 1
        try:
            pg_kill(conn.get_backend_pid())
            leak = wait_close_wait(conn.fileno())
            assert_traced(leak, line, "psycopg2", PG_TARGET)
            assert leak.record is not None and leak.record.ref is not None
        finally:
            conn.close()

    def test_keyword_arguments_and_url(self, pg_kill: Callable[[int], None]) -> None:
        conn = psycopg2.connect(**PG_KW)  # type: ignore[arg-type]
        line = this_line() - 1
        other = psycopg2.connect(PG_URL)
        try:
            pg_kill(conn.get_backend_pid())
            assert_traced(wait_close_wait(conn.fileno()), line, "psycopg2", PG_TARGET)
            (entry,) = [s for s in leakguard.snapshot().sockets if s.fd == other.fileno()]
            assert entry.state == "ESTABLISHED" and entry.origin == "psycopg2" and entry.target == PG_TARGET
        finally:
            conn.close()
            other.close()

    def test_clean_use_reports_nothing(self) -> None:
        require_service("postgres")
        with psycopg2.connect(PG_DSN) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
            assert [s.origin for s in db_sockets()] == ["psycopg2"]
        conn.close()
        assert db_sockets() == []
        assert leakguard.snapshot().leaks == []


@pytest.mark.usefixtures("installed")
class TestPsycopg:
    """psycopg 3 (sync and async): the libpq socket is adopted at connect()."""

    def test_killed_connection_traced(self, pg_kill: Callable[[int], None]) -> None:
        conn = psycopg.connect(PG_DSN)
        line = this_line() - 1
        try:
            pg_kill(conn.info.backend_pid)
            assert_traced(wait_close_wait(conn.fileno()), line, "psycopg", PG_TARGET)
        finally:
            conn.close()

    def test_connection_class_connect(self, pg_kill: Callable[[int], None]) -> None:
        conn = psycopg.Connection.connect(PG_URL)
        line = this_line() - 1
        try:
            pg_kill(conn.info.backend_pid)
            assert_traced(wait_close_wait(conn.fileno()), line, "psycopg", PG_TARGET)
        finally:
            conn.close()

    def test_async_connection(self, pg_kill: Callable[[int], None]) -> None:
        async def main() -> None:
            conn = await psycopg.AsyncConnection.connect(PG_DSN)
            line = this_line() - 1
            try:
                pg_kill(conn.info.backend_pid)
                # Blocking the loop on purpose: the driver cannot react before we look.
                assert_traced(wait_close_wait(conn.fileno()), line, "psycopg", PG_TARGET)
            finally:
                await conn.close()

        asyncio.run(main())

    def test_clean_use_reports_nothing(self) -> None:
        require_service("postgres")
        with psycopg.connect(PG_DSN) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert [s.origin for s in db_sockets()] == ["psycopg"]
        assert db_sockets() == []
        assert leakguard.snapshot().leaks == []


@pytest.mark.usefixtures("installed")
class TestAsyncpg:
    """asyncpg's asyncio socket carries origin asyncpg and the line that awaited connect()."""

    def test_killed_connection_traced(self, pg_kill: Callable[[int], None]) -> None:
        async def main() -> None:
            conn = await asyncpg.connect(PG_URL)
            line = this_line() - 1
            try:
                pg_kill(conn.get_server_pid())
                sock = conn._transport.get_extra_info("socket")  # type: ignore[attr-defined]
                assert_traced(wait_close_wait(sock.fileno()), line, "asyncpg", PG_TARGET)
            finally:
                conn.terminate()

        asyncio.run(main())

    def test_keyword_arguments(self, pg_kill: Callable[[int], None]) -> None:
        async def main() -> None:
            conn = await asyncpg.connection.connect(
                host="127.0.0.1", port=5432, user="postgres", password=PASSWORD, database="test"
            )
            line = this_line() - 3
            try:
                pg_kill(conn.get_server_pid())
                sock = conn._transport.get_extra_info("socket")  # type: ignore[attr-defined]
                assert_traced(wait_close_wait(sock.fileno()), line, "asyncpg", PG_TARGET)
            finally:
                conn.terminate()

        asyncio.run(main())

    def test_clean_use_reports_nothing(self) -> None:
        require_service("postgres")

        async def main() -> None:
            conn = await asyncpg.connect(PG_URL)
            try:
                assert await conn.fetchval("SELECT 1") == 1
                assert [s.origin for s in db_sockets()] == ["asyncpg"]
            finally:
                await conn.close()

        asyncio.run(main())
        assert db_sockets() == []
        assert leakguard.snapshot().leaks == []


@pytest.mark.usefixtures("installed")
class TestPyMySQL:
    """PyMySQL's socket carries origin pymysql and a ``mysql://user:***@...`` target."""

    def test_killed_connection_traced(self, mysql_kill: Callable[[int], None], mysql_user: str) -> None:
        conn = pymysql.connect(host="127.0.0.1", port=3306, user=mysql_user, password=PASSWORD, database="test")
        line = this_line() - 1
        try:
            mysql_kill(conn.thread_id())
            leak = wait_close_wait(conn._sock.fileno())  # type: ignore[union-attr]
            assert_traced(leak, line, "pymysql", f"mysql://{mysql_user}:***@127.0.0.1:3306/test")
        finally:
            conn._force_close()  # type: ignore[attr-defined]

    def test_clean_use_reports_nothing(self) -> None:
        require_service("mariadb")
        # closing(): a PyMySQL < 1.0 connection's own context manager is a deprecated transaction
        with contextlib.closing(pymysql.connect(host="127.0.0.1", user="root", database="test")) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
            (entry,) = db_sockets()
            assert (entry.origin, entry.target) == ("pymysql", "mysql://root@127.0.0.1:3306/test")
        assert db_sockets() == []
        assert leakguard.snapshot().leaks == []


@pytest.mark.usefixtures("installed")
class TestRedis:
    """redis-py, sync and asyncio: the socket is traced to the command that opened it."""

    def test_killed_connection_traced(self, redis_kill: Callable[[int], None]) -> None:
        client = redis.Redis(host="127.0.0.1", port=6379, db=1)
        try:
            client_id = client.client_id()
            line = this_line() - 1
            redis_kill(client_id)
            conn = client.connection_pool._available_connections[0]  # type: ignore[attr-defined]
            assert_traced(wait_close_wait(conn._sock.fileno()), line, "redis", "redis://127.0.0.1:6379/1")
        finally:
            client.close()

    @needs_redis_asyncio
    def test_asyncio(self, redis_kill: Callable[[int], None]) -> None:
        async def main() -> None:
            client = redis.asyncio.Redis(host="127.0.0.1", port=6379)
            try:
                client_id = await client.client_id()
                line = this_line() - 1
                redis_kill(client_id)
                conn = client.connection_pool._available_connections[0]  # type: ignore[attr-defined]
                sock = conn._writer.transport.get_extra_info("socket")
                assert_traced(wait_close_wait(sock.fileno()), line, "redis", "redis://127.0.0.1:6379/0")
            finally:
                await client.aclose()

        asyncio.run(main())

    def test_clean_use_reports_nothing(self) -> None:
        require_service("redis")
        with redis.Redis(host="127.0.0.1", port=6379) as client:
            assert client.ping() is True
            assert [s.origin for s in db_sockets()] == ["redis"]
        client.connection_pool.disconnect()  # redis-py < 4.0's close() leaves the pool's connections open
        assert db_sockets() == []
        assert leakguard.snapshot().leaks == []


@pytest.mark.usefixtures("installed")
class TestSQLAlchemyEngine:
    """Sockets an Engine's pool opens show origin sqlalchemy and the driver in the target's scheme."""

    def test_psycopg2_engine(self, pg_kill: Callable[[int], None]) -> None:
        engine = sqlalchemy.create_engine(f"postgresql+psycopg2://postgres:{PASSWORD}@127.0.0.1:5432/test")
        try:
            conn = engine.connect()
            line = this_line() - 1
            pid = driver_sql(conn, "SELECT pg_backend_pid()").scalar()
            fd = dbapi(conn).fileno()  # type: ignore[union-attr]
            pg_kill(pid)  # type: ignore[arg-type]
            leak = wait_close_wait(fd)
            assert_traced(leak, line, "sqlalchemy", "postgresql+psycopg2://postgres:***@127.0.0.1:5432/test")
            conn.invalidate()
            conn.close()
        finally:
            engine.dispose()

    def test_pymysql_engine(self, mysql_kill: Callable[[int], None], mysql_user: str) -> None:
        engine = sqlalchemy.create_engine(f"mysql+pymysql://{mysql_user}:{PASSWORD}@127.0.0.1/test")
        try:
            conn = engine.connect()
            line = this_line() - 1
            thread_id = driver_sql(conn, "SELECT CONNECTION_ID()").scalar()
            fd = dbapi(conn)._sock.fileno()  # type: ignore[union-attr]
            mysql_kill(thread_id)  # type: ignore[arg-type]
            leak = wait_close_wait(fd)
            target = f"mysql+pymysql://{mysql_user}:***@127.0.0.1:3306/test"
            assert_traced(leak, line, "sqlalchemy", target)
            conn.invalidate()
            conn.close()
        finally:
            engine.dispose()

    def test_engine_alone_adopts_the_driver_socket(self, pg_kill: Callable[[int], None]) -> None:
        """With only the sqlalchemy integration, libpq's socket is still adopted at the dialect."""
        leakguard.install(integrations=["sqlalchemy"])
        engine = sqlalchemy.create_engine(f"postgresql+psycopg2://postgres:{PASSWORD}@127.0.0.1:5432/test")
        try:
            conn = engine.connect()
            line = this_line() - 1
            pid = driver_sql(conn, "SELECT pg_backend_pid()").scalar()
            fd = dbapi(conn).fileno()  # type: ignore[union-attr]
            pg_kill(pid)  # type: ignore[arg-type]
            leak = wait_close_wait(fd)
            assert_traced(leak, line, "sqlalchemy", "postgresql+psycopg2://postgres:***@127.0.0.1:5432/test")
            assert leak.pool is not None and leak.pool["checked_out"] is True
            conn.invalidate()
            conn.close()
        finally:
            engine.dispose()

    def test_dialect_target_from_connect_arguments(self) -> None:
        dialect = sqlalchemy.create_engine("postgresql+psycopg2://u:pw@db.example:6543/orders").dialect
        url = make_url("postgresql+psycopg2://u:pw@db.example:6543/orders")
        cargs, cparams = dialect.create_connect_args(url)
        target = lg_sqlalchemy.dialect_target(dialect, cargs, cparams)
        assert target == "postgresql+psycopg2://u:***@db.example:6543/orders"


# --------------------------------------------------------------------------- behaviour and uninstall


def _patched_attributes() -> list[tuple[Any, str]]:
    return [
        (psycopg2, "connect"),
        (psycopg, "connect"),
        (psycopg.Connection, "connect"),
        (psycopg.AsyncConnection, "connect"),
        (asyncpg, "connect"),
        (asyncpg.connection, "connect"),
        (pymysql.connections.Connection, "connect"),
        (redis.connection.Connection, "_connect"),
        (redis.connection.SSLConnection, "_connect"),
        (redis.connection.UnixDomainSocketConnection, "_connect"),
        (redis.connection.ConnectionPool, "get_connection"),
        (redis.connection.ConnectionPool, "release"),
        (redis.connection.BlockingConnectionPool, "get_connection"),
        (redis.connection.BlockingConnectionPool, "release"),
        (sqlalchemy.engine.default.DefaultDialect, "connect"),
        (psycopg_pool.pool.ConnectionPool, "__init__"),
        (psycopg_pool.pool.ConnectionPool, "_connect"),
        (psycopg_pool.pool.ConnectionPool, "getconn"),
        (psycopg_pool.pool.ConnectionPool, "putconn"),
        (psycopg_pool.pool_async.AsyncConnectionPool, "__init__"),
        (psycopg_pool.pool_async.AsyncConnectionPool, "_connect"),
        (psycopg_pool.pool_async.AsyncConnectionPool, "getconn"),
        (psycopg_pool.pool_async.AsyncConnectionPool, "putconn"),
        (psycopg_pool.null_pool.NullConnectionPool, "__init__"),
        (psycopg_pool.null_pool_async.AsyncNullConnectionPool, "__init__"),
        (sqlalchemy.pool.base._ConnectionRecord, "_ConnectionRecord__connect"),
        (psycopg2.pool.AbstractConnectionPool, "__init__"),
        (psycopg2.pool.AbstractConnectionPool, "_connect"),
        (psycopg2.pool.AbstractConnectionPool, "_getconn"),
        (psycopg2.pool.AbstractConnectionPool, "_putconn"),
        (psycopg2.pool.AbstractConnectionPool, "_closeall"),
        (psycopg2.pool.SimpleConnectionPool, "getconn"),
        (psycopg2.pool.SimpleConnectionPool, "putconn"),
        (psycopg2.pool.SimpleConnectionPool, "closeall"),
        (asyncpg.pool.Pool, "__init__"),
        (asyncpg.pool.Pool, "_get_new_connection"),
        (asyncpg.pool.Pool, "_acquire"),
        (asyncpg.pool.Pool, "release"),
        (asyncpg.pool.Pool, "close"),
        (asyncpg.pool.Pool, "terminate"),
    ] + (
        [
            (redis.asyncio.connection.Connection, "_connect"),
            (redis.asyncio.connection.UnixDomainSocketConnection, "_connect"),
            (redis.asyncio.connection.ConnectionPool, "get_connection"),
            (redis.asyncio.connection.ConnectionPool, "release"),
        ]
        if HAVE_REDIS_ASYNCIO
        else []
    )


def _current(owner: Any, attr: str) -> Any:
    return vars(owner).get(attr) if isinstance(owner, type) else getattr(owner, attr)


class TestUninstall:
    """Uninstall puts back every original object (by identity) and every listener goes."""

    def test_originals_restored(self) -> None:
        before = [(o, a, _current(o, a)) for o, a in _patched_attributes()]
        leakguard.install()
        try:
            changed = [(o, a) for o, a, orig in before if _current(o, a) is not orig]
            assert changed == [(o, a) for o, a, _ in before]
            assert event.contains(Pool, "checkout", lg_sqlalchemy._on_checkout)
        finally:
            leakguard.uninstall()
        for owner, attr, orig in before:
            assert _current(owner, attr) is orig, (owner, attr)
        assert not event.contains(Pool, "checkout", lg_sqlalchemy._on_checkout)
        assert not event.contains(Pool, "checkin", lg_sqlalchemy._on_checkin)

    def test_reinstall_works(self, pg_kill: Callable[[int], None]) -> None:
        leakguard.install()
        leakguard.uninstall()
        leakguard.install()
        try:
            conn = psycopg2.connect(PG_DSN)
            line = this_line() - 1
            try:
                pg_kill(conn.get_backend_pid())
                assert_traced(wait_close_wait(conn.fileno()), line, "psycopg2", PG_TARGET)
            finally:
                conn.close()
        finally:
            leakguard.uninstall()

    def test_library_imported_after_install(self) -> None:
        require_service("postgres")
        code = textwrap.dedent(
            f"""
            import sys, leakguard
            leakguard.install()
            assert "psycopg2" not in sys.modules
            import psycopg2
            conn = psycopg2.connect({PG_DSN!r})
            (info,) = [s for s in leakguard.snapshot().sockets if s.fd == conn.fileno()]
            assert info.origin == "psycopg2", info
            assert info.site.line == 6, info.stack
            conn.close()
            original = psycopg2.connect.__wrapped__
            leakguard.uninstall()
            assert psycopg2.connect is original
            print("ok")
            """
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "ok"


def _error(call: Callable[[], Any]) -> tuple[type[BaseException], str]:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - compared as they are
        return type(exc), str(exc)
    raise AssertionError("no error")


class TestBehaviourUnchanged:
    """With leakguard installed, a failing connect raises exactly what it raises without."""

    CALLS: dict[str, Callable[[], Any]] = {
        "psycopg2": lambda: psycopg2.connect(host="127.0.0.1", port=1, dbname="test", user="postgres"),
        "psycopg": lambda: psycopg.connect("host=127.0.0.1 port=1 dbname=test user=postgres"),
        "pymysql": lambda: pymysql.connect(host="127.0.0.1", port=1, user="root", connect_timeout=2),
        "redis": lambda: redis.Redis(host="127.0.0.1", port=1, **NO_RETRY).ping(),
        "asyncpg": lambda: asyncio.run(asyncpg.connect(host="127.0.0.1", port=1, user="postgres")),
    }

    @pytest.mark.parametrize("name", sorted(CALLS))
    def test_same_exception(self, name: str) -> None:
        plain = _error(self.CALLS[name])
        leakguard.install()
        try:
            instrumented = _error(self.CALLS[name])
        finally:
            leakguard.uninstall()
        assert instrumented == plain

    def test_same_results(self) -> None:
        require_service("postgres")
        require_service("redis")
        leakguard.install()
        try:
            with psycopg2.connect(PG_DSN) as conn, conn.cursor() as cur:
                assert type(conn) is psycopg2.extensions.connection
                cur.execute("SELECT 41 + 1")
                assert cur.fetchone() == (42,)
            conn.close()
            with redis.Redis(host="127.0.0.1", port=6379) as client:
                assert client.set("leakguard-test-key", b"v") is True
                assert client.get("leakguard-test-key") == b"v"
                assert client.delete("leakguard-test-key") == 1
        finally:
            leakguard.uninstall()
        assert _pools.check_thresholds() == []
