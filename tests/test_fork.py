"""Fork safety: each forked worker reports its own leaks with its own watcher; inherited sockets are not its leaks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .helpers import HangUpServer
from .test_cli_run import LEAKGUARD, PY, Running, clean_env, json_events, line_of

PREFORK = textwrap.dedent(
    """\
    import multiprocessing, os, socket, threading, time
    from leakguard import watcher

    def hangup_server():
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        def serve():
            while True:
                try:
                    c, _ = lst.accept()
                except OSError:
                    return
                c.close()
        threading.Thread(target=serve, daemon=True).start()
        return lst

    def wait_ticks(n):
        w = watcher.current()
        start = w.ticks
        while w.ticks < start + n:
            time.sleep(0.01)

    KEEP = []

    def worker(i):
        lst = hangup_server()
        for _ in range(i + 1):
            conn = socket.create_connection(lst.getsockname())  # WORKER
            KEEP.append(conn)
            conn.recv(1)
        print("worker", os.getpid(), i + 1, flush=True)
        wait_ticks(2)

    if __name__ == "__main__":
        lst = hangup_server()
        parent = socket.create_connection(lst.getsockname())  # PARENT
        parent.recv(1)
        wait_ticks(1)
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=worker, args=(i,)) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        print("parent", os.getpid(), *[p.exitcode for p in procs], flush=True)
        wait_ticks(1)
    """
)

GUNICORN_APP = textwrap.dedent(
    """\
    import os, socket

    KEEP = []
    PEER = (os.environ["LEAK_HOST"], int(os.environ["LEAK_PORT"]))

    def app(environ, start_response):
        KEEP.append(socket.create_connection(PEER))  # LEAK
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    """
)


def by_pid(events: list[dict[str, Any]], name: str) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if e.get("event") == name:
            out.setdefault(e["pid"], []).append(e)
    return out


class TestMultiprocessingFork:
    """multiprocessing workers (fork) each report their own leaks; the parent's are not reported twice."""

    def test_per_worker_reports(self, tmp_path: Path) -> None:
        prog = tmp_path / "prefork.py"
        prog.write_text(PREFORK)
        r = subprocess.run(
            [LEAKGUARD, "run", "--report-interval", "0.2", "--log-format", "json", "--", PY, str(prog)],
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120,
        )
        assert r.returncode == 0, r.stderr
        out = [line.split() for line in r.stdout.splitlines()]
        workers = {int(w[1]): int(w[2]) for w in out if w[0] == "worker"}
        parent_line = next(p for p in out if p[0] == "parent")
        parent, exitcodes = int(parent_line[1]), parent_line[2:]
        assert exitcodes == ["0", "0"] and len(workers) == 2
        events = json_events(r.stderr)
        leaks, summaries = by_pid(events, "leakguard.leak"), by_pid(events, "leakguard.summary")
        worker_site, parent_site = f"prefork.py:{line_of(PREFORK, '# WORKER')}", f"prefork.py:{line_of(PREFORK, '# PARENT')}"
        assert {e["site"] for e in leaks[parent]} == {parent_site}
        for pid, n in workers.items():
            assert {e["site"] for e in leaks[pid]} == {worker_site}, leaks[pid]  # never the parent's line
            verdicts = {e.get("verdict") for e in leaks[pid]}  # a group per site and verdict (held by a local or KEEP)
            assert sum(max(e["count"] for e in leaks[pid] if e.get("verdict") == v) for v in verdicts) == n  # its own only
            last = summaries[pid][-1]
            assert last["leaks"] == n
            assert last["inherited_leaks"] == 1  # the parent's CLOSE_WAIT socket, counted, not reported
            assert last["inherited"] >= 2  # and the parent's listener
        assert all(s["inherited"] == 0 for s in summaries[parent])


@pytest.mark.skipif(shutil.which("gunicorn", path=os.path.dirname(sys.executable)) is None, reason="gunicorn missing")
class TestGunicornPrefork:
    """Each gunicorn worker reports the leaks of the requests it served, at the application's line."""

    def test_per_worker_reports(self, tmp_path: Path) -> None:
        (tmp_path / "leakyapp.py").write_text(GUNICORN_APP)
        gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
        site = f"leakyapp.py:{line_of(GUNICORN_APP, '# LEAK')}"
        with HangUpServer() as peer:
            env = clean_env(LEAK_HOST=peer.host, LEAK_PORT=str(peer.port))
            cmd = [LEAKGUARD, "run", "--report-interval", "0.2", "--log-format", "json", "--",
                   gunicorn, "-w", "2", "-b", "127.0.0.1:0", "--chdir", str(tmp_path), "leakyapp:app"]
            with Running(cmd, tmp_path, env) as run:
                listening = run.wait_for(
                    lambda: [m for ln in run.lines if (m := re.search(r"Listening at: http://([\d.]+):(\d+)", ln))]
                )
                assert listening, run.lines
                host, port = listening[0].group(1), listening[0].group(2)
                assert run.wait_for(lambda: sum("Booting worker" in ln for ln in run.lines) >= 2), run.lines
                served: dict[int, int] = {}
                for _ in range(60):
                    with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as resp:
                        pid = int(resp.read())
                    served[pid] = served.get(pid, 0) + 1
                    if len(served) == 2 and min(served.values()) >= 2:
                        break

                def reported() -> bool:
                    leaks = by_pid(run.events(), "leakguard.leak")
                    return all(
                        any(e["site"] == site and e["count"] == n for e in leaks.get(pid, [])) for pid, n in served.items()
                    )

                assert run.wait_for(reported), (served, by_pid(run.events(), "leakguard.leak"))
                leaks = by_pid(run.events(), "leakguard.leak")
                for pid, n in served.items():
                    assert all(e["site"] == site and e["count"] <= n for e in leaks[pid])
                    assert all(e["state"] == "CLOSE_WAIT" and e["peer"] == f"{peer.host}:{peer.port}" for e in leaks[pid])
                master = set(by_pid(run.events(), "leakguard.summary")) - set(served)
                assert master and not any(pid in leaks for pid in master)  # the arbiter leaked nothing
