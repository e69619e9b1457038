"""``leakguard inspect PID`` (leakguard.procview): another process's sockets read from outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from .test_attach import Target, _kernel_view, as_nobody, leakguard_cli, target  # noqa: F401  (target: the fixture)


class TestInspect:
    """``leakguard inspect PID`` reads a process that never imported leakguard, from outside."""

    def test_matches_the_kernel(self, target: Target) -> None:
        r = leakguard_cli("inspect", str(target.pid), "--json")
        assert r.returncode == 0, r.stderr
        view = json.loads(r.stdout)
        ours = {s["fd"]: (s["state"], s["local"], s["remote"]) for s in view["sockets"] if s["type"] == "tcp"}
        assert ours == _kernel_view(target.pid)
        assert view["counts"] == {"LISTEN": 1, "CLOSE_WAIT": 2}
        assert [s["state"] for s in view["leaks"]] == ["CLOSE_WAIT", "CLOSE_WAIT"]
        assert all(s["origin"] == "unknown" and s["stack"] == [] for s in view["sockets"])
        assert view["fds"]["open"] == psutil.Process(target.pid).num_fds()
        assert view["fds"]["limit"] == psutil.Process(target.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
        assert set(view) == {"pid", "taken_at", "counts", "fds", "sockets", "leaks", "fd_projection"}
        assert view["fd_projection"] is None  # nothing grows in this target
        target.finish()

    def test_text_groups_close_wait_by_peer(self, target: Target) -> None:
        r = leakguard_cli("inspect", str(target.pid))
        assert r.returncode == 0, r.stderr
        listen = next(s for s in _kernel_view(target.pid).values() if s[0] == "LISTEN")[1]
        assert f"listening: {listen}" in r.stdout
        assert "TCP by state: CLOSE_WAIT 2, LISTEN 1" in r.stdout
        assert f"      2 to {listen}" in r.stdout
        target.finish()

    def test_own_limit_not_ours(self, tmp_path: Path) -> None:
        """The limit is the target's RLIMIT_NOFILE (/proc/PID/limits), not the inspecting process's."""
        proc = subprocess.Popen(
            [sys.executable, "-c", "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (200, 4096)); "
             "print('x', flush=True); sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "x\n"
            r = leakguard_cli("inspect", str(proc.pid), "--json")
            assert json.loads(r.stdout)["fds"]["limit"] == 200
        finally:
            proc.kill()
            proc.communicate(timeout=10)

    def test_no_such_process(self) -> None:
        r = leakguard_cli("inspect", "999999999")
        assert (r.returncode, r.stdout, r.stderr) == (1, "", "leakguard inspect: no such process: 999999999\n")

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the check as another user")
    def test_permission_denied(self, target: Target) -> None:
        r = as_nobody("inspect", str(target.pid))
        assert r.returncode == 1
        assert r.stderr.startswith("leakguard inspect: permission denied reading /proc/")
        assert "(uid 0)" in r.stderr and r.stderr.count("\n") == 1
