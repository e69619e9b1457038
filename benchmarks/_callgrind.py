"""Instructions per operation under ``valgrind --tool=callgrind``: immune to machine load.

Timed ratios on a shared 2-vCPU machine swing by several percent from run to
run; instruction counts of the same program, inputs and environment do not.
Each figure is ``(I(n_large) - I(n_small)) / (n_large - n_small)`` for a program
that runs *n* operations, so start-up, imports and ``install()`` cancel out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable

__all__ = ["available", "counts", "per_op", "sections"]


def available() -> bool:
    return shutil.which("valgrind") is not None


#: The C function whose calls :func:`sections` counts: a program calls
#: ``sys.call_tracing(fn, args)`` around exactly each part it measures.
INSIDE = "sys_call_tracing"


def _collected(
    argv: list[str], cwd: str | None = None, unset: tuple[str, ...] = (), inside: bool = False
) -> tuple[int, list[int]]:
    """The program's instruction count and, with *inside*, the count of each call of INSIDE."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError("valgrind is not installed")
    # Without these the counts move from run to run: address-space layout and
    # string hashing change dict probe lengths.
    setarch = shutil.which("setarch")
    norandom = [setarch, os.uname().machine, "-R"] if setarch else []
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PYTHONHASHSEED"] = "0"
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            [*norandom, valgrind, "--tool=callgrind", f"--callgrind-out-file={d}/cg.out",
             *([f"--toggle-collect={INSIDE}", f"--dump-after={INSIDE}"] if inside else []), *argv],
            capture_output=True, text=True, env=env, cwd=cwd,
        )  # fmt: skip
        parts = []
        for i in range(1, 1_000):  # one dump per call of INSIDE: cg.out.1, cg.out.2, ...
            path = f"{d}/cg.out.{i}"
            if not os.path.exists(path):
                break
            with open(path) as f:
                m = re.search(r"^totals:\s*(\d+)", f.read(), re.M)
            parts.append(int(m.group(1)) if m else 0)
    if out.returncode != 0:
        tail = [ln for ln in out.stderr.splitlines() if not ln.startswith("==")][-20:]
        raise RuntimeError(f"{' '.join(argv)} failed under valgrind:\n" + "\n".join(tail))
    if inside:
        return sum(parts), parts
    m = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
    if m is None:
        raise RuntimeError("callgrind printed no instruction count:\n" + out.stderr[-2000:])
    return int(m.group(1)), []


def per_op(argv: Callable[[int], list[str]], n_small: int, n_large: int) -> float:
    """Instructions per operation of the program ``argv(n)``, which runs *n* operations."""
    small, large = _collected(argv(n_small))[0], _collected(argv(n_large))[0]
    return (large - small) / (n_large - n_small)


def counts(argvs: list[list[str]], cwd: str | None = None, unset: tuple[str, ...] = ()) -> list[int]:
    """Instructions of each program, run side by side on the machine's cores (counts do not
    depend on load, so running them together only saves time)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(len(argvs), os.cpu_count() or 1))) as pool:
        return [c[0] for c in pool.map(lambda argv: _collected(argv, cwd, unset), argvs)]


def sections(argvs: list[list[str]], cwd: str | None = None) -> list[list[int]]:
    """For each program, the instructions of each of its calls of ``sys.call_tracing``
    (:data:`INSIDE`), in order: only what those calls run is counted, so one program
    measures several things and its start-up costs nothing.  Programs run side by side."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(len(argvs), os.cpu_count() or 1))) as pool:
        return [c[1] for c in pool.map(lambda argv: _collected(argv, cwd, inside=True), argvs)]
