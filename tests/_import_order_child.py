"""One import-order case, run as a script in a fresh interpreter by test_import_order.py.

    python -W error _import_order_child.py ENTRY ORDER OUT

ORDER is ``plain`` (no leakguard at all; ENTRY may list several modules,
comma-separated), ``before`` (the library imported, then
leakguard imported and installed), ``after`` (installed, then imported) or
``uninstall`` (installed, imported, uninstalled).  The result goes to the JSON
file OUT; the script itself must print nothing.  With leakguard installed it
makes a real leak through the library (a connection the peer then closes) and
reports what the snapshot says about it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import socket
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

ENTRY, ORDER, OUT = sys.argv[1:4]

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "test"}
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


# --------------------------------------------------------------------------- a fingerprint of what was patched


_NAMED = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)


def _describe(value: Any) -> str:
    """What a class or module attribute is, stable across processes (no ids, no reprs).

    Only the type is asked of arbitrary objects: an attribute lookup on a lazy object (six.moves)
    would import things.
    """
    kind = type(value)
    text = f"{kind.__module__}.{kind.__qualname__}"
    target = value.fget if isinstance(value, property) else value
    if isinstance(target, (classmethod, staticmethod)):
        target = target.__func__
    if isinstance(target, _NAMED):
        text += f" {getattr(target, '__module__', None)}.{getattr(target, '__qualname__', None)}"
    return text


def fingerprint(names: list[str]) -> dict[str, str]:
    """Every function, method and descriptor of the modules *names* and of their classes."""
    out: dict[str, str] = {}
    for name in names:
        module = sys.modules.get(name)
        if module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, types.ModuleType):
                continue  # a submodule bound by someone's import: not a patch
            out[f"{name}:{attr}"] = _describe(value)
            if isinstance(value, type) and value.__module__ == name:
                for cattr, cvalue in list(vars(value).items()):
                    out[f"{name}:{attr}.{cattr}"] = _describe(cvalue)
    return out


def library_modules(entries: list[str]) -> list[str]:
    prefixes = {"socket", *(entry.split(".")[0] for entry in entries)}
    if "urllib" in prefixes:
        prefixes.add("http")
    return sorted(n for n in list(sys.modules) if n.split(".")[0] in prefixes)


# --------------------------------------------------------------------------- a peer that hangs up


class HangUpHTTP:
    """Answers one HTTP/1.1 request per connection (keep-alive), then closes its end."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
                    time.sleep(0.05)  # let the client read the whole response before the FIN


def leaks_to(port: int, timeout: float = 10.0) -> list[Any]:
    import leakguard

    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in leakguard.snapshot().leaks if s.remote and s.remote.endswith(f":{port}")]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


# --------------------------------------------------------------------------- one real leak per library


def _http_client(server: HangUpHTTP) -> Callable[[], None]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/")
    conn.getresponse().read()  # keep-alive: the connection stays open for the next request
    return conn.close


def _urllib_request(server: HangUpHTTP) -> Callable[[], None]:
    import urllib.request

    response = urllib.request.urlopen(server.url, timeout=10)  # not read: its socket stays open
    return response.close


def _requests(server: HangUpHTTP) -> Callable[[], None]:
    import requests

    session = requests.Session()
    session.get(server.url, timeout=10).close()  # the connection goes back to the session's pool
    return session.close


def _urllib3(server: HangUpHTTP) -> Callable[[], None]:
    import urllib3

    manager = urllib3.PoolManager()
    manager.request("GET", server.url, timeout=10)
    return manager.clear


def _httpx(server: HangUpHTTP) -> Callable[[], None]:
    import httpx

    client = httpx.Client()
    client.get(server.url, timeout=10)
    return client.close


def _aiohttp(server: HangUpHTTP) -> Callable[[], None]:
    import aiohttp

    async def main() -> list[Any]:
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url) as response:
                await response.read()
            return leaks_to(server.port)

    found = asyncio.run(main())
    RESULT["leaks"] = [_leak(s) for s in found]
    return lambda: None


def _gevent(server: HangUpHTTP) -> Callable[[], None]:
    from gevent import monkey

    monkey.patch_socket()  # what the gevent integration is for: the patched socket module's sockets
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    _http_get(sock)
    return sock.close


def _http_get(sock: Any) -> None:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.recv(4096)


def _asyncio(server: HangUpHTTP, new_loop: Callable[[], asyncio.AbstractEventLoop] | None = None) -> Callable[[], None]:
    async def main() -> None:
        # wait_for runs open_connection in a task of its own on 3.10-3.11: the line is still this one
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 10)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"ok")
        RESULT["leaks"] = [_leak(s) for s in leaks_to(server.port)]
        writer.close()
        await writer.wait_closed()

    if new_loop is None:
        asyncio.run(main())
    else:
        loop = new_loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
    return lambda: None


def _uvloop(server: HangUpHTTP) -> Callable[[], None]:
    import uvloop

    return _asyncio(server, uvloop.new_event_loop)


def _threading(server: HangUpHTTP) -> Callable[[], None]:
    made: list[socket.socket] = []
    # A thread started on library code (no application frame of its own): the line that started it.
    thread = threading.Thread(target=lambda: made.append(socket.create_connection(("127.0.0.1", server.port))))
    thread.start()
    thread.join()
    _http_get(made[0])
    return made[0].close


def _executors(server: HangUpHTTP) -> Callable[[], None]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        sock = pool.submit(socket.create_connection, ("127.0.0.1", server.port)).result()
    _http_get(sock)
    return sock.close


def _pg_terminate(pid: int) -> None:
    import psycopg2

    with psycopg2.connect(**PG) as admin, admin.cursor() as cur:  # type: ignore[arg-type]
        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    admin.close()


def _psycopg2(server: HangUpHTTP) -> Callable[[], None]:
    import psycopg2

    conn = psycopg2.connect(**PG)  # type: ignore[arg-type]
    _pg_terminate(conn.get_backend_pid())
    return conn.close


def _psycopg2_pool(server: HangUpHTTP) -> Callable[[], None]:
    import psycopg2.pool

    pool = psycopg2.pool.SimpleConnectionPool(1, 1, **PG)
    conn = pool.getconn()
    _pg_terminate(conn.get_backend_pid())
    return pool.closeall


def _psycopg(server: HangUpHTTP) -> Callable[[], None]:
    import psycopg

    conn = psycopg.connect(PG_DSN)
    _pg_terminate(conn.info.backend_pid)
    return conn.close


def _psycopg_pool(server: HangUpHTTP) -> Callable[[], None]:
    import psycopg_pool

    pool = psycopg_pool.ConnectionPool(PG_DSN, min_size=1, max_size=1, open=True)
    pool.wait()
    with pool.connection() as conn:
        pid = conn.info.backend_pid
    _pg_terminate(pid)
    return pool.close


def _asyncpg(server: HangUpHTTP) -> Callable[[], None]:
    import asyncpg

    async def main() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=5432, user="postgres", database="test")
        _pg_terminate(conn.get_server_pid())
        RESULT["leaks"] = [_leak(s) for s in leaks_to(5432)]
        conn.terminate()

    asyncio.run(main())
    return lambda: None


def _pymysql(server: HangUpHTTP) -> Callable[[], None]:
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")
    admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")
    with admin.cursor() as cur:
        cur.execute(f"KILL {int(conn.thread_id())}")
    admin.close()

    def close() -> None:
        try:
            conn.close()
        except Exception:  # the server already hung up
            conn._force_close()  # type: ignore[attr-defined]

    return close


def _redis_kill(client_id: int) -> None:
    import redis

    admin = redis.Redis(host="127.0.0.1", port=6379)
    assert admin.client_kill_filter(_id=str(client_id)) == 1
    admin.close()


def _redis(server: HangUpHTTP) -> Callable[[], None]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379)
    _redis_kill(client.client_id())
    # close the socket itself: redis < 4's Redis.close() only returns the connection to its pool
    # (the closure keeps the client alive: newer versions' Redis.__del__ closes it)
    return lambda: (client.close(), client.connection_pool.disconnect())[-1]


def _redis_asyncio(server: HangUpHTTP) -> Callable[[], None]:
    import redis.asyncio

    async def main() -> None:
        client = redis.asyncio.Redis(host="127.0.0.1", port=6379)
        _redis_kill(await client.client_id())
        RESULT["leaks"] = [_leak(s) for s in leaks_to(6379)]
        await client.connection_pool.disconnect()

    asyncio.run(main())
    return lambda: None


def _sqlalchemy(server: HangUpHTTP) -> Callable[[], None]:
    import sqlalchemy

    engine = sqlalchemy.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    with engine.connect() as conn:
        pid = conn.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()
    _pg_terminate(int(pid))  # type: ignore[arg-type]
    return engine.dispose


def _sqlalchemy_asyncio(server: HangUpHTTP) -> Callable[[], None]:
    import sqlalchemy
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> None:
        engine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:5432/test")
        async with engine.connect() as conn:
            pid = (await conn.execute(sqlalchemy.text("SELECT pg_backend_pid()"))).scalar()
        _pg_terminate(int(pid))  # type: ignore[arg-type]
        RESULT["leaks"] = [_leak(s) for s in leaks_to(5432)]
        await engine.dispose()

    asyncio.run(main())
    return lambda: None


RECIPES: dict[str, tuple[Callable[[HangUpHTTP], Callable[[], None]], int | None]] = {
    "http.client": (_http_client, None),
    "urllib.request": (_urllib_request, None),
    "requests": (_requests, None),
    "requests.adapters": (_requests, None),
    "urllib3": (_urllib3, None),
    "urllib3.poolmanager": (_urllib3, None),
    "httpx": (_httpx, None),
    "aiohttp": (_aiohttp, None),
    "gevent": (_gevent, None),
    "asyncio": (_asyncio, None),
    "uvloop": (_uvloop, None),
    "threading": (_threading, None),
    "concurrent.futures.thread": (_executors, None),
    "psycopg2": (_psycopg2, 5432),
    "psycopg2.pool": (_psycopg2_pool, 5432),
    "psycopg": (_psycopg, 5432),
    "psycopg_pool": (_psycopg_pool, 5432),
    "asyncpg": (_asyncpg, 5432),
    "pymysql": (_pymysql, 3306),
    "redis": (_redis, 6379),
    "redis.asyncio": (_redis_asyncio, 6379),
    "sqlalchemy": (_sqlalchemy, 5432),
    "sqlalchemy.ext.asyncio": (_sqlalchemy_asyncio, 5432),
}

RESULT: dict[str, Any] = {}


def _leak(info: Any) -> dict[str, Any]:
    site = info.site
    return {
        "origin": info.origin,
        "target": info.target,
        "pool": info.pool is not None,
        "site": f"{site.file}:{site.function}" if site is not None else None,
    }


def main() -> None:
    if ORDER == "plain":  # ENTRY is a comma-separated list: one plain interpreter answers for all
        for entry in ENTRY.split(","):
            try:
                importlib.import_module(entry)
            except ImportError:
                pass
        RESULT["fingerprint"] = fingerprint(library_modules(ENTRY.split(",")))
        return
    if ORDER == "before":
        importlib.import_module(ENTRY)
        import leakguard

        leakguard.install()
    else:
        import leakguard

        leakguard.install()
        importlib.import_module(ENTRY)
    from leakguard import _state

    RESULT["applied"] = sorted(_state._state.applied)
    if ORDER == "uninstall":
        leakguard.uninstall()
        RESULT["fingerprint"] = fingerprint(library_modules([ENTRY]))
        RESULT["left"] = [type(f).__module__ for f in sys.meta_path if type(f).__module__.startswith("leakguard")]
        return
    server = HangUpHTTP()
    recipe, port = RECIPES[ENTRY]
    close = recipe(server)
    if "leaks" not in RESULT:
        RESULT["leaks"] = [_leak(s) for s in leaks_to(port or server.port)]
    close()


main()
with open(OUT, "w") as f:
    json.dump(RESULT, f)
