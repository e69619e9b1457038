"""leakguard: find connection leaks in a running process and name the line responsible.

    import leakguard
    leakguard.install()
    ...
    print(leakguard.snapshot())          # every socket, its TCP state, who opened it
"""

from __future__ import annotations

from ._state import get_config, install, installed, uninstall
from .snapshot import Snapshot, SocketInfo, take as _take

__all__ = [
    "Snapshot",
    "SocketInfo",
    "__version__",
    "get_config",
    "install",
    "installed",
    "snapshot",
    "uninstall",
]

__version__ = "0.1.0"


def snapshot() -> Snapshot:
    """Read the kernel's view of this process's sockets now and join it with what was recorded.

    Safe to call without :func:`install` (then nothing has a creation stack).
    """
    return _take()
