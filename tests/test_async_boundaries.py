"""Task, thread and executor boundaries, and loops that make sockets in C (uvloop): fresh interpreters.

Each case in ``_async_boundaries_script.py`` leaks one socket across one boundary (``wait_for``,
``gather``, ``ensure_future``, ``TaskGroup``, ``run_in_executor``, ``to_thread``, both nested,
``ThreadPoolExecutor.submit``, a thread started by library code, a server's accepted connection)
and must name the application line that asked for it; the same program run without leakguard
must observe the same behaviour (results, exceptions, context variables).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).with_name("_async_boundaries_script.py")

try:
    import uvloop  # noqa: F401

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover - uvloop is in the test extra
    HAVE_UVLOOP = False


def run_script(tmp_path: Path, *args: str) -> dict[str, Any]:
    script = tmp_path / "boundaries.py"
    if not script.exists():
        shutil.copy(SCRIPT, script)
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


CASES = [("asyncio", "after")]
if HAVE_UVLOOP:
    CASES += [("uvloop", "before"), ("uvloop", "after")]


@pytest.mark.parametrize("loop,order", CASES)
def test_every_boundary_names_the_application_line(tmp_path: Path, loop: str, order: str) -> None:
    out = run_script(tmp_path, loop, order, "1")
    plain = run_script(tmp_path, loop, order, "0")
    assert out["observed"] == plain["observed"] and out["observed"]["loop"] == loop
    lines, cases = out["lines"], out["cases"]
    expected = {name for name in lines if name not in ("handler",)}
    if sys.version_info < (3, 11):
        expected.discard("taskgroup")
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
