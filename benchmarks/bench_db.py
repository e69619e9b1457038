"""Database drivers and pools, side by side: what leakguard adds per connect and per round trip.

Against the real local servers (PostgreSQL 127.0.0.1:5432, Redis 127.0.0.1:6379).
Plain and installed runs are interleaved round by round in this one process and
the best round counts (the machine is noisy).  Each row has wall-clock figures
(``baseline_us``, ``leakguard_us``, ``ratio``) and this thread's CPU time
(``cpu_*``): round trips are dominated by waiting, whose noise can hide a few
microseconds of client work.  Rows:

- psycopg2 connect + close: the wrapped ``connect()`` (stack capture, ``fileno()``
  adoption, target from ``conn.info``);
- psycopg2 ``SELECT 1``: an open connection's round trip (nothing of leakguard on it);
- redis PING: redis-py checks a pooled connection out and back in for every
  command, so the pool wrappers run each time;
- SQLAlchemy checkout + ``SELECT 1``: the pool's checkout/checkin listeners;
- psycopg_pool ``connection()`` + ``SELECT 1``: getconn/putconn wrappers.
"""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Callable
from typing import Any

import leakguard

Row = dict[str, Any]
PG_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
#: Short blocks, many rounds: on a noisy machine the best of many short blocks is the stable figure.
ROUNDS = {True: 7, False: 31}


def _up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _app_frames(depth: int, fn: Callable[[], Any]) -> Any:
    """Run *fn* a few application frames deep, as real code would be."""
    return fn() if depth == 0 else _app_frames(depth - 1, fn)


def _interleaved(op: Callable[[int], None], n: int, rounds: int) -> tuple[float, float, float, float]:
    """(plain, installed) seconds per operation, wall clock then this thread's CPU time.

    Best of *rounds*, interleaved (the order alternates round by round).  The
    CPU figures leave out time spent waiting for the server and for other
    processes, so on a loaded machine they show the client-side cost more steadily.
    """
    plain = installed = cpu_plain = cpu_installed = float("inf")
    op(max(1, n // 10))  # warm up
    for r in range(rounds):
        for mode in ("plain", "installed") if r % 2 == 0 else ("installed", "plain"):
            if mode == "installed":
                leakguard.install()
            gc.collect()
            c = time.thread_time()
            t = time.perf_counter()
            _app_frames(4, lambda: op(n))
            dt = (time.perf_counter() - t) / n
            dc = (time.thread_time() - c) / n
            if mode == "installed":
                leakguard.uninstall()
                installed, cpu_installed = min(installed, dt), min(cpu_installed, dc)
            else:
                plain, cpu_plain = min(plain, dt), min(cpu_plain, dc)
    return plain, installed, cpu_plain, cpu_installed


def _row(name: str, plain: float, inst: float, cpu_plain: float, cpu_inst: float) -> Row:
    return {
        "name": name,
        "baseline_us": round(plain * 1e6, 3),
        "leakguard_us": round(inst * 1e6, 3),
        "added_us": round((inst - plain) * 1e6, 3),
        "ratio": round(inst / plain, 4),
        "cpu_baseline_us": round(cpu_plain * 1e6, 3),
        "cpu_leakguard_us": round(cpu_inst * 1e6, 3),
        "cpu_ratio": round(cpu_inst / cpu_plain, 4) if cpu_plain > 0 else None,
    }


def bench_psycopg2(quick: bool) -> list[Row]:
    import psycopg2

    def connect_close(n: int) -> None:
        connect = psycopg2.connect
        for _ in range(n):
            connect(PG_DSN).close()

    rows = [_row("psycopg2 connect + close", *_interleaved(connect_close, 10, ROUNDS[quick]))]
    conn = psycopg2.connect(PG_DSN)
    try:
        cur = conn.cursor()

        def select(n: int) -> None:
            execute, fetch = cur.execute, cur.fetchone
            for _ in range(n):
                execute("SELECT 1")
                fetch()

        rows.append(_row("psycopg2 SELECT 1 round trip", *_interleaved(select, 300, ROUNDS[quick])))
        cur.close()
    finally:
        conn.close()
    return rows


def bench_redis(quick: bool) -> list[Row]:
    import redis

    with redis.Redis(host="127.0.0.1", port=6379) as client:

        def ping(n: int) -> None:
            p = client.ping
            for _ in range(n):
                p()

        rows = [_row("redis PING round trip (pool checkout per command)", *_interleaved(ping, 300, ROUNDS[quick]))]
        pool = client.connection_pool

        def get_release(n: int) -> None:
            get, release = pool.get_connection, pool.release
            for _ in range(n):
                release(get())

        # The pool's own bookkeeping alone, no I/O: the added microseconds show plainly here.
        rows.append(_row("redis pool get_connection + release (no I/O)", *_interleaved(get_release, 2000, ROUNDS[quick])))
        return rows


def bench_sqlalchemy(quick: bool) -> list[Row]:
    import sqlalchemy

    engine = sqlalchemy.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/test", pool_size=1)
    try:

        def checkout(n: int) -> None:
            connect = engine.connect
            for _ in range(n):
                with connect() as conn:
                    conn.exec_driver_sql("SELECT 1").scalar()

        rows = [_row("SQLAlchemy checkout + SELECT 1", *_interleaved(checkout, 150, ROUNDS[quick]))]

        def pool_only(n: int) -> None:
            connect = engine.pool.connect
            for _ in range(n):
                connect().close()  # no transaction begun: the reset on return sends nothing

        rows.append(_row("SQLAlchemy pool checkout + checkin (no I/O)", *_interleaved(pool_only, 1000, ROUNDS[quick])))
        return rows
    finally:
        engine.dispose()


def bench_psycopg_pool(quick: bool) -> list[Row]:
    import psycopg_pool

    with psycopg_pool.ConnectionPool(PG_DSN, min_size=1, max_size=1, open=True) as pool:
        pool.wait()

        def checkout(n: int) -> None:
            connection = pool.connection
            for _ in range(n):
                with connection() as conn:
                    conn.execute("SELECT 1").fetchone()

        return [_row("psycopg_pool connection() + SELECT 1", *_interleaved(checkout, 150, ROUNDS[quick]))]


def run(quick: bool = False) -> list[Row]:
    """One row per workload: name, baseline_us, leakguard_us, added_us, ratio (or name + error)."""
    rows: list[Row] = []
    pg, rd = _up(5432), _up(6379)
    for name, needs, fn in (
        ("psycopg2", pg, bench_psycopg2),
        ("redis", rd, bench_redis),
        ("sqlalchemy", pg, bench_sqlalchemy),
        ("psycopg_pool", pg, bench_psycopg_pool),
    ):
        if not needs:
            rows.append({"name": name, "error": "server not reachable"})
            continue
        try:
            rows.extend(fn(quick))
        except Exception as exc:  # one failing workload must not hide the others
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
    return rows


if __name__ == "__main__":
    import sys

    for r in run(quick="--quick" in sys.argv):
        print(r)
