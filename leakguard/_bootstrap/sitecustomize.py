"""Loaded by ``leakguard run``: install leakguard before the program's first line.

``leakguard run`` puts this directory first on ``PYTHONPATH``, so every Python
process the command starts (and their Python children) imports it at startup.
Configuration comes from ``LEAKGUARD_*`` variables.  Any ``sitecustomize`` the
environment already had is run afterwards, as if leakguard were not here.

* A bad ``LEAKGUARD_*`` value stops the program with exit code 2 and a message
  naming the variable (``leakguard run`` validates them first, so this only
  happens when the program changed them for a child).
* An interpreter that cannot import leakguard (another Python without it) runs
  the program unchanged after one line on stderr: the host comes first.
"""

import importlib.util
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))


def _install() -> None:
    try:
        import leakguard
    except Exception as exc:  # another interpreter, or a broken install: run the program anyway
        sys.stderr.write(f"leakguard: not active in this interpreter ({sys.executable}): {exc}\n")
        sys.stderr.flush()
        return
    try:
        leakguard.install()
    except ValueError as exc:  # a bad LEAKGUARD_* value: say so clearly, run nothing
        sys.stderr.write(f"leakguard: {exc}\n")
        sys.stderr.flush()
        os._exit(2)
    except Exception as exc:  # never break the program for leakguard's sake
        sys.stderr.write(f"leakguard: not active, install() failed: {exc!r}\n")
        sys.stderr.flush()


_install()

# Chain to the sitecustomize we shadow, if any.
# The import system reads sys.modules["sitecustomize"] once this module finishes:
# it must be there (this module, or the one we ran in its place).
_saved = sys.path[:]
_self = sys.modules.get("sitecustomize")
try:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.modules.pop("sitecustomize", None)
    _spec = importlib.util.find_spec("sitecustomize")
    if _spec is not None and _spec.loader is not None:
        _mod = importlib.util.module_from_spec(_spec)
        sys.modules["sitecustomize"] = _mod
        _spec.loader.exec_module(_mod)
finally:
    sys.path[:] = _saved
    if "sitecustomize" not in sys.modules and _self is not None:
        sys.modules["sitecustomize"] = _self
