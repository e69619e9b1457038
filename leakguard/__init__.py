"""leakguard: find connection leaks in a running process and name the line responsible.

    import leakguard
    leakguard.install()
    ...
    print(leakguard.snapshot())          # every socket, its TCP state, who opened it
"""

from __future__ import annotations


def _source_checkout() -> None:
    """Make ``leakguard.integrations`` importable from a source checkout.

    The integrations live in ``integrations/`` beside this package and ship inside the
    wheel as ``leakguard.integrations``; an editable install maps them.  Running from the
    repository root without one (``python -m leakguard demo`` right after ``pip install .``,
    where the working directory shadows the installed copy) needs this one mapping.
    """
    import importlib
    import os
    import sys

    try:  # the usual case (installed, or mapped by an editable install): one search, not find_spec's and import's
        importlib.import_module("leakguard.integrations")
        return
    except ModuleNotFoundError as exc:
        if exc.name != "leakguard.integrations":
            raise
    import importlib.util

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integrations")
    spec = importlib.util.spec_from_file_location(
        "leakguard.integrations", os.path.join(here, "__init__.py"), submodule_search_locations=[here]
    )
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["leakguard.integrations"] = module
    spec.loader.exec_module(module)


_source_checkout()

from ._state import get_config, install, installed, uninstall  # noqa: E402
from .checks import LeakError, no_leaks  # noqa: E402
from .snapshot import Snapshot, SocketInfo, take as _take  # noqa: E402

__all__ = [
    "LeakError",
    "Snapshot",
    "SocketInfo",
    "__version__",
    "get_config",
    "install",
    "installed",
    "no_leaks",
    "snapshot",
    "uninstall",
]

__version__ = "0.1.0"


def snapshot() -> Snapshot:
    """Read the kernel's view of this process's sockets now and join it with what was recorded.

    Safe to call without :func:`install` (then nothing has a creation stack).
    """
    return _take()
