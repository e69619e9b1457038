"""``python -m leakguard demo``: a real CLOSE_WAIT leak shown with its creation site."""

from __future__ import annotations

import subprocess
import sys


class TestDemo:
    """python -m leakguard demo shows a real CLOSE_WAIT leak with its creation site."""

    def test_demo(self) -> None:
        proc = subprocess.run(
            [sys.executable, "-W", "error", "-m", "leakguard", "demo"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert "CLOSE_WAIT (the peer closed it, your code never did)" in proc.stdout
        assert "demo.py:" in proc.stdout and "1 leaked" in proc.stdout
        assert proc.stderr == ""
