"""Run in a fresh interpreter by tests/test_async_boundaries.py: one leak per boundary, JSON out.

argv: LOOP (asyncio | uvloop), ORDER (before | after: uvloop imported before or after install()),
INSTALL (1 | 0: 0 runs the same program plain, for the differential check).
"""
import asyncio
import contextvars
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

LOOP, ORDER, INSTALL = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if LOOP == "uvloop" and ORDER == "before":
    import uvloop
import leakguard

if INSTALL:
    leakguard.install()
if LOOP == "uvloop" and ORDER == "after":
    import uvloop

LINES = {}
with open(__file__) as source:
    for number, text in enumerate(source.read().splitlines(), 1):
        if "# @" + "case:" in text:
            LINES[text.rsplit("# @" + "case:", 1)[1].strip()] = number

listener = socket.create_server(("127.0.0.1", 0))
ADDR = listener.getsockname()
held = []  # every client socket / writer, closed at the end


def hang_up() -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.close()


threading.Thread(target=hang_up, daemon=True).start()
fds = {}  # case -> fd
cases = {}  # case -> what leakguard reported for its leak
var = contextvars.ContextVar("app_var", default="unset")
observed = {}  # behaviour that must not change under leakguard


def keep(name, obj):
    held.append(obj)
    sock = obj.get_extra_info("socket") if hasattr(obj, "get_extra_info") else obj
    fds[name] = sock.fileno()


def collect():
    """Wait until every kept socket is a leak (CLOSE_WAIT); note its site and stack; close it."""
    if INSTALL:
        deadline = time.monotonic() + 10
        while True:
            leaks = {s.fd: s for s in leakguard.snapshot().leaks}
            if all(fd in leaks for fd in fds.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        for name, fd in fds.items():
            s = leaks.get(fd)
            cases[name] = None if s is None else {
                "site": s.site.line if s.site and s.site.file == __file__ else s.site_str,
                "stack": [f.line for f in s.stack if f.file == __file__],
                "origin": s.origin,
            }
    for h in held:
        h.close()
    held.clear()
    fds.clear()


async def app_coroutine():
    _, w = await asyncio.open_connection(*ADDR)  # @case:app_task
    return w


async def main():
    loop = asyncio.get_running_loop()
    observed["loop"] = type(loop).__module__.split(".")[0]
    _, w = await asyncio.wait_for(asyncio.open_connection(*ADDR), 5)  # @case:wait_for
    keep("wait_for", w)
    (_, w), = await asyncio.gather(asyncio.open_connection(*ADDR))  # @case:gather
    keep("gather", w)
    _, w = await asyncio.ensure_future(asyncio.open_connection(*ADDR))  # @case:ensure_future
    keep("ensure_future", w)
    if sys.version_info >= (3, 11):
        async with asyncio.TaskGroup() as tg:
            t = tg.create_task(asyncio.open_connection(*ADDR))  # @case:taskgroup
        keep("taskgroup", t.result()[1])
    if sys.version_info >= (3, 11):  # create_task(..., context=): the caller's own context, maybe shared
        shared = contextvars.copy_context()
        _, w = await loop.create_task(asyncio.open_connection(*ADDR), context=shared)  # @case:context
        keep("context", w)
        first = loop.create_task(asyncio.open_connection(*ADDR), context=shared)  # @case:context_shared_1
        second = loop.create_task(asyncio.open_connection(*ADDR), context=shared)  # @case:context_shared_2
        keep("context_shared_1", (await first)[1])
        keep("context_shared_2", (await second)[1])

        async def in_own_context(ctx):  # a task in ctx makes another task in ctx: ctx is entered then
            return await loop.create_task(asyncio.open_connection(*ADDR), context=ctx)  # @case:context_entered

        own = contextvars.copy_context()
        keep("context_entered", (await loop.create_task(in_own_context(own), context=own))[1])

        async def set_var():
            var.set("set-in-task")

        await loop.create_task(set_var(), context=shared)
        observed["var_in_shared_context"] = [shared.run(var.get), var.get()]
    s = await loop.run_in_executor(None, socket.create_connection, ADDR)  # @case:run_in_executor
    keep("run_in_executor", s)
    s = await asyncio.to_thread(socket.create_connection, ADDR)  # @case:to_thread
    keep("to_thread", s)
    s = await asyncio.wait_for(asyncio.to_thread(socket.create_connection, ADDR), 5)  # @case:nested
    keep("nested", s)
    keep("app_task", await asyncio.create_task(app_coroutine()))

    # sock_accept completing in a loop callback (the client connects only once it waits)
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)

    async def connect_later():
        await asyncio.sleep(0.05)
        socket.create_connection(lsock.getsockname()).close()

    later = asyncio.ensure_future(connect_later())
    conn, _ = await loop.sock_accept(lsock)  # @case:sock_accept
    await later
    keep("sock_accept", conn)
    lsock.close()

    # the server side: the client hangs up, the handler never closes its writer
    got = asyncio.Queue()

    async def handler(reader, writer):  # @case:handler
        await got.put(writer)

    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # @case:server
    _, cw = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    sw = await got.get()
    cw.close()
    await cw.wait_closed()
    keep("server", sw)

    # behaviour the wrappers must not change
    var.set("task-parent")
    observed["var_in_task"] = await asyncio.create_task(asyncio.sleep(0, result=var.get()))
    observed["to_thread_var"] = await asyncio.to_thread(var.get)
    try:
        await asyncio.wait_for(asyncio.sleep(10), 0.01)
    except asyncio.TimeoutError as e:
        observed["timeout"] = type(e).__name__
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    try:
        await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        observed["refused"] = [type(e).__name__, e.errno]
    try:
        await asyncio.to_thread(int, "x")
    except ValueError as e:
        observed["to_thread_error"] = str(e)
    collect()
    server.close()
    await server.wait_closed()


if LOOP == "uvloop":
    uvloop.run(main())
else:
    asyncio.run(main())

with ThreadPoolExecutor(2) as pool:
    keep("submit", pool.submit(socket.create_connection, ADDR).result())  # @case:submit
    observed["map"] = list(pool.map(abs, [-1, -2]))
box = []
t = threading.Thread(target=lambda: box.append(socket.create_connection(ADDR)))  # @case:thread_lambda
t.start()
t.join()
keep("thread_lambda", box[0])
# A thread that library code starts, running library code: a "library" compiled under the stdlib's directory.
library = {}
exec(compile(
    "import socket, threading\n"
    "def connect_in_background(addr, box):\n"
    "    t = threading.Thread(target=_work, args=(addr, box))\n"
    "    t.start()\n"
    "    return t\n"
    "def _work(addr, box):\n"
    "    box.append(socket.create_connection(addr))\n",
    os.path.join(os.path.dirname(os.__file__), "_leakguard_test_library.py"), "exec"), library)
box = []
library["connect_in_background"](ADDR, box).join()  # @case:library_thread
keep("library_thread", box[0])
collect()
listener.close()
print(json.dumps({"lines": LINES, "observed": observed, "cases": cases}))
