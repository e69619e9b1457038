"""leakguard is typed: mypy --strict passes on the package (configuration in pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TestTyping:
    """The package type-checks under mypy --strict and ships py.typed."""

    def test_py_typed(self) -> None:
        import leakguard

        assert os.path.exists(os.path.join(os.path.dirname(leakguard.__file__), "py.typed"))

    def test_mypy_strict(self, tmp_path: object) -> None:
        pytest.importorskip("mypy", reason="mypy is not installed (it is in the test extra)")
        proc = subprocess.run(
            [sys.executable, "-m", "mypy", "--no-incremental", "leakguard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
