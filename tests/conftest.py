from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

import leakguard

from .helpers import HangUpServer, require_service


@pytest.fixture
def installed() -> Iterator[None]:
    """leakguard installed for the duration of one test, uninstalled after."""
    leakguard.install()
    try:
        yield
    finally:
        leakguard.uninstall()


@pytest.fixture
def installed_quiet() -> Iterator[None]:
    """leakguard installed without integrations (the socket hook alone) for one test."""
    leakguard.install(integrations="none")
    try:
        yield
    finally:
        leakguard.uninstall()


@pytest.fixture
def hangup_server() -> Iterator[HangUpServer]:
    with HangUpServer() as srv:
        yield srv


# --------------------------------------------------------------------------- servers killing connections
# A server closing the connection is how a real CLOSE_WAIT arises on the client side.


@pytest.fixture
def pg_kill() -> Iterator[Callable[[int], None]]:
    """Terminate a PostgreSQL backend by pid (``pg_terminate_backend``), from a second connection."""
    require_service("postgres")
    import psycopg2

    admin = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres")
    admin.autocommit = True

    def kill(pid: int) -> None:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert cur.fetchone() == (True,)

    try:
        yield kill
    finally:
        admin.close()


@pytest.fixture
def mysql_kill() -> Iterator[Callable[[int], None]]:
    """``KILL <thread id>`` on MariaDB, from a second connection."""
    require_service("mariadb")
    import pymysql

    admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")

    def kill(thread_id: int) -> None:
        with admin.cursor() as cur:
            cur.execute(f"KILL {int(thread_id)}")

    try:
        yield kill
    finally:
        admin.close()


@pytest.fixture
def redis_kill() -> Iterator[Callable[[int], None]]:
    """``CLIENT KILL ID <id>`` on Redis, from a second connection."""
    require_service("redis")
    import redis

    admin = redis.Redis(host="127.0.0.1", port=6379)

    def kill(client_id: int) -> None:
        assert admin.client_kill_filter(_id=str(client_id)) == 1

    try:
        yield kill
    finally:
        admin.close()


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
