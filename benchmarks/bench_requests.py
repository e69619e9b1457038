"""requests against a loopback server, plain vs with leakguard installed, side by side.

    python benchmarks/bench_requests.py [--quick]
    python benchmarks/bench_requests.py --instructions   # valgrind: instructions per request

Two workloads, each timed in batches with the baseline and leakguard
interleaved batch by batch in this one process (the machine is noisy), best
batch kept:

- keep-alive: ``Session.get`` over one pooled connection (floor: at most 1 % slower);
- new connection per request: the same, but the server answers
  ``Connection: close``, so urllib3 opens a fresh socket for every request
  (floor: at most 3 % slower).

The server runs in a separate process so it does not compete for this
process's GIL.  It answers with a fixed response straight from a socket loop,
and the session has ``trust_env = False`` (no proxy/netrc lookups from the
environment on every request), so the client's own cost is as small as it
gets: that makes the ratios stricter, not looser.  Batches are short and many,
so the best batch is one the rest of the machine left alone.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):  # python benchmarks/bench_requests.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import requests

import leakguard

Row = dict[str, Any]

FLOORS = {"keep-alive": 1.01, "new connection": 1.03}

_SERVER = textwrap.dedent(
    """
    import socket, sys, threading

    BODY = b"ok"
    KEEP = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nContent-Type: text/plain\\r\\n\\r\\n" + BODY
    CLOSE = (b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nContent-Type: text/plain\\r\\n"
             b"Connection: close\\r\\n\\r\\n" + BODY)

    def serve(conn):
        buf = b""
        with conn:
            while True:
                while b"\\r\\n\\r\\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\\r\\n\\r\\n")
                if b"/close" in head.split(b"\\r\\n", 1)[0]:
                    conn.sendall(CLOSE)
                    return
                conn.sendall(KEEP)

    srv = socket.create_server(("127.0.0.1", 0), backlog=512)
    print(srv.getsockname()[1], flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), srv.close(), sys.exit()), daemon=True).start()
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            break
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    """
)


class _Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the server exits when its stdin closes
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _interleaved(batch: Callable[[int], None], n: int, rounds: int) -> dict[str, float]:
    """Best per-request wall and CPU seconds of *rounds* batches, plain vs installed, alternating order."""
    best = {"plain": float("inf"), "installed": float("inf"), "plain_cpu": float("inf"), "installed_cpu": float("inf")}
    for i in range(rounds):
        order = ("plain", "installed") if i % 2 == 0 else ("installed", "plain")
        for mode in order:
            if mode == "installed":
                leakguard.install()
            try:
                gc.collect()
                c = time.process_time()
                t = time.perf_counter()
                batch(n)
                dt = (time.perf_counter() - t) / n
                dc = (time.process_time() - c) / n
            finally:
                if mode == "installed":
                    leakguard.uninstall()
            best[mode] = min(best[mode], dt)
            best[mode + "_cpu"] = min(best[mode + "_cpu"], dc)
    return best


def _row(name: str, best: dict[str, float], n: int, rounds: int) -> Row:
    plain, installed = best["plain"], best["installed"]
    return {
        "name": f"requests {name}",
        "baseline_us": round(plain * 1e6, 2),
        "leakguard_us": round(installed * 1e6, 2),
        "added_us": round((installed - plain) * 1e6, 2),
        "ratio": round(installed / plain, 4),
        "floor_ratio": FLOORS[name],
        # this process's CPU time per request (the server is another process): the
        # same comparison with the scheduler's noise mostly taken out
        "baseline_cpu_us": round(best["plain_cpu"] * 1e6, 2),
        "leakguard_cpu_us": round(best["installed_cpu"] * 1e6, 2),
        "cpu_ratio": round(best["installed_cpu"] / best["plain_cpu"], 4),
        "requests": n,
        "rounds": rounds,
    }


def run(quick: bool = False) -> list[Row]:
    """Measure both workloads; one row each: name, baseline_us, leakguard_us, ratio (+ floor_ratio)."""
    # New connections leave TIME_WAIT entries on loopback: keep their number well
    # below the ephemeral port range (~28k) per minute.
    keep_n, keep_rounds = (100, 10) if quick else (200, 40)
    new_n, new_rounds = (50, 10) if quick else (100, 40)
    srv = _Server()
    try:
        base = f"http://127.0.0.1:{srv.port}"
        with requests.Session() as session:
            session.trust_env = False
            session.get(base + "/warm").raise_for_status()

            def keep_alive(n: int) -> None:
                get = session.get
                url = base + "/keep"
                for _ in range(n):
                    get(url)

            def new_connection(n: int) -> None:
                get = session.get
                url = base + "/close"
                for _ in range(n):
                    get(url)

            keep_alive(100)
            new_connection(50)
            rows = [
                _row("keep-alive", _interleaved(keep_alive, keep_n, keep_rounds), keep_n, keep_rounds),
                _row("new connection", _interleaved(new_connection, new_n, new_rounds), new_n, new_rounds),
            ]
    finally:
        srv.close()
    return rows


def _client_loop(workload: str, n: int, installed: bool, port: int) -> None:
    """n requests of one workload (the process valgrind measures)."""
    if installed:
        leakguard.install()
    with requests.Session() as session:
        session.trust_env = False
        url = f"http://127.0.0.1:{port}/" + ("keep" if workload == "keep-alive" else "close")
        session.get(url)
        get = session.get
        for _ in range(n):
            get(url)
    if installed:
        leakguard.uninstall()


def instructions(n_small: int = 200, n_large: int = 1200) -> list[Row]:
    """Instructions per request (valgrind callgrind), plain vs installed: immune to machine load.

    Counts this process only, not the server (see ``_callgrind``).
    """
    from benchmarks import _callgrind

    if not _callgrind.available():
        return [{"name": "requests instructions", "error": "valgrind is not installed"}]
    rows: list[Row] = []
    srv = _Server()
    try:
        for workload in FLOORS:
            per: dict[bool, float] = {}
            for installed in (False, True):
                flag = "1" if installed else "0"
                per[installed] = _callgrind.per_op(
                    lambda n, w=workload, f=flag: [
                        sys.executable, os.path.abspath(__file__), "--loop", w, str(n), f, str(srv.port)
                    ],
                    n_small, n_large,
                )  # fmt: skip
            rows.append(
                {
                    "name": f"requests {workload} (instructions)",
                    "baseline_instructions": round(per[False]),
                    "leakguard_instructions": round(per[True]),
                    "ratio": round(per[True] / per[False], 4),
                    "floor_ratio": FLOORS[workload],
                }
            )
    finally:
        srv.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] == ["--loop"]:
        _client_loop(args[1], int(args[2]), args[3] == "1", int(args[4]))
        return 0
    if "--instructions" in args:
        for r in instructions():
            if "error" in r:
                print(f"{r['name']}: {r['error']}")
                continue
            ok = "ok" if r["ratio"] <= r["floor_ratio"] else "OVER"
            print(
                f"{r['name']:<44} {r['baseline_instructions']:>10,} {r['leakguard_instructions']:>10,} "
                f"{r['ratio']:>7.4f}  ≤{r['floor_ratio']:.2f} {ok}"
            )
        return 0
    quick = "--quick" in args
    rows = run(quick)
    print(f"{'workload':<28} {'plain':>10} {'leakguard':>10} {'added':>9} {'ratio':>7}  floor      cpu ratio")
    for r in rows:
        ok = "ok" if r["ratio"] <= r["floor_ratio"] else "OVER"
        print(
            f"{r['name']:<28} {r['baseline_us']:>8.1f}µs {r['leakguard_us']:>8.1f}µs "
            f"{r['added_us']:>+7.2f}µs {r['ratio']:>7.3f}  ≤{r['floor_ratio']:.2f} {ok:<4}  "
            f"{r['cpu_ratio']:.3f} ({r['baseline_cpu_us']:.1f} vs {r['leakguard_cpu_us']:.1f} µs)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
