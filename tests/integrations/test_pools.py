"""Connection pools: idle vs checked out, checkout stack and age, and ``checkout_threshold``.

A dead connection (the server ended it, the client socket is in CLOSE_WAIT)
means different things in a pool: idle in the pool, the pool will drop it; checked
out, the application holds it and must give it back.  The snapshot says which,
with the checkout stack.  Connections held longer than ``checkout_threshold``
are reported (once) with their checkout stack, and again when they come back.
Everything runs against the real servers on this machine.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import psycopg2.pool
import psycopg_pool
import pytest
import redis
import sqlalchemy
from structlog.testing import capture_logs

import leakguard
from leakguard import registry
from leakguard.integrations import _pools

from ..helpers import checkout_args, dbapi, driver_sql, require_service, this_line, wait_close_wait, wait_for

HERE = os.path.abspath(__file__)
PASSWORD = "s3cret-pw"  # trust auth: any password works, and must never show
PG_DSN = f"host=127.0.0.1 port=5432 dbname=test user=postgres password={PASSWORD}"
SA_URL = f"postgresql+psycopg2://postgres:{PASSWORD}@127.0.0.1:5432/test"
PG_URL = f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/test"
PG_TARGET = "postgresql://postgres:***@127.0.0.1:5432/test"
EVENTS = ("leakguard.checkout_threshold", "leakguard.checkout_returned")


def at_line(frames: list[dict[str, Any]], line: int) -> bool:
    """Is the innermost frame of this file in *frames* (outermost first) at *line*?"""
    ours = [f for f in frames if os.path.abspath(f["file"]) == HERE]
    return bool(ours) and ours[-1]["line"] == line


def site_is(info: leakguard.SocketInfo, line: int) -> bool:
    site = info.site
    return site is not None and (os.path.abspath(site.file), site.line) == (HERE, line)


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("leakguard bug (injected)")


def checkout_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") in EVENTS]


@pytest.fixture
def engine() -> Iterator[sqlalchemy.Engine]:
    require_service("postgres")
    eng = sqlalchemy.create_engine(SA_URL, pool_size=2)
    try:
        yield eng
    finally:
        eng.dispose()


# --------------------------------------------------------------------------- SQLAlchemy


@pytest.mark.usefixtures("installed")
class TestSQLAlchemyPool:
    """An Engine's pooled connection in CLOSE_WAIT says whether it is idle or checked out."""

    def test_idle_in_pool(self, engine: sqlalchemy.Engine, pg_kill: Callable[[int], None]) -> None:
        with engine.connect() as conn:
            line = this_line() - 1
            pid = driver_sql(conn, "SELECT pg_backend_pid()").scalar()
            fd = dbapi(conn).fileno()  # type: ignore[union-attr]
        pg_kill(pid)  # type: ignore[arg-type]
        leak = wait_close_wait(fd)
        assert leak.origin == "sqlalchemy"
        assert leak.target == "postgresql+psycopg2://postgres:***@127.0.0.1:5432/test"
        assert site_is(leak, line), leak.stack
        assert leak.pool is not None and leak.pool["idle_s"] >= 0  # idle since its check-in
        assert {k: v for k, v in leak.pool.items() if k != "idle_s"} == {
            "name": "sqlalchemy QueuePool",
            "checked_out": False,
            "checkout_age_s": None,
            "checkout_stack": [],
            "owner": None,
        }
        assert leak.reason is not None
        assert "idle in pool sqlalchemy QueuePool" in leak.reason and "checked out" not in leak.reason

    def test_checked_out(self, engine: sqlalchemy.Engine, pg_kill: Callable[[int], None]) -> None:
        with engine.connect() as first:
            created = this_line() - 1
            driver_sql(first, "SELECT 1")
        conn = engine.connect()  # the same pooled connection, checked out again here
        checkout = this_line() - 1
        try:
            pid = driver_sql(conn, "SELECT pg_backend_pid()").scalar()
            fd = dbapi(conn).fileno()  # type: ignore[union-attr]
            pg_kill(pid)  # type: ignore[arg-type]
            leak = wait_close_wait(fd)
            assert site_is(leak, created), leak.stack
            assert leak.pool is not None
            assert leak.pool["checked_out"] is True
            assert leak.pool["checkout_age_s"] >= 0
            assert at_line(leak.pool["checkout_stack"], checkout), leak.pool["checkout_stack"]
            assert leak.reason is not None
            assert "checked out of pool sqlalchemy QueuePool" in leak.reason
            assert f"test_pools.py:{checkout}" in leak.reason
            assert "must return or close it" in leak.reason
        finally:
            conn.invalidate()
            conn.close()

    def test_clean_use_reports_nothing(self, engine: sqlalchemy.Engine) -> None:
        for _ in range(3):
            with engine.connect() as conn:
                assert driver_sql(conn, "SELECT 1").scalar() == 1
        (entry,) = [s for s in leakguard.snapshot().sockets if s.origin == "sqlalchemy"]
        assert entry.state == "ESTABLISHED" and entry.pool is not None and not entry.pool["checked_out"]
        assert leakguard.snapshot().leaks == []
        engine.dispose()
        assert [s for s in leakguard.snapshot().sockets if s.origin == "sqlalchemy"] == []


@pytest.mark.usefixtures("installed")
class TestSQLAlchemyAsyncio:
    """asyncio engines: sites cross SQLAlchemy's greenlet bridge back to the application's await lines."""

    @pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
    def test_creation_and_checkout_sites(self, driver: str, pg_kill: Callable[[int], None]) -> None:
        pytest.importorskip("greenlet", reason="SQLAlchemy's asyncio support needs greenlet (sqlalchemy[asyncio])")
        pytest.importorskip("sqlalchemy.ext.asyncio", reason=f"SQLAlchemy {sqlalchemy.__version__} has no asyncio support (1.4 and later)")
        from sqlalchemy.ext.asyncio import create_async_engine

        async def main() -> None:
            engine = create_async_engine(f"postgresql+{driver}://postgres:{PASSWORD}@127.0.0.1:5432/test")
            try:
                async with engine.connect() as conn:
                    line = this_line() - 1
                    pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
                    fd = _pools.fd_of((await conn.get_raw_connection()).dbapi_connection)
                    assert fd is not None
                    pg_kill(pid)  # type: ignore[arg-type]
                    leak = wait_close_wait(fd)  # the loop is blocked: the driver cannot react
                    assert (leak.origin, leak.target) == (
                        "sqlalchemy",
                        f"postgresql+{driver}://postgres:***@127.0.0.1:5432/test",
                    )
                    assert site_is(leak, line), leak.stack
                    assert leak.pool is not None and leak.pool["name"] == "sqlalchemy AsyncAdaptedQueuePool"
                    assert leak.pool["checked_out"] is True
                    assert at_line(leak.pool["checkout_stack"], line)
                    await conn.invalidate()
            finally:
                await engine.dispose()

        asyncio.run(main())


# --------------------------------------------------------------------------- psycopg_pool


@pytest.mark.usefixtures("installed")
class TestPsycopgPool:
    """psycopg_pool: connections opened by its workers are attributed to the pool's creation line."""

    def test_idle_in_pool(self, pg_kill: Callable[[int], None]) -> None:
        with psycopg_pool.ConnectionPool(PG_DSN, min_size=1, max_size=1, open=True, name="orders") as pool:
            line = this_line() - 1
            pool.wait()
            with pool.connection() as conn:
                pid, fd = conn.info.backend_pid, conn.fileno()
            pg_kill(pid)
            leak = wait_close_wait(fd)
            assert (leak.origin, leak.target) == ("psycopg", "postgresql://postgres:***@127.0.0.1:5432/test")
            assert site_is(leak, line), leak.stack
            assert leak.pool is not None and leak.pool["name"] == "psycopg_pool orders"
            assert leak.pool["checked_out"] is False
            assert leak.reason is not None and "idle in pool psycopg_pool orders" in leak.reason

    def test_pool_alone_adopts_with_pool_creation_line(self) -> None:
        """With only the psycopg_pool integration, the libpq socket is adopted when the pool opens it."""
        require_service("postgres")
        leakguard.install(integrations=["psycopg_pool"])
        with psycopg_pool.ConnectionPool(PG_DSN, min_size=1, max_size=1, open=True) as pool:
            line = this_line() - 1
            with pool.connection() as conn:
                (entry,) = [s for s in leakguard.snapshot().sockets if s.fd == conn.fileno()]
                assert entry.origin == "psycopg" and site_is(entry, line), entry.stack
                assert entry.target == "postgresql://postgres:***@127.0.0.1:5432/test"
                assert entry.pool is not None and entry.pool["checked_out"] is True

    def test_checked_out(self, pg_kill: Callable[[int], None]) -> None:
        with psycopg_pool.ConnectionPool(PG_DSN, min_size=1, max_size=1, open=True, name="orders") as pool:
            pool.wait()
            conn = pool.getconn()
            line = this_line() - 1
            try:
                pg_kill(conn.info.backend_pid)
                leak = wait_close_wait(conn.fileno())
                assert leak.pool is not None and leak.pool["checked_out"] is True
                assert at_line(leak.pool["checkout_stack"], line), leak.pool["checkout_stack"]
                assert leak.reason is not None and f"test_pools.py:{line}" in leak.reason
            finally:
                pool.putconn(conn)

    def test_connection_context_manager_checkout_stack(self) -> None:
        require_service("postgres")
        with psycopg_pool.ConnectionPool(PG_DSN, min_size=1, max_size=1, open=True) as pool:
            with pool.connection() as conn:
                line = this_line() - 1
                (entry,) = [s for s in leakguard.snapshot().sockets if s.fd == conn.fileno()]
                assert entry.pool is not None and entry.pool["checked_out"] is True
                assert at_line(entry.pool["checkout_stack"], line)
            (entry,) = [s for s in leakguard.snapshot().sockets if s.origin == "psycopg"]
            assert entry.pool is not None and entry.pool["checked_out"] is False
        assert [s for s in leakguard.snapshot().sockets if s.origin == "psycopg"] == []
        assert leakguard.snapshot().leaks == []

    def test_async_pool(self) -> None:
        require_service("postgres")

        async def main() -> None:
            async with psycopg_pool.AsyncConnectionPool(PG_DSN, min_size=1, max_size=1, open=False) as pool:
                created = this_line() - 1
                async with pool.connection() as conn:
                    checkout = this_line() - 1
                    (entry,) = [s for s in leakguard.snapshot().sockets if s.fd == conn.fileno()]
                    assert entry.origin == "psycopg" and site_is(entry, created), entry.stack
                    assert entry.pool is not None and entry.pool["checked_out"] is True
                    assert at_line(entry.pool["checkout_stack"], checkout)
                (entry,) = [s for s in leakguard.snapshot().sockets if s.origin == "psycopg"]
                assert entry.pool is not None and entry.pool["checked_out"] is False

        asyncio.run(main())
        assert leakguard.snapshot().leaks == []


# --------------------------------------------------------------------------- psycopg2.pool


def origin_sockets(origin: str) -> list[leakguard.SocketInfo]:
    return [s for s in leakguard.snapshot().sockets if s.origin == origin]


@pytest.mark.usefixtures("installed")
class TestPsycopg2Pool:
    """psycopg2.pool: every connection the pool opens is attributed to the pool's creation line."""

    def test_idle_in_pool(self, pg_kill: Callable[[int], None]) -> None:
        pool = psycopg2.pool.ThreadedConnectionPool(1, 1, PG_DSN)
        line = this_line() - 1
        try:
            conn = pool.getconn()
            pid, fd = conn.get_backend_pid(), conn.fileno()
            pool.putconn(conn)
            pg_kill(pid)
            leak = wait_close_wait(fd)
            assert (leak.origin, leak.target) == ("psycopg2", PG_TARGET)
            assert site_is(leak, line), leak.stack
            assert leak.pool is not None and leak.pool["idle_s"] >= 0  # idle since its check-in
            assert {k: v for k, v in leak.pool.items() if k != "idle_s"} == {
                "name": "psycopg2.pool ThreadedConnectionPool",
                "checked_out": False,
                "checkout_age_s": None,
                "checkout_stack": [],
                "owner": None,
            }
            assert leak.reason is not None
            assert "idle in pool psycopg2.pool ThreadedConnectionPool" in leak.reason
            assert PASSWORD not in repr(leakguard.snapshot().to_dict())
        finally:
            pool.closeall()

    def test_checked_out(self, pg_kill: Callable[[int], None]) -> None:
        pool = psycopg2.pool.SimpleConnectionPool(1, 1, PG_DSN)
        created = this_line() - 1
        try:
            conn = pool.getconn()
            checkout = this_line() - 1
            try:
                pg_kill(conn.get_backend_pid())
                leak = wait_close_wait(conn.fileno())
                assert site_is(leak, created), leak.stack
                assert leak.pool is not None and leak.pool["name"] == "psycopg2.pool SimpleConnectionPool"
                assert leak.pool["checked_out"] is True and leak.pool["checkout_age_s"] >= 0
                assert at_line(leak.pool["checkout_stack"], checkout), leak.pool["checkout_stack"]
                assert leak.reason is not None
                assert "checked out of pool psycopg2.pool SimpleConnectionPool" in leak.reason
                assert f"test_pools.py:{checkout}" in leak.reason
            finally:
                pool.putconn(conn, close=True)
            info = _pools.info_of(conn)
            assert info is not None and info.checked_out is False
        finally:
            pool.closeall()
        assert leakguard.snapshot().leaks == []

    def test_connection_opened_by_getconn(self) -> None:
        """A connection the pool opens when getconn() finds it empty: created at the pool's line, checked out at getconn's."""
        require_service("postgres")
        pool = psycopg2.pool.ThreadedConnectionPool(0, 1, PG_DSN)
        created = this_line() - 1
        try:
            assert origin_sockets("psycopg2") == []  # minconn=0: nothing opened yet
            conn = pool.getconn()
            checkout = this_line() - 1
            try:
                (entry,) = [s for s in leakguard.snapshot().sockets if s.fd == conn.fileno()]
                assert entry.origin == "psycopg2" and site_is(entry, created), entry.stack
                assert entry.pool is not None and entry.pool["checked_out"] is True
                assert at_line(entry.pool["checkout_stack"], checkout)
            finally:
                pool.putconn(conn)
        finally:
            pool.closeall()

    def test_pool_alone_adopts_with_pool_creation_line(self) -> None:
        """With only the psycopg2_pool integration, the libpq socket is adopted when the pool opens it."""
        require_service("postgres")
        leakguard.install(integrations=["psycopg2_pool"])
        pool = psycopg2.pool.SimpleConnectionPool(1, 1, PG_DSN)
        line = this_line() - 1
        try:
            conn = pool.getconn()
            try:
                (entry,) = [s for s in leakguard.snapshot().sockets if s.fd == conn.fileno()]
                assert entry.origin == "psycopg2" and site_is(entry, line), entry.stack
                assert entry.target == PG_TARGET
                assert entry.pool is not None and entry.pool["checked_out"] is True
            finally:
                pool.putconn(conn)
        finally:
            pool.closeall()

    @pytest.mark.parametrize("cls", [psycopg2.pool.SimpleConnectionPool, psycopg2.pool.ThreadedConnectionPool])
    def test_clean_use_reports_nothing(self, cls: type[psycopg2.pool.AbstractConnectionPool]) -> None:
        require_service("postgres")
        errors = registry.stats()["hook_errors"]
        pool = cls(1, 2, PG_DSN)
        try:
            for _ in range(3):
                first, second = pool.getconn(), pool.getconn()  # the second is opened for this getconn()
                for conn in (first, second):
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                        assert cur.fetchone() == (1,)
                pool.putconn(second)  # beyond minconn: the pool closes it
                pool.putconn(first)
            (entry,) = origin_sockets("psycopg2")
            assert entry.state == "ESTABLISHED" and entry.pool is not None and not entry.pool["checked_out"]
            assert entry.pool["name"] == f"psycopg2.pool {cls.__name__}"
            assert leakguard.snapshot().leaks == []
            held = pool.getconn()
        finally:
            pool.closeall()  # also closes the connection still checked out
        info = _pools.info_of(held)
        assert held.closed and info is not None and info.checked_out is False
        assert origin_sockets("psycopg2") == []
        assert leakguard.snapshot().leaks == []
        assert registry.stats()["hook_errors"] == errors


    def test_refused_putconn_stays_checked_out(self) -> None:
        """putconn() into the wrong pool raises; the connection is still out of its own pool."""
        require_service("postgres")
        pool = psycopg2.pool.SimpleConnectionPool(1, 1, PG_DSN)
        other = psycopg2.pool.SimpleConnectionPool(0, 1, PG_DSN)
        try:
            conn = pool.getconn()
            with pytest.raises(psycopg2.pool.PoolError):
                other.putconn(conn)
            info = _pools.info_of(conn)
            assert info is not None and info.checked_out is True and info.name == "psycopg2.pool SimpleConnectionPool"
            pool.putconn(conn)
            assert info.checked_out is False
        finally:
            other.closeall()
            pool.closeall()

    def test_bookkeeping_failure_is_contained(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """leakguard's pool bookkeeping failing: the pool works as without it, and the failures are counted."""
        require_service("postgres")
        errors = registry.stats()["hook_errors"]
        for name in ("_link", "checked_out", "checked_in"):  # every step of the pool bookkeeping
            monkeypatch.setattr(_pools, name, _raise)
        pool = psycopg2.pool.ThreadedConnectionPool(1, 2, PG_DSN)
        try:
            conn = pool.getconn()
            with conn.cursor() as cur:
                cur.execute("SELECT 41 + 1")
                assert cur.fetchone() == (42,)
            pool.putconn(conn)
            assert pool.getconn() is conn  # back in the pool
            foreign = psycopg2.connect(PG_DSN)
            try:
                with pytest.raises(psycopg2.pool.PoolError, match="unkeyed"):  # the same error as without leakguard
                    pool.putconn(foreign)
            finally:
                foreign.close()
        finally:
            pool.closeall()
        assert registry.stats()["hook_errors"] > errors


# --------------------------------------------------------------------------- asyncpg.Pool


@pytest.mark.usefixtures("installed")
class TestAsyncpgPool:
    """asyncpg's Pool: connections its tasks open are attributed to the line that created the pool.

    A killed connection stays in CLOSE_WAIT only while the event loop cannot
    react, so each test checks the snapshot without awaiting in between.
    """

    def test_idle_in_pool(self, pg_kill: Callable[[int], None]) -> None:
        async def main() -> None:
            async with asyncpg.create_pool(PG_URL, min_size=0, max_size=1) as pool:
                line = this_line() - 1
                async with pool.acquire() as conn:
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                    fd = _pools.fd_of(conn._con)  # type: ignore[attr-defined]
                assert fd is not None
                pg_kill(pid)
                leak = wait_close_wait(fd)  # the loop is blocked: asyncpg cannot react
                assert (leak.origin, leak.target) == ("asyncpg", PG_TARGET)
                assert site_is(leak, line), leak.stack
                assert leak.pool is not None and leak.pool["idle_s"] >= 0  # idle since its check-in
                assert {k: v for k, v in leak.pool.items() if k != "idle_s"} == {
                    "name": "asyncpg Pool",
                    "checked_out": False,
                    "checkout_age_s": None,
                    "checkout_stack": [],
                    "owner": None,
                }
                assert leak.reason is not None and "idle in pool asyncpg Pool" in leak.reason

        asyncio.run(main())
        assert origin_sockets("asyncpg") == []

    def test_checked_out(self, pg_kill: Callable[[int], None]) -> None:
        async def main() -> None:
            async with asyncpg.create_pool(PG_URL, min_size=1, max_size=1) as pool:
                created = this_line() - 1
                conn = await pool.acquire()
                checkout = this_line() - 1
                try:
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                    fd = _pools.fd_of(conn._con)  # type: ignore[attr-defined]
                    assert fd is not None
                    pg_kill(pid)
                    leak = wait_close_wait(fd)
                    assert site_is(leak, created), leak.stack
                    assert leak.pool is not None and leak.pool["name"] == "asyncpg Pool"
                    assert leak.pool["checked_out"] is True and leak.pool["checkout_age_s"] >= 0
                    assert at_line(leak.pool["checkout_stack"], checkout), leak.pool["checkout_stack"]
                    assert leak.reason is not None
                    assert "checked out of pool asyncpg Pool" in leak.reason
                    assert f"test_pools.py:{checkout}" in leak.reason
                finally:
                    conn.terminate()  # dead: the pool forgets it, release() has nothing to do
                    await pool.release(conn)

        asyncio.run(main())
        assert origin_sockets("asyncpg") == []

    def test_pool_alone_records_with_pool_creation_line(self) -> None:
        """With only the asyncpg_pool integration, the pool's scope names origin, target and creation line."""
        require_service("postgres")
        leakguard.install(integrations=["asyncpg_pool"])

        async def main() -> None:
            async with asyncpg.create_pool(PG_URL, min_size=1, max_size=1) as pool:
                line = this_line() - 1
                async with pool.acquire() as conn:
                    fd = _pools.fd_of(conn._con)  # type: ignore[attr-defined]
                    (entry,) = [s for s in leakguard.snapshot().sockets if s.fd == fd]
                    assert (entry.origin, entry.target) == ("asyncpg", PG_TARGET)
                    assert site_is(entry, line), entry.stack
                    assert entry.pool is not None and entry.pool["checked_out"] is True

        asyncio.run(main())

    def test_clean_use_reports_nothing(self) -> None:
        require_service("postgres")
        errors = registry.stats()["hook_errors"]

        async def main() -> None:
            async with asyncpg.create_pool(PG_URL, min_size=2, max_size=2) as pool:
                created = this_line() - 1
                entries = origin_sockets("asyncpg")
                assert len(entries) == 2  # the second one opened in a task of the pool's
                assert all(site_is(e, created) for e in entries), [e.stack for e in entries]
                async with pool.acquire() as conn:
                    checkout = this_line() - 1
                    assert await conn.fetchval("SELECT 1") == 1
                    (entry,) = [s for s in origin_sockets("asyncpg") if s.pool and s.pool["checked_out"]]
                    assert at_line(entry.pool["checkout_stack"], checkout)  # type: ignore[index]
                conn = await pool.acquire(timeout=10)  # under a timeout asyncpg acquires in another task
                checkout = this_line() - 1
                try:
                    (entry,) = [s for s in origin_sockets("asyncpg") if s.pool and s.pool["checked_out"]]
                    assert at_line(entry.pool["checkout_stack"], checkout)  # type: ignore[index]
                finally:
                    await pool.release(conn)
                assert await pool.fetchval("SELECT 2") == 2
                entries = origin_sockets("asyncpg")
                assert len(entries) == 2 and all(e.state == "ESTABLISHED" for e in entries)
                assert all(e.pool is not None and e.pool["checked_out"] is False for e in entries)
                assert leakguard.snapshot().leaks == []

        asyncio.run(main())
        assert origin_sockets("asyncpg") == []
        assert leakguard.snapshot().leaks == []
        assert registry.stats()["hook_errors"] == errors


    def test_bookkeeping_failure_is_contained(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """leakguard's pool bookkeeping failing: the pool works as without it, and the failures are counted."""
        require_service("postgres")
        errors = registry.stats()["hook_errors"]
        for name in ("_link", "checked_out", "checked_in"):  # every step of the pool bookkeeping
            monkeypatch.setattr(_pools, name, _raise)

        async def main() -> None:
            async with asyncpg.create_pool(PG_URL, min_size=1, max_size=1) as pool:
                async with pool.acquire() as conn:
                    assert await conn.fetchval("SELECT 41 + 1") == 42
                conn = await pool.acquire()
                await pool.release(conn)
                async with asyncpg.create_pool(PG_URL, min_size=1, max_size=1) as other:
                    async with other.acquire() as foreign:
                        with pytest.raises(asyncpg.InterfaceError, match="not a member of this pool"):
                            await pool.release(foreign)

        asyncio.run(main())
        assert origin_sockets("asyncpg") == []
        assert registry.stats()["hook_errors"] > errors


# --------------------------------------------------------------------------- redis


@pytest.mark.usefixtures("installed")
class TestRedisPool:
    """redis-py's pool: a connection released after each command is idle; one held is checked out."""

    def test_idle_in_pool(self, redis_kill: Callable[[int], int]) -> None:
        with redis.Redis(host="127.0.0.1", port=6379) as client:
            client_id = client.client_id()
            line = this_line() - 1
            conn = client.connection_pool._available_connections[0]  # type: ignore[attr-defined]
            redis_kill(client_id)
            leak = wait_close_wait(conn._sock.fileno())
            assert site_is(leak, line) and leak.origin == "redis"
            assert leak.pool is not None and leak.pool["name"] == "redis ConnectionPool"
            assert leak.pool["checked_out"] is False
            assert leak.reason is not None and "idle in pool redis ConnectionPool" in leak.reason

    def test_checked_out(self, redis_kill: Callable[[int], int]) -> None:
        with redis.Redis(host="127.0.0.1", port=6379) as client:
            pool = client.connection_pool
            conn = pool.get_connection(*checkout_args(pool))
            line = this_line() - 1
            try:
                conn.send_command("CLIENT", "ID")
                redis_kill(conn.read_response())
                leak = wait_close_wait(conn._sock.fileno())
                assert site_is(leak, line)
                assert leak.pool is not None and leak.pool["checked_out"] is True
                assert at_line(leak.pool["checkout_stack"], line)
                assert leak.reason is not None and "checked out of pool redis ConnectionPool" in leak.reason
            finally:
                pool.release(conn)

    def test_connection_opened_before_install_is_adopted_at_checkout(self) -> None:
        require_service("redis")
        leakguard.uninstall()  # the class fixture installed it; start from nothing
        with redis.Redis(host="127.0.0.1", port=6379) as client:
            assert client.ping() is True  # the pool opens its socket before leakguard exists
            leakguard.install()
            pool = client.connection_pool
            conn = pool.get_connection(*checkout_args(pool))
            line = this_line() - 1
            try:
                (entry,) = [s for s in leakguard.snapshot().sockets if s.fd == conn._sock.fileno()]
                assert entry.origin == "redis" and entry.stack == []  # creation unknown, and said so
                assert entry.pool is not None and entry.pool["checked_out"] is True
                assert at_line(entry.pool["checkout_stack"], line)
            finally:
                pool.release(conn)

    def test_blocking_pool_clean_use(self) -> None:
        require_service("redis")
        pool = redis.BlockingConnectionPool(host="127.0.0.1", port=6379, max_connections=2)
        with redis.Redis(connection_pool=pool) as client:
            for _ in range(3):
                assert client.ping() is True
            (entry,) = [s for s in leakguard.snapshot().sockets if s.origin == "redis"]
            assert entry.pool is not None and entry.pool["name"] == "redis BlockingConnectionPool"
            assert entry.pool["checked_out"] is False
        pool.disconnect()
        assert [s for s in leakguard.snapshot().sockets if s.origin == "redis"] == []
        assert leakguard.snapshot().leaks == []


# --------------------------------------------------------------------------- checkout_threshold


@pytest.fixture
def threshold_off() -> Iterator[None]:
    try:
        yield
    finally:
        leakguard.uninstall()
        assert _pools._timer[0] is None


@pytest.mark.usefixtures("threshold_off")
class TestCheckoutThreshold:
    """A connection held past ``checkout_threshold`` is reported once, then again when returned."""

    def test_reported_with_checkout_stack_and_again_when_returned(self, engine: sqlalchemy.Engine) -> None:
        leakguard.install(checkout_threshold=3600)
        with capture_logs() as logs:
            with engine.connect() as first:
                created = this_line() - 1
                driver_sql(first, "SELECT 1")
            conn = engine.connect()
            line = this_line() - 1
            try:
                (event,) = _pools.check_thresholds(now=time.monotonic() + 3601)
                assert _pools.check_thresholds(now=time.monotonic() + 3602) == []  # once
            finally:
                conn.close()
        assert event["event"] == "leakguard.checkout_threshold"
        assert event["pool"] == "sqlalchemy QueuePool"
        assert event["checkout_site"].endswith(f"test_pools.py:{line}")
        assert any(f.startswith(f"{HERE}:{line} ") for f in event["checkout_stack"])
        assert event["created_at"].endswith(f"test_pools.py:{created}")
        assert event["target"] == "postgresql+psycopg2://postgres:***@127.0.0.1:5432/test"
        assert event["held_s"] >= 3600 and event["threshold_s"] == 3600
        logged = checkout_events(logs)
        assert [e["event"] for e in logged] == ["leakguard.checkout_threshold"]  # held < 1 h for real
        assert logged[0]["log_level"] == "warning"
        assert PASSWORD not in repr(logs)

    def test_timer_reports_without_watcher(self) -> None:
        require_service("postgres")
        leakguard.install(checkout_threshold=0.05)
        with capture_logs() as logs:
            with psycopg_pool.ConnectionPool(PG_DSN, min_size=1, max_size=1, open=True) as pool:
                conn = pool.getconn()
                line = this_line() - 1
                try:
                    assert wait_for(lambda: checkout_events(logs), timeout=10)
                finally:
                    pool.putconn(conn)
        threshold, returned = checkout_events(logs)
        assert threshold["event"] == "leakguard.checkout_threshold"
        assert threshold["checkout_site"].endswith(f"test_pools.py:{line}")
        assert returned["event"] == "leakguard.checkout_returned"
        assert returned["message"].startswith("connection of pool psycopg_pool pool-")
        assert " returned after " in returned["message"]
        assert returned["held_s"] >= 0.05 and returned["log_level"] == "info"

    def test_returned_late_before_any_tick(self) -> None:
        require_service("redis")
        leakguard.install(checkout_threshold=0.01)
        with capture_logs() as logs, redis.Redis(host="127.0.0.1", port=6379) as client:
            pool = client.connection_pool
            conn = pool.get_connection(*checkout_args(pool))
            line = this_line() - 1
            time.sleep(0.05)  # held past the threshold; the report may come from the timer or at release
            pool.release(conn)
        threshold, returned = checkout_events(logs)
        assert threshold["event"] == "leakguard.checkout_threshold"
        assert threshold["pool"] == "redis ConnectionPool"
        assert threshold["checkout_site"].endswith(f"test_pools.py:{line}")
        assert returned["event"] == "leakguard.checkout_returned"
        assert "returned after" in returned["message"]

    def test_clean_use_reports_nothing(self, engine: sqlalchemy.Engine) -> None:
        require_service("redis")
        leakguard.install(checkout_threshold=30)
        with capture_logs() as logs:
            for _ in range(5):
                with engine.connect() as conn:
                    driver_sql(conn, "SELECT 1")
            with redis.Redis(host="127.0.0.1", port=6379) as client:
                client.ping()
            with psycopg_pool.ConnectionPool(PG_DSN, min_size=1, max_size=1, open=True) as pool:
                with pool.connection() as pconn:
                    pconn.execute("SELECT 1")
            # Nothing is checked out any more, however late it is.
            assert _pools.check_thresholds(now=time.monotonic() + 86400) == []
        assert checkout_events(logs) == []

    def test_off_by_default(self, engine: sqlalchemy.Engine) -> None:
        leakguard.install()
        conn = engine.connect()
        try:
            assert _pools.check_thresholds(now=time.monotonic() + 86400) == []
            assert _pools._timer[0] is None and _pools._watched == {}
        finally:
            conn.close()

    def test_uninstall_stops_the_timer(self, engine: sqlalchemy.Engine) -> None:
        leakguard.install(checkout_threshold=60)
        conn = engine.connect()
        try:
            timer = _pools._timer[0]
            assert timer is not None and timer.thread.is_alive()
            leakguard.uninstall()
            assert not timer.thread.is_alive()
            assert _pools._timer[0] is None and _pools._watched == {}
        finally:
            conn.close()

    def test_works_with_psycopg_connection_class(self) -> None:
        """A psycopg connection checked out of a pool is watched like any other."""
        require_service("postgres")
        leakguard.install(checkout_threshold=3600)
        with psycopg_pool.ConnectionPool(PG_DSN, min_size=1, max_size=1, open=True) as pool:
            with pool.connection() as conn:
                assert isinstance(conn, psycopg.Connection)
                (event,) = _pools.check_thresholds(now=time.monotonic() + 7200)
                assert event["origin"] == "psycopg" and event["fd"] == conn.fileno()
