"""Loaded by ``leakguard run``: install leakguard before the program's first line.

Configuration comes from ``LEAKGUARD_*`` variables.  Any ``sitecustomize`` the
environment already had is run afterwards, as if leakguard were not here.
"""

import importlib.util
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))

try:
    import leakguard

    leakguard.install()
except Exception as exc:  # a bad LEAKGUARD_* value: say so clearly, run nothing
    sys.stderr.write(f"leakguard: {exc}\n")
    sys.stderr.flush()
    os._exit(2)

# Chain to the sitecustomize we shadow, if any.
_saved = sys.path[:]
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
