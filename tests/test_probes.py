"""Probes that found nothing wrong, kept so that they keep finding nothing (issue 14).

* Differential exception identity: a few thousand seeded random socket calls give the
  same results and exceptions (type, errno, message) installed or not, through the
  compiled hook and the pure-Python one, on this interpreter and on 3.10/3.12/3.13 when
  pyenv has them (pure Python there: the extension is built for this one).
* install()/uninstall() in a loop while threads create and close sockets.
* fork() from several threads while others churn sockets and the watcher ticks.

Each runs in a fresh interpreter from a directory that is not the repository root.
``LEAKGUARD_STRESS=1`` runs larger sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .test_host_unchanged import other_pythons, run_py, source_path

STRESS = os.environ.get("LEAKGUARD_STRESS") == "1"
CALLS = 8_000 if STRESS else 3_000  # 20,000 pure-Python calls outran 300 s on 3.10 in CI

_RANDOM_CALLS = r'''
import json, math, random, socket, sys
mode, seed, n, abstract = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if mode != "plain":
    if mode == "pure":
        import os
        os.environ["LEAKGUARD_PURE_PYTHON"] = "1"
    import leakguard
    leakguard.install(integrations="none")
    from leakguard import registry
    assert mode != "pure" or registry._speedups is None
rng = random.Random(seed)
lst = socket.socket()
lst.bind(("127.0.0.1", 0))
lst.listen(4096)  # never full: a blocking connect to a full queue would wait minutes for its SYN retries
lst.setblocking(False)
closed_port = socket.socket()
closed_port.bind(("127.0.0.1", 0))
refusing = closed_port.getsockname()[1]
closed_port.close()  # nobody listens there now
live = []
ANY = [None, -1, 0, 1, 2, 10, 17, 255, 10**30, -(10**30), 2.5, math.nan, "x", b"y", (), [], object]
FAMILIES = [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, -1, 999, *ANY]
TYPES = [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW, socket.SOCK_SEQPACKET, -1, 12345, *ANY]
PROTOS = [0, -1, 6, 17, 132, *ANY]
ADDRS = [("127.0.0.1", 0), ("127.0.0.1", 70000), ("::1", 0), ("127.0.0.1",), "", "\0" + abstract, None, 5,
         ("127.0.0.1", "http"), ("127.0.0.1", -1)]
# No timeout short enough for a loopback connect to outlast it on a loaded machine: outcomes
# must depend on the calls only (0 is non-blocking mode, 2.0 timeout mode).
TIMEOUTS = [None, 0, 2.0, -1, math.nan, math.inf, "x"]

def pick(seq):
    return seq[rng.randrange(len(seq))]

def sock():
    return pick(live) if live and rng.random() < 0.9 else socket.socket()

def call(name, fn):
    try:
        r = fn()
    except BaseException as e:  # what the host sees: type, errno, message
        return [name, type(e).__name__, getattr(e, "errno", None), str(e)]
    if isinstance(r, socket.socket):
        live.append(r)
    if isinstance(r, tuple) and r and isinstance(r[0], socket.socket):
        live.extend(x for x in r if isinstance(x, socket.socket))
    return [name, "ok", type(r).__name__]

def op():
    k = rng.randrange(16)
    if k <= 2:
        args = [pick(FAMILIES), pick(TYPES), pick(PROTOS)][: rng.randrange(4)]
        kw = {"fileno": pick([None, -1, 2**40, "x", 10_000])} if rng.random() < 0.2 else {}
        return call("socket", lambda: socket.socket(*args, **kw))
    if k == 3:
        return call("socketpair", lambda: socket.socketpair(*[pick(FAMILIES), pick(TYPES)][: rng.randrange(3)]))
    s = sock()
    if k == 4:
        return call("close", s.close)
    if k == 5:
        return call("bind", lambda: s.bind(pick(ADDRS)))
    if k == 6:
        return call("connect", lambda: s.connect(pick([("127.0.0.1", refusing), lst.getsockname(), None, ("::1", refusing)])))
    if k == 7:
        return call("settimeout", lambda: s.settimeout(pick(TIMEOUTS)))
    if k == 8:
        return call("setsockopt", lambda: s.setsockopt(pick([socket.SOL_SOCKET, socket.IPPROTO_TCP, -1, "x"]),
                                                        pick([socket.SO_REUSEADDR, socket.SO_KEEPALIVE, -1, 999]),
                                                        pick([0, 1, b"\0" * 4, -1, None])))
    if k == 9:
        return call("dup", s.dup)
    if k == 10:
        return call("fromfd", lambda: socket.fromfd(pick([10_000, -1, "x", s.fileno()]), pick(FAMILIES), pick(TYPES)))
    if k == 11:
        return call("detach", lambda: socket.socket(fileno=s.detach()))
    if k == 12:
        return call("accept", lst.accept)
    if k == 13:
        return call("shutdown", lambda: s.shutdown(pick([0, 1, 2, 3, -1, "x"])))
    if k == 14:
        return call("listen", lambda: s.listen(*[pick([0, 5, -1, "x"])][: rng.randrange(2)]))
    return call("create_connection", lambda: socket.create_connection(
        pick([("127.0.0.1", refusing), lst.getsockname(), ("127.0.0.1", 70000), None]), timeout=pick([None, 2.0])))

out = [op() for _ in range(n)]
for s in live + [lst]:
    try:
        s.close()
    except OSError:
        pass
print(json.dumps(out))
'''


def _calls(tmp_path: Path, mode: str, python: str = sys.executable, pythonpath: str | None = None) -> list[list[object]]:
    script = tmp_path / "random_calls.py"
    script.write_text(_RANDOM_CALLS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKGUARD_")}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(
        # The abstract AF_UNIX name is the machine's: one per test, the same for its runs (parallel
        # tests binding one name got EADDRINUSE in one run of a pair and not the other).
        [python, "-W", "ignore::ResourceWarning", str(script), mode, "1414", str(CALLS), f"lg-{tmp_path.name}-{os.getpid()}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(json.loads(proc.stdout))


def _first_difference(a: list[list[object]], b: list[list[object]]) -> object:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i, x, y
    return len(a), len(b)


class TestSameExceptions:
    """Seeded random socket calls: identical results and exceptions installed or not."""

    def test_this_interpreter(self, tmp_path: Path) -> None:
        plain = _calls(tmp_path, "plain")
        assert len(plain) == CALLS and len({c[1] for c in plain}) > 5  # many kinds of outcome were met
        for mode in ("compiled", "pure"):
            got = _calls(tmp_path, mode)
            assert got == plain, (mode, _first_difference(got, plain))

    @pytest.mark.slow
    @pytest.mark.parametrize("version", ["3.10", "3.12", "3.13"])
    def test_other_interpreter(self, tmp_path: Path, version: str) -> None:
        python = dict(other_pythons()).get(version)
        if python is None:
            pytest.skip(f"no Python {version} under ~/.pyenv/versions")
        path = source_path(tmp_path)
        plain = _calls(tmp_path, "plain", python, path)
        got = _calls(tmp_path, "pure", python, path)
        assert got == plain, _first_difference(got, plain)


class TestInstallDuringCreation:
    """install()/uninstall() in a loop while threads create and close sockets: nothing raises, every socket
    works, and the original socket.__init__ is back at the end."""

    def test_loop(self, tmp_path: Path) -> None:
        rounds = 2000 if STRESS else 200
        code = textwrap.dedent(
            f"""
            import socket, threading
            import leakguard
            original = vars(socket.socket)["__init__"]
            lst = socket.create_server(("127.0.0.1", 0))
            stop = threading.Event()
            errors = []
            def serve():
                while not stop.is_set():
                    try:
                        c, _ = lst.accept()
                        c.close()
                    except OSError:
                        return
            def churn():
                try:
                    while not stop.is_set():
                        a, b = socket.socketpair()
                        a.sendall(b"x"); assert b.recv(1) == b"x"
                        a.close(); b.close()
                        with socket.create_connection(lst.getsockname()) as c:
                            c.fileno()
                        socket.socket().close()
                except BaseException as e:
                    errors.append(repr(e))
            server = threading.Thread(target=serve)
            server.start()
            threads = [threading.Thread(target=churn) for _ in range(3)]
            for t in threads:
                t.start()
            for i in range({rounds}):
                leakguard.install(integrations="none", report_interval=None if i % 3 else 0.01, log_format="json")
                leakguard.snapshot()
                leakguard.uninstall()
            stop.set()
            for t in threads:
                t.join()
            socket.create_connection(lst.getsockname()).close()
            lst.close()
            server.join()
            assert errors == [], errors
            assert vars(socket.socket)["__init__"] is original
            print("ok")
            """
        )
        assert run_py(tmp_path, code).split() == ["ok"]


class TestForkFromThreadsUnderChurn:
    """Threads fork while others churn sockets and the watcher ticks: every child records its own
    sockets and exits cleanly, the parent's watcher keeps ticking."""

    def test_fork_from_threads(self, tmp_path: Path) -> None:
        forks = 20 if STRESS else 5
        code = textwrap.dedent(
            f"""
            import os, socket, threading, time
            import leakguard
            from leakguard import registry, watcher
            leakguard.install(integrations="none", report_interval=0.01, log_format="json")
            stop = threading.Event()
            def churn():
                while not stop.is_set():
                    a, b = socket.socketpair()
                    a.close(); b.close()
            statuses = []
            def forker():
                for _ in range({forks}):
                    pid = os.fork()
                    if pid == 0:
                        code = 0
                        try:
                            s = socket.socket()
                            if registry.get(s.fileno()) is None:
                                code = 3
                            leakguard.snapshot()
                            s.close()
                        except BaseException:
                            code = 4
                        os._exit(code)
                    statuses.append(os.waitpid(pid, 0)[1])
            churners = [threading.Thread(target=churn) for _ in range(2)]
            forkers = [threading.Thread(target=forker) for _ in range(3)]
            for t in churners + forkers:
                t.start()
            for t in forkers:
                t.join()
            stop.set()
            for t in churners:
                t.join()
            assert statuses == [0] * {3 * forks}, statuses
            w = watcher.current()
            start = w.ticks
            while w.ticks < start + 2:
                time.sleep(0.01)
            leakguard.uninstall()
            print("ok")
            """
        )
        # The host itself is multi-threaded here: 3.12+ rightly warns about its forks.
        code = "import warnings; warnings.filterwarnings('ignore', 'This process', DeprecationWarning)\n" + code
        assert run_py(tmp_path, code).split() == ["ok"]
