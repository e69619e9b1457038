"""leakguard is typed: mypy --strict passes on the package and its integrations (configuration in pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TestTyping:
    """The package type-checks under mypy --strict and ships py.typed."""

    def test_py_typed(self) -> None:
        import leakguard

        assert os.path.exists(os.path.join(os.path.dirname(leakguard.__file__), "py.typed"))

    def test_mypy_strict(self, tmp_path: Path) -> None:
        pytest.importorskip("mypy", reason="mypy is not installed (it is in the test extra)")
        # integrations/ ships as leakguard.integrations (setuptools' package-dir), a mapping mypy
        # cannot follow: check the package as it is installed, a tree of links to the sources.
        tree = tmp_path / "leakguard"
        tree.mkdir()
        for entry in os.listdir(os.path.join(ROOT, "leakguard")):
            if entry != "__pycache__":
                (tree / entry).symlink_to(os.path.join(ROOT, "leakguard", entry))
        (tree / "integrations").symlink_to(os.path.join(ROOT, "integrations"))
        proc = subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"), "--no-incremental"]
            + ["leakguard"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "leakguard/integrations" not in proc.stdout  # checked, and clean
        checked = int(proc.stdout.rsplit("in ", 1)[1].split()[0])  # "Success: no issues found in N source files"
        integrations = len([f for f in os.listdir(os.path.join(ROOT, "integrations")) if f.endswith(".py")])
        assert checked >= integrations + len([f for f in os.listdir(tree) if f.endswith(".py")])
