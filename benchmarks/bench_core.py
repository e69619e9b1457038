"""Core costs, side by side: socket hooks, snapshot() against psutil and /proc/net/tcp, memory.

Every figure is the best of several rounds, with the baseline and leakguard
interleaved round by round in this one process (the machine is noisy).
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):  # python benchmarks/bench_core.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import leakguard
from benchmarks._paths import PATHS, _app_frames, _connect_loop, _path_ops

Row = dict[str, Any]


def _best(fn: Callable[[], float], rounds: int) -> float:
    return min(fn() for _ in range(rounds))


def _interleaved(
    op: Callable[[int], None], n: int, rounds: int, control: bool = False
) -> tuple[float, float, float]:
    """(plain, installed) seconds per operation, best of *rounds*, and the median ratio of paired rounds.

    Rounds alternate ABBA (plain first, then installed first, ...) so that neither side always
    runs on a warmer cache.  The best round of each side is what a quiet machine gives; the
    median of each pair's ratio (a plain and an installed round run back to back) cancels the
    machine's drift over the run, which the two bests do not.  With *control*, leakguard is
    never installed: both sides are plain, and how far their figures differ is the noise of
    the method on this machine.
    """
    plain = installed = float("inf")
    ratios: list[float] = []
    for r in range(rounds):
        got: dict[str, float] = {}
        for mode in ("plain", "installed") if r % 2 == 0 else ("installed", "plain"):
            if mode == "installed" and not control:
                leakguard.install(integrations="none")
            gc.collect()
            t = time.perf_counter()
            op(n)
            got[mode] = (time.perf_counter() - t) / n
            if mode == "installed" and not control:
                leakguard.uninstall()
        plain, installed = min(plain, got["plain"]), min(installed, got["installed"])
        ratios.append(got["installed"] / got["plain"])
    return plain, installed, statistics.median(ratios)


def _row(name: str, plain: float, inst: float, pair_ratio: float | None = None) -> Row:
    row: Row = {
        "name": name,
        "baseline_us": round(plain * 1e6, 3),
        "leakguard_us": round(inst * 1e6, 3),
        "added_us": round((inst - plain) * 1e6, 3),
        "ratio": round(inst / plain, 4),
    }
    if pair_ratio is not None:
        row["pair_ratio"] = round(pair_ratio, 4)
    return row


# --- per-operation overhead -------------------------------------------------------------


_SERVER = textwrap.dedent(
    """
    import socket, sys
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        conn.close()
    """
)


class _Server:
    """A loopback peer in another process: what is measured is this process's side only
    (an in-process server thread would add its accept() hook and GIL hand-offs to the figure)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.address = ("127.0.0.1", int(self.proc.stdout.readline()))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def bench_connect(quick: bool) -> list[Row]:
    """The timed row, and the same method with both sides plain (what noise alone gives)."""
    srv = _Server()
    op = _connect_loop(srv.address)
    rounds = 21 if quick else 121  # many short rounds: the paired median has many pairs
    try:
        p, i, pr = _interleaved(op, 250, rounds)
        cp, ci, cpr = _interleaved(op, 250, rounds, control=True)
    finally:
        srv.close()
    control = _row("loopback connect+close: plain vs plain (noise of the method)", cp, ci, cpr)
    return [_row("loopback connect+close", p, i, pr), control]


def _deep(op: Callable[[int], None]) -> Callable[[int], None]:
    return lambda k: _app_frames(5, lambda: op(k))


def bench_paths(quick: bool) -> list[Row]:
    """Each creation path timed, plain and installed interleaved (instruction counts: bench_instructions)."""
    ops, cleanup = _path_ops()
    rows: list[Row] = []
    try:
        for kind, (label, per) in PATHS.items():
            op = ops[kind]
            n = (20_000 if quick else 100_000) if kind == "create" else (2_000 if quick else 5_000)
            p, i, pr = _interleaved(_deep(op), n, 5 if quick else 9)
            row = _row(label, p, i, pr)
            row.update(path=kind, sockets_per_op=per)
            rows.append(row)
    finally:
        cleanup()
    return rows


def bench_instructions(quick: bool) -> list[Row]:
    """Instructions per operation, plain vs installed (see _callgrind): the figure no load moves.

    Every program runs from a directory outside the repository, so it measures the
    installed package; all of them run side by side on the machine's cores."""
    import tempfile

    from benchmarks import _callgrind, _paths

    if not _callgrind.available():
        return [{"name": "instructions per operation", "error": "valgrind is not installed"}]
    srv = _Server()
    n = 300 if quick else 1_000
    plan = [("connect-remote", "loopback connect+close", 1), *((k, label, per) for k, (label, per) in PATHS.items())]
    kinds = [kind for kind, _, _ in plan]
    argvs = [[sys.executable, _paths.__file__, str(n), flag, str(srv.address[1]), *kinds] for flag in ("0", "1")]
    try:
        with tempfile.TemporaryDirectory(prefix="leakguard-bench-") as outside:
            plain_counts, installed_counts = _callgrind.sections(argvs, cwd=outside)
    finally:
        srv.close()
    if len(plain_counts) != len(kinds) or len(installed_counts) != len(kinds):
        return [{"name": "instructions per operation", "error": "callgrind dumped no count for some paths"}]
    rows: list[Row] = []
    for (kind, name, per), a, b in zip(plan, plain_counts, installed_counts):
        plain, inst = a / n, b / n
        rows.append(
            {
                "name": f"{name} (instructions)",
                "baseline_instructions": round(plain),
                "leakguard_instructions": round(inst),
                "added_instructions": round(inst - plain),
                "added_per_socket": round((inst - plain) / per),
                "ratio": round(inst / plain, 4),
                "path": kind,
                "sockets_per_op": per,
            }
        )
    return rows


_TLS_SERVER = textwrap.dedent(
    """
    import socket, ssl, sys, threading
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(listener.getsockname()[1], flush=True)

    def serve(conn):
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)  # until the client closes
        except OSError:
            pass

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    """
)


def bench_tls_connect(quick: bool) -> Row:
    """TLS handshake + close against a server in another process (a throwaway self-signed certificate)."""
    import shutil
    import ssl
    import tempfile

    openssl = shutil.which("openssl")
    if openssl is None:
        return {"name": "TLS connect+close", "error": "the openssl command is not installed (needed for a certificate)"}
    with tempfile.TemporaryDirectory(prefix="leakguard-bench-tls-") as d:
        certfile, keyfile = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", keyfile, "-out", certfile, "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        ctx = ssl.create_default_context(cafile=certfile)
        proc = subprocess.Popen([sys.executable, "-c", _TLS_SERVER, certfile, keyfile], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            address = ("127.0.0.1", int(proc.stdout.readline()))

            def op(n: int) -> None:
                for _ in range(n):
                    with ctx.wrap_socket(socket.create_connection(address), server_hostname="127.0.0.1"):
                        pass

            p, i, pr = _interleaved(op, 50 if quick else 100, 5 if quick else 15)
        finally:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    return _row("TLS connect (handshake) + close", p, i, pr)


def bench_asyncio_connect(quick: bool) -> Row:
    srv = _Server()

    async def many(n: int) -> None:
        for _ in range(n):
            r, w = await asyncio.open_connection(*srv.address)
            w.transport.abort()

    def op(n: int) -> None:
        asyncio.run(many(n))

    try:
        p, i, pr = _interleaved(op, 500 if quick else 1_000, 5 if quick else 13)
    finally:
        srv.close()
    return _row("asyncio open_connection+close", p, i, pr)


# --- snapshot against the alternatives --------------------------------------------------


def _proc_net_tcp() -> int:
    """The netstat way: /proc/self/fd inodes joined with the machine-wide /proc/net/tcp{,6}."""
    inodes = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[9] in inodes:
                    found += 1
    return found


def _make_sockets(n: int) -> tuple[list[socket.socket], Callable[[], None]]:
    """n own sockets: half the client ends in CLOSE_WAIT, the rest ESTABLISHED pairs."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    addr = listener.getsockname()
    held: list[socket.socket] = []
    half = n // 2
    for _ in range(half):  # CLOSE_WAIT: the server side hangs up
        c = socket.create_connection(addr)
        a, _ = listener.accept()
        a.close()
        held.append(c)
    for _ in range((n - half) // 2):  # ESTABLISHED both ends
        c = socket.create_connection(addr)
        a, _ = listener.accept()
        held.extend((c, a))

    def cleanup() -> None:
        for s in held:
            s.close()
        listener.close()

    return held, cleanup


_FOREIGN = textwrap.dedent(
    """
    import resource, socket, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = int(sys.argv[1])
    lst = socket.create_server(("127.0.0.1", 0), backlog=4096)
    held = []
    for _ in range(n // 2):
        c = socket.create_connection(lst.getsockname()); a, _ = lst.accept(); held += [c, a]
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def _foreign(total: int) -> list[subprocess.Popen[str]]:
    """Other processes holding *total* TCP sockets on this machine."""
    procs = []
    per = 8_000
    while total > 0:
        k = min(per, total)
        p = subprocess.Popen([sys.executable, "-c", _FOREIGN, str(k)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        p.stdout.readline()
        procs.append(p)
        total -= k
    return procs


def _time(fn: Callable[[], Any], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_snapshot(quick: bool) -> list[Row]:
    import psutil

    proc = psutil.Process()
    conns = getattr(proc, "net_connections", None) or proc.connections
    sizes = [10, 100, 1_000] if quick else [10, 100, 1_000, 10_000]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows: list[Row] = []
    leakguard.install(integrations="none")
    try:
        for n in sizes:
            if n + 100 > hard:
                continue
            held, cleanup = _make_sockets(n)
            try:
                rounds = 5 if n >= 10_000 else 9
                snap = leakguard.snapshot()
                assert len(snap.leaks) >= n // 2, (len(snap.leaks), n)
                t_lg = t_ps = t_proc = float("inf")
                for _ in range(rounds):  # interleaved
                    t_lg = min(t_lg, _time(leakguard.snapshot, 1))
                    t_ps = min(t_ps, _time(lambda: conns("tcp"), 1))
                    t_proc = min(t_proc, _time(_proc_net_tcp, 1))
                rows.append(
                    {
                        "name": f"snapshot() {n} own sockets",
                        "baseline_us": round(t_ps * 1e6, 1),
                        "leakguard_us": round(t_lg * 1e6, 1),
                        "proc_net_tcp_us": round(t_proc * 1e6, 1),
                        "ratio": round(t_lg / t_ps, 4),
                        "sockets": n,
                        "baseline": "psutil net_connections('tcp')",
                    }
                )
                if n == 1_000:
                    foreign_n = 20_000
                    procs = _foreign(foreign_n)
                    try:
                        t_lg2 = t_ps2 = t_proc2 = float("inf")
                        for _ in range(rounds):
                            t_lg2 = min(t_lg2, _time(leakguard.snapshot, 1))
                            t_ps2 = min(t_ps2, _time(lambda: conns("tcp"), 1))
                            t_proc2 = min(t_proc2, _time(_proc_net_tcp, 1))
                    finally:
                        for p in procs:
                            assert p.stdin is not None
                            p.stdin.close()
                            p.wait()
                            if p.stdout is not None:
                                p.stdout.close()
                    rows.append(
                        {
                            "name": f"snapshot() {n} own + {foreign_n} foreign sockets",
                            "baseline_us": round(t_ps2 * 1e6, 1),
                            "leakguard_us": round(t_lg2 * 1e6, 1),
                            "proc_net_tcp_us": round(t_proc2 * 1e6, 1),
                            "ratio": round(t_lg2 / t_ps2, 4),
                            "flat": round(t_lg2 / t_lg, 3),
                            "sockets": n,
                        }
                    )
            finally:
                cleanup()
    finally:
        leakguard.uninstall()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return rows


# --- memory ----------------------------------------------------------------------------


def bench_memory(quick: bool) -> list[Row]:
    n = 10_000

    def allocated(install: bool) -> int:
        if install:
            leakguard.install(integrations="none")
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        socks = [_app_frames(5, socket.socket) for _ in range(n)]
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        for s in socks:
            s.close()
        if install:
            leakguard.uninstall()
        return used

    plain = min(allocated(False) for _ in range(2))
    inst = min(allocated(True) for _ in range(2))
    per = (inst - plain) / n
    rows: list[Row] = [
        {"name": "memory per live tracked socket", "value": round(per, 1), "unit": "bytes", "floor": 1024},
    ]

    import psutil

    proc = psutil.Process()
    cycles = 100_000 if quick else 1_000_000
    leakguard.install(integrations="none")
    try:
        sock = socket.socket
        for _ in range(10_000):  # warm up allocator pools
            sock().close()
        gc.collect()
        before = proc.memory_info().rss
        for _ in range(cycles):
            sock().close()
        gc.collect()
        after = proc.memory_info().rss
    finally:
        leakguard.uninstall()
    rows.append(
        {
            "name": f"RSS growth after {cycles:,} create/close cycles",
            "value": round((after - before) / 2**20, 2),
            "unit": "MiB",
            "floor": 2,
        }
    )
    return rows


def run(quick: bool = False) -> list[Row]:
    rows = [*bench_paths(quick), *bench_connect(quick), bench_tls_connect(quick), bench_asyncio_connect(quick)]
    rows += bench_instructions(quick)
    rows += bench_snapshot(quick)
    rows += bench_memory(quick)
    return rows


if __name__ == "__main__":
    import json

    for r in run("--quick" in sys.argv):
        print(json.dumps(r))
