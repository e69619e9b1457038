"""asyncio and uvloop: what the task/thread continuations and the transport adoption cost.

Each row runs the same loop plain and with ``install(integrations=ASYNC)`` (the
asyncio, uvloop, threads and executors integrations), side by side: timed (best
of interleaved rounds, and the median of paired rounds) and in instructions
(callgrind, per operation; see ``_callgrind``).  The peer of a connect row is a
server in another process (``bench_core._Server``); an accept row serves
in-process, so its figure holds both ends.

Rows: a task running a library coroutine (``gather(sleep(0))``: the continuation
is captured), a task running an application coroutine (one cache lookup), an
executor job (``submit(...).result()``), ``open_connection`` + close on asyncio's
loop and on uvloop (adoption of the C-made transport), ``wait_for(open_connection)``
(a socket made in a library task), and a server's accept on both loops.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

if __package__ in (None, ""):  # python benchmarks/bench_async.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import leakguard
from benchmarks.bench_core import Row, _interleaved, _row, _Server, instruction_row

ASYNC = ["asyncio", "uvloop", "threads", "executors"]


def _run(loop: str, coro: Any) -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


async def _app_coroutine() -> None:
    return None


def _op(kind: str, port: int) -> Callable[[int], None]:
    """*n* operations of *kind*: the function both the timed and the counted rows run."""
    loop, _, what = kind.partition(":")

    async def tasks_library(n: int) -> None:
        for _ in range(n):
            await asyncio.gather(asyncio.sleep(0))

    async def tasks_app(n: int) -> None:
        for _ in range(n):
            await asyncio.create_task(_app_coroutine())

    async def connect(n: int) -> None:
        for _ in range(n):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.transport.abort()

    async def wait_for_connect(n: int) -> None:
        for _ in range(n):
            _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            w.transport.abort()

    async def accept(n: int) -> None:
        done: asyncio.Queue[None] = asyncio.Queue()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.transport.abort()
            done.put_nowait(None)

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        for _ in range(n):
            _, w = await asyncio.open_connection(*address)
            await done.get()
            w.transport.abort()
        server.close()
        await server.wait_closed()

    if what == "submit":
        def submit(n: int) -> None:
            with ThreadPoolExecutor(1) as pool:
                for _ in range(n):
                    pool.submit(abs, -1).result()

        return submit
    body = {"tasks_library": tasks_library, "tasks_app": tasks_app, "connect": connect,
            "wait_for": wait_for_connect, "accept": accept}[what]  # fmt: skip
    return lambda n: _run(loop, body(n))


KINDS = [
    ("asyncio:tasks_library", "task running a library coroutine (gather(sleep(0)))", 2_000, (500, 2_500)),
    ("asyncio:tasks_app", "task running an application coroutine", 2_000, (500, 2_500)),
    ("asyncio:submit", "ThreadPoolExecutor submit().result()", 2_000, (500, 2_500)),
    ("asyncio:connect", "asyncio open_connection+close", 500, (200, 1_000)),
    ("asyncio:wait_for", "asyncio wait_for(open_connection)+close", 500, (200, 1_000)),
    ("asyncio:accept", "asyncio server accept (both ends in-process)", 300, (100, 500)),
    ("uvloop:connect", "uvloop open_connection+close", 500, (200, 1_000)),
    ("uvloop:accept", "uvloop server accept (both ends in-process)", 300, (100, 500)),
]


def _have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _loop_main(kind: str, n: int, installed: bool, port: int) -> None:
    """The program callgrind counts (see bench_core._loop_main)."""
    if installed:
        leakguard.install(integrations=ASYNC)
    op = _op(kind, port)
    op(20)  # warm
    op(n)


def bench_timed(quick: bool) -> list[Row]:
    srv = _Server()
    rows: list[Row] = []
    try:
        for kind, name, n, _ in KINDS:
            if kind.startswith("uvloop") and not _have_uvloop():
                rows.append({"name": name, "error": "uvloop is not installed"})
                continue
            p, i, pr = _interleaved(_op(kind, srv.address[1]), n // 5 if quick else n, 5 if quick else 11, integrations=ASYNC)
            rows.append(_row(name, p, i, pr))
    finally:
        srv.close()
    return rows


def bench_instructions(quick: bool) -> list[Row]:
    from benchmarks import _callgrind

    if not _callgrind.available():
        return [{"name": "asyncio instructions per operation", "error": "valgrind is not installed"}]
    srv = _Server()
    kinds = [k for k in KINDS if not k[0].startswith("uvloop") or _have_uvloop()]
    if quick:
        kinds = [k for k in kinds if k[0] in ("asyncio:tasks_library", "asyncio:connect", "uvloop:connect")]

    def argv(kind: str, n: int, flag: str) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--loop", kind, str(n), flag, str(srv.address[1])]

    try:
        progs = [argv(k, n, f) for k, _, _, sizes in kinds for f in ("0", "1") for n in sizes]
        got = iter(_callgrind.counts(progs))
        rows: list[Row] = []
        for _, name, _, (small, large) in kinds:
            per = {}
            for f in ("0", "1"):
                a, b = next(got), next(got)
                per[f] = (b - a) / (large - small)
            rows.append(instruction_row(name, per["0"], per["1"]))
    finally:
        srv.close()
    return rows


def run(quick: bool = False) -> list[Row]:
    return bench_timed(quick) + bench_instructions(quick)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--loop"]:
        _loop_main(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5]))
    else:
        import json

        for r in run("--quick" in sys.argv):
            print(json.dumps(r))
