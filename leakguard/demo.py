"""``python -m leakguard demo``: a connection leak caught in the act, on loopback only.

A tiny server accepts one connection and hangs up.  The "application" below
opens a connection with ``socket.create_connection`` and forgets to close it,
so the kernel moves it to CLOSE_WAIT.  leakguard names the line that opened it.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import TextIO

from . import stacks

stacks.mark_application(__file__)  # this file plays the application here


def _serve_once(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    conn.sendall(b"hello\n")
    conn.close()  # the peer hangs up: the client side goes to CLOSE_WAIT


def fetch_greeting(port: int) -> bytes:
    """The bug: the connection is never closed."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    _LEAKED.append(conn)  # kept alive, as a real app keeps it in a cache or a global
    return conn.recv(100)


_LEAKED: list[socket.socket] = []


def main(out: TextIO | None = None) -> int:
    import leakguard

    out = out or sys.stdout
    leakguard.install(integrations="none")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        server = threading.Thread(target=_serve_once, args=(listener,), daemon=True)
        server.start()
        greeting = fetch_greeting(listener.getsockname()[1])
        server.join(5)
        print(f"demo: the server said {greeting!r} and hung up; the client never closed its socket.", file=out)
        snap = leakguard.snapshot()
        deadline = time.monotonic() + 5
        while not snap.leaks and time.monotonic() < deadline:
            time.sleep(0.01)
            snap = leakguard.snapshot()
        print(file=out)
        print(snap.format(), file=out)
        found = bool(snap.leaks)
    finally:
        for s in _LEAKED:
            s.close()
        _LEAKED.clear()
        listener.close()
        leakguard.uninstall()
    print(file=out)
    if found:
        print("demo: cleaned up. Call leakguard.install() in your program to find its leaks the same way.", file=out)
        return 0
    print("demo: no leak was seen; this platform may not report TCP states.", file=out)
    return 1
