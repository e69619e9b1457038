"""``leakguard doctor`` and ``--version``: what is active and why, and the settings judged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .test_attach import leakguard_cli


class TestDoctorAndVersion:
    """``leakguard doctor`` and ``--version`` say what is active and why, and judge the settings."""

    def test_version(self) -> None:
        import leakguard

        r = leakguard_cli("--version")
        assert r.returncode == 0
        assert r.stdout.startswith(f"leakguard {leakguard.__version__} (Python {sys.version.split()[0]}, ")

    def test_json(self) -> None:
        from leakguard.integrations import INTEGRATIONS

        r = leakguard_cli("doctor", "--json")
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert [i["name"] for i in rep["integrations"]] == list(INTEGRATIONS)
        assert {i["status"] for i in rep["integrations"]} <= {"applied", "skipped", "failed"}
        assert next(i for i in rep["integrations"] if i["name"] == "requests")["status"] == "applied"
        settings = {s["setting"]: s for s in rep["settings"]}
        assert "removed in Linux 4.12" in settings["net.ipv4.tcp_tw_recycle"]["advice"]
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            assert settings["net.ipv4.ip_local_port_range"]["value"] == " ".join(f.read().split())
        assert {"RLIMIT_NOFILE", "net.ipv4.tcp_tw_reuse", "net.core.somaxconn"} <= set(settings)
        assert isinstance(rep["speedups"]["active"], bool) and rep["speedups"]["reason"]

    def test_pure_python_says_why(self) -> None:
        r = leakguard_cli("doctor", "--json", env={**os.environ, "LEAKGUARD_PURE_PYTHON": "1"})
        assert json.loads(r.stdout)["speedups"] == {
            "active": False,
            "reason": "pure Python: LEAKGUARD_PURE_PYTHON is set",
        }

    def test_low_fd_limit_is_a_warning(self) -> None:
        import resource

        def low() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        r = subprocess.run(
            [sys.executable, "-m", "leakguard", "doctor"], capture_output=True, text=True, timeout=90, preexec_fn=low
        )
        assert r.returncode == 0, r.stderr
        assert "[WARN] RLIMIT_NOFILE = soft 1024" in r.stdout
        assert "Too many open files" in r.stdout
