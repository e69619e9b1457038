"""Each creation path as a loop: what bench_core times and what callgrind counts.

    python benchmarks/_paths.py N INSTALLED PORT KIND...

runs N operations of each KIND (a key of PATHS, or ``connect-remote``: create_connection
to the server on PORT) with leakguard installed (INSTALLED=1) or not.  It imports only what the loops
need, so a program counted under callgrind spends little on start-up, and it is run from
a directory outside the repository, so it measures the installed package.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

# One operation of each makes the sockets of one creation path and closes them.  Only the
# path's own sockets go through socket.socket: a peer an operation needs is a
# _socket.socket (the C type, never hooked) or was made before the loop, so what the
# installed side adds is that path's recording alone.

_LINGER0 = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close() sends RST, no TIME_WAIT


#: path -> (row label, sockets the path creates per operation)
PATHS: dict[str, tuple[str, int]] = {
    "create": ("socket create+close", 1),
    "connect": ("create_connection + close (in-process listener)", 1),
    "accept": ("accept() + close", 1),
    "cycle": ("in-process connect + accept + close cycle", 2),
    "fileno": ("socket(fileno=) + close", 1),
    "fromfd": ("fromfd() + close", 1),
    "dup": ("dup() + close", 1),
    "socketpair": ("socketpair() + close", 2),
    "tls": ("TLS wrap_socket(socket()) + close", 2),
}


def _path_ops() -> tuple[dict[str, Callable[[int], None]], Callable[[], None]]:
    """path -> op(n) running n operations of it, and a cleanup."""
    import _socket

    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    addr = listener.getsockname()
    base = socket.socket()
    base_fd = base.fileno()
    sock, raw = socket.socket, _socket.socket
    AF_INET, SOCK_STREAM, SOL_SOCKET, SO_LINGER = socket.AF_INET, socket.SOCK_STREAM, socket.SOL_SOCKET, socket.SO_LINGER

    def create(n: int) -> None:
        for _ in range(n):
            sock().close()

    def connect(n: int) -> None:  # create_connection to an in-process listener (accepted raw, unhooked)
        for _ in range(n):
            c = socket.create_connection(addr)
            c.setsockopt(SOL_SOCKET, SO_LINGER, _LINGER0)
            fd, _ = listener._accept()  # type: ignore[attr-defined]
            c.close()
            os.close(fd)

    def accept(n: int) -> None:
        for _ in range(n):
            c = raw(AF_INET, SOCK_STREAM)
            c.setsockopt(SOL_SOCKET, SO_LINGER, _LINGER0)
            c.connect(addr)
            a, _ = listener.accept()
            c.close()
            a.close()

    def cycle(n: int) -> None:  # both ends through socket.socket: what an in-process server and client pay
        for _ in range(n):
            c = socket.create_connection(addr)
            c.setsockopt(SOL_SOCKET, SO_LINGER, _LINGER0)
            a, _ = listener.accept()
            c.close()
            a.close()

    def fileno(n: int) -> None:
        dup = os.dup
        for _ in range(n):
            sock(fileno=dup(base_fd)).close()

    def fromfd(n: int) -> None:
        for _ in range(n):
            socket.fromfd(base_fd, AF_INET, SOCK_STREAM).close()

    def dup(n: int) -> None:
        for _ in range(n):
            base.dup().close()

    def socketpair(n: int) -> None:
        for _ in range(n):
            a, b = socket.socketpair()
            a.close()
            b.close()

    def tls_wrap(n: int) -> None:  # the wrap itself (no handshake): a new socket() handed over to SSLSocket
        import ssl  # only here: the other programs need not pay for its import under callgrind

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        for _ in range(n):
            ctx.wrap_socket(sock(), do_handshake_on_connect=False).close()

    def cleanup() -> None:
        listener.close()
        base.close()

    ops: dict[str, Callable[[int], None]] = {
        "create": create,
        "connect": connect,
        "accept": accept,
        "cycle": cycle,
        "fileno": fileno,
        "fromfd": fromfd,
        "dup": dup,
        "socketpair": socketpair,
        "tls": tls_wrap,
    }
    return ops, cleanup


def _app_frames(depth: int, fn: Callable[[], Any]) -> Any:
    """Run *fn* a few application frames deep, as real code would be."""
    return fn() if depth == 0 else _app_frames(depth - 1, fn)


def _connect_loop(address: tuple[str, int]) -> Callable[[int], None]:
    def op(n: int) -> None:
        for _ in range(n):
            s = socket.create_connection(address)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            s.close()  # RST: no TIME_WAIT pile-up across rounds

    return op


def main(n: int, installed: bool, port: int, kinds: list[str]) -> None:
    """The program callgrind counts: *n* operations of each of *kinds*, a few application
    frames deep, each inside its own ``sys.call_tracing`` call: what _callgrind.sections
    counts (start-up, imports, install() and the warm-up are not counted)."""
    if installed:
        import leakguard
        from leakguard import _sockets

        leakguard.install(integrations="none")
        if os.environ.get("LEAKGUARD_PURE_PYTHON", "") in ("", "0") and _sockets._fast is None:
            raise SystemExit("the compiled hook is not built: the count would be the pure-Python path's")
    ops, cleanup = _path_ops()
    ops["connect-remote"] = _connect_loop(("127.0.0.1", port))
    for kind in kinds:
        op = ops[kind]
        op(50)  # warm: allocator pools, the records table, caches
        sys.call_tracing(_app_frames, (5, lambda: op(n)))
    cleanup()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4:])
