"""Task, thread and executor boundaries, and loops that make sockets in C (uvloop): fresh interpreters.

Each case in ``_async_boundaries_script.py`` leaks one socket across one boundary (``wait_for``,
``gather``, ``ensure_future``, ``TaskGroup``, ``run_in_executor``, ``to_thread``, both nested,
``ThreadPoolExecutor.submit``, a thread started by library code, a server's accepted connection)
and must name the application line that asked for it; the same program run without leakguard
must observe the same behaviour (results, exceptions, context variables).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).with_name("_async_boundaries_script.py")

try:
    import uvloop  # noqa: F401

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover - uvloop is in the test extra
    HAVE_UVLOOP = False


def run_script(tmp_path: Path, *args: str, pure: bool = False) -> dict[str, Any]:
    script = tmp_path / "boundaries.py"
    if not script.exists():
        shutil.copy(SCRIPT, script)
    env = {**os.environ, "LEAKGUARD_PURE_PYTHON": "1" if pure else "0"}
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


CASES = [("asyncio", "after", False), ("asyncio", "after", True)]  # compiled hook, then pure Python
if HAVE_UVLOOP:
    CASES += [("uvloop", "before", False), ("uvloop", "after", False)]


@pytest.mark.parametrize("loop,order,pure", CASES)
def test_every_boundary_names_the_application_line(tmp_path: Path, loop: str, order: str, pure: bool) -> None:
    out = run_script(tmp_path, loop, order, "1", pure=pure)
    plain = run_script(tmp_path, loop, order, "0")
    assert out["observed"] == plain["observed"] and out["observed"]["loop"] == loop
    lines, cases = out["lines"], out["cases"]
    expected = {name for name in lines if name not in ("handler",)}
    if sys.version_info < (3, 11):
        expected -= {"taskgroup", "context", "context_shared_1", "context_shared_2", "context_entered"}
    assert set(cases) == expected
    wrong = {
        name: case
        for name, case in cases.items()
        if name != "server" and (case is None or case["site"] != lines[name] or case["origin"] != "socket")
    }
    assert not wrong, (wrong, lines)
    # an accepted connection: the handler that got it, and the line that started the server
    server = cases["server"]
    assert server["site"] == lines["handler"] and lines["server"] in server["stack"], (server, lines)


_UNINSTALL = r"""
import json, sys
if sys.argv[1] == "before":
    import uvloop
import asyncio.base_events, asyncio.selector_events, concurrent.futures.thread, threading


def state():
    return [
        vars(asyncio.base_events.BaseEventLoop)["create_task"],
        vars(asyncio.base_events.BaseEventLoop)["create_server"],
        vars(asyncio.selector_events.BaseSelectorEventLoop)["_accept_connection2"],
        vars(asyncio.selector_events.BaseSelectorEventLoop)["sock_accept"],
        vars(concurrent.futures.thread._WorkItem)["__init__"],
        vars(concurrent.futures.thread._WorkItem)["run"],
        vars(threading.Thread)["start"],
        vars(threading.Thread)["_bootstrap_inner"],
    ]


originals = state()
import leakguard
leakguard.install()
import uvloop
loop_attrs = set(vars(uvloop.Loop))
wrapped = state()
leakguard.uninstall()
restored = state()
print(json.dumps({
    "wrapped": [a is not b for a, b in zip(wrapped, originals)],
    "restored": [a is b for a, b in zip(restored, originals)],
    "uvloop_wrapped": sorted(loop_attrs - set(vars(uvloop.Loop))),
}))
"""


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")
@pytest.mark.parametrize("order", ["before", "after"])
def test_uninstall_restores_every_original(tmp_path: Path, order: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", _UNINSTALL, order], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = json.loads(proc.stdout)
    assert all(out["wrapped"]) and all(out["restored"]), out
    # uvloop.Loop stored none of these itself: installed they were added, uninstalled they are gone
    assert out["uvloop_wrapped"] == sorted(
        ["create_task", "create_connection", "create_unix_connection", "connect_accepted_socket",
         "create_server", "create_unix_server", "sock_accept"]
    )


_UVICORN_APP = r"""
import asyncio, json, os, socket, sys
if sys.argv[1] == "before":
    import uvloop
import leakguard
leakguard.install()
import uvicorn
if sys.argv[2] == "uvloop":
    import uvloop

LINES = {}
with open(__file__) as source:
    for number, text in enumerate(source.read().splitlines(), 1):
        if "# @" + "case:" in text:
            LINES[text.rsplit("# @" + "case:", 1)[1].strip()] = number
never = None


async def app(scope, receive, send):  # @case:app
    global never
    if scope["path"] == "/hang":
        never = never or asyncio.Event()
        await never.wait()
        return
    out = {"lines": LINES, "loop": type(asyncio.get_running_loop()).__module__, "sockets": [
        {"fd": s.fd, "state": s.state, "local": s.local, "remote": s.remote, "origin": s.origin,
         "site": s.site.line if s.site and s.site.file == __file__ else s.site_str,
         "stack": [f.line for f in s.stack if f.file == __file__]}
        for s in leakguard.snapshot().sockets]}
    body = json.dumps(out).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


sock = socket.create_server(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
config = uvicorn.Config(app, loop=sys.argv[2], lifespan="off", log_level="error", http="h11")
uvicorn.Server(config).run(sockets=[sock])  # @case:start
"""

UVICORN_CASES = [("asyncio", "after")] + ([("uvloop", "before"), ("uvloop", "after")] if HAVE_UVLOOP else [])


def _http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(request)
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("loop,order", UVICORN_CASES)
def test_uvicorn_server_side_leak_names_the_app_and_the_server_start(tmp_path: Path, loop: str, order: str) -> None:
    """A real uvicorn server (uvloop: accepts in C): a client hangs up while the app holds the
    request, and the server side's CLOSE_WAIT record names the ASGI app (innermost) and the line that
    started the server."""
    pytest.importorskip("uvicorn")
    app = tmp_path / "server_app.py"
    app.write_text(_UVICORN_APP)
    server = subprocess.Popen(
        [sys.executable, "-W", "error", str(app), order, loop],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        # A body larger than uvicorn's flow-control limit: it stops reading, so it never sees the FIN.
        client.sendall(b"POST /hang HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100_000)
        peer = "127.0.0.1:%d" % client.getsockname()[1]
        client.close()
        deadline = time.monotonic() + 10
        while True:
            out = json.loads(_http(port, b"GET /snapshot HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").split(b"\r\n\r\n", 1)[1])
            mine = [s for s in out["sockets"] if s["remote"] == peer]
            if (mine and mine[0]["state"] == "CLOSE_WAIT") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        server.kill()  # uvicorn's graceful shutdown would wait for the held request
        server.wait(30)
        stderr = server.stderr.read() if server.stderr else ""
        for f in (server.stdout, server.stderr):
            if f:
                f.close()
    assert stderr == ""
    assert out["loop"].startswith(loop)
    assert len(mine) == 1 and mine[0]["state"] == "CLOSE_WAIT", out["sockets"]
    # the ASGI app uvicorn serves it to, then the line that started the server
    assert mine[0]["site"] == out["lines"]["app"] and mine[0]["origin"] == "socket", mine
    assert out["lines"]["start"] in mine[0]["stack"], mine


# --------------------------------------------------------------------------- the continuation itself


def test_continued_cuts_at_the_boundary_and_is_idempotent() -> None:
    from leakguard import stacks

    def app() -> Any:
        return stacks.capture(0, 48)

    app_frames = app()  # innermost: this test's app() frame
    lib = asyncio.sleep.__code__  # library code objects
    boundary = asyncio.gather.__code__
    parent = app_frames
    # library frames up to the boundary, then an application frame below it (the loop's caller)
    child = (lib, 0, boundary, 2, app_frames[0], 4)
    cont = stacks.Continuation(boundary, parent, None)
    once = stacks.continued(child, cont, 48)
    assert once == (lib, 0, boundary, 2) + parent
    assert stacks.continued(once, cont, 48) == once
    # own frames with an application frame: unchanged
    mine = (app_frames[0], 0, boundary, 2)
    assert stacks.continued(mine, cont, 48) is mine
    # bounded by depth
    assert len(stacks.continued(child, stacks.Continuation(boundary, parent * 40, None), 10)) == 20
    # a chain of creators is resolved lazily, and never more than one link is kept
    first = stacks.Continuation(None, (lib, 0), None)
    second = stacks.Continuation(None, (lib, 2), first)
    third = stacks.Continuation(None, (lib, 4), second)
    assert second.outer is None and third.outer is second
    assert third.stack() == (lib, 4, lib, 2, lib, 0) and third.outer is None


def test_failures_inside_the_wrappers_are_contained(tmp_path: Path) -> None:
    """continuation() broken: tasks, jobs and threads run exactly as without leakguard; errors are counted."""
    code = r"""
import asyncio, threading, json
from concurrent.futures import ThreadPoolExecutor
import leakguard
from leakguard import registry
leakguard.install()
def broken(*a, **k):
    raise RuntimeError("leakguard bug")
registry.continuation = broken
before = registry.stats()["hook_errors"]
async def main():
    a = await asyncio.wait_for(asyncio.sleep(0, result=1), 5)
    b = await asyncio.gather(asyncio.sleep(0, result=2))
    c = await asyncio.to_thread(abs, -3)
    return [a, b, c]
out = asyncio.run(main())
with ThreadPoolExecutor(1) as pool:
    out.append(pool.submit(abs, -4).result())
box = []
t = threading.Thread(target=box.append, args=(5,))
t.start(); t.join()
out.append(box)
print(json.dumps({"out": out, "errors": registry.stats()["hook_errors"] - before}))
"""
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    got = json.loads(proc.stdout)
    assert got["out"] == [1, [2], 3, 4, [5]] and got["errors"] >= 4


# --------------------------------------------------------------------------- uvloop: unix sockets, accepted sockets

_UVLOOP_UNIX = r"""
import asyncio, json, os, socket, sys, tempfile
if sys.argv[1] == "before":
    import uvloop
import leakguard
INSTALL = sys.argv[2] == "1"
if INSTALL:
    leakguard.install()
if sys.argv[1] == "after":
    import uvloop

LINES = {}
with open(__file__) as source:
    for number, text in enumerate(source.read().splitlines(), 1):
        if "# @" + "case:" in text:
            LINES[text.rsplit("# @" + "case:", 1)[1].strip()] = number
out = {}
seen = {}  # what the program observes: the same with and without leakguard


def record(name, fd):
    if not INSTALL:
        return
    found = [s for s in leakguard.snapshot().sockets if s.fd == fd]
    out[name] = [{"site": s.site.line if s.site and s.site.file == __file__ else s.site_str,
                  "stack": [f.line for f in s.stack if f.file == __file__], "origin": s.origin, "family": s.family}
                 for s in found]


def fd_of(transport):
    return transport.get_extra_info("socket").fileno()


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def main():
    loop = asyncio.get_running_loop()
    seen["loop"] = type(loop).__module__.split(".")[0]
    path = os.path.join(tempfile.mkdtemp(), "s")
    got = asyncio.Queue()

    async def handler(reader, writer):  # @case:handler
        await got.put((reader, writer))

    server = await asyncio.start_unix_server(handler, path)  # @case:start_unix_server
    record("listening", server.sockets[0].fileno())
    reader, writer = await asyncio.open_unix_connection(path)  # @case:open_unix_connection
    record("open_unix_connection", fd_of(writer))
    sreader, served = await got.get()
    writer.write(b"hi")
    seen["server_read"] = (await sreader.readexactly(2)).decode()
    served.write(b"ok")
    seen["client_read"] = (await reader.readexactly(2)).decode()
    record("accepted", fd_of(served))
    transport, _ = await loop.create_unix_connection(asyncio.Protocol, path)  # @case:create_unix_connection
    record("create_unix_connection", fd_of(transport))
    _, extra = await got.get()
    # a socket the application accepted itself, handed to the loop
    lsock = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lsock.getsockname())
    conn, _ = lsock.accept()
    accepted, _ = await loop.connect_accepted_socket(Echo, conn)  # @case:connect_accepted_socket
    record("connect_accepted_socket", fd_of(accepted))
    client.setblocking(False)
    await loop.sock_sendall(client, b"echo")
    seen["echo"] = (await loop.sock_recv(client, 4)).decode()
    try:
        await loop.create_unix_connection(asyncio.Protocol, path + "-missing")
    except OSError as e:
        seen["missing"] = [type(e).__name__, e.errno]
    for t in (writer, served, transport, extra, accepted):
        t.close()
    client.close()
    lsock.close()
    server.close()
    await server.wait_closed()


uvloop.run(main())
print(json.dumps({"lines": LINES, "out": out, "seen": seen}))
"""


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")
@pytest.mark.parametrize("order", ["before", "after"])
def test_uvloop_unix_and_accepted_sockets(tmp_path: Path, order: str) -> None:
    """Real uvloop, which makes these sockets in C: ``create_unix_server`` (via ``start_unix_server``),
    ``open_unix_connection``, ``create_unix_connection`` and ``connect_accepted_socket`` each record the
    line that asked; a connection the unix server accepted names its handler and the server's line; the
    program observes the same with leakguard as without it."""
    script = tmp_path / "uvloop_unix.py"
    script.write_text(_UVLOOP_UNIX)

    def run(install: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-W", "error", str(script), order, install],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        return json.loads(proc.stdout)  # type: ignore[no-any-return]

    got, plain = run("1"), run("0")
    assert got["seen"] == plain["seen"] and got["seen"]["loop"] == "uvloop", (got["seen"], plain["seen"])
    lines, out = got["lines"], got["out"]
    for name, line in [
        ("listening", lines["start_unix_server"]),
        ("open_unix_connection", lines["open_unix_connection"]),
        ("create_unix_connection", lines["create_unix_connection"]),
        ("connect_accepted_socket", lines["connect_accepted_socket"]),
    ]:
        assert len(out[name]) == 1 and out[name][0]["site"] == line, (name, out[name], lines)
    assert [s["family"] for s in out["open_unix_connection"]] == ["AF_UNIX"]
    (accepted,) = out["accepted"]
    assert accepted["site"] == lines["handler"] and lines["start_unix_server"] in accepted["stack"], accepted
