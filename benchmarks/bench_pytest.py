"""What the pytest plugin costs a suite of 2,000 trivial tests.

Each configuration runs the same generated suite in a fresh ``python -m pytest``
process; runs are interleaved (baseline then leakguard, leakguard then baseline,
...) and the best of the rounds is kept, so a noisy machine hurts both sides
alike; the median ratio of the rounds' pairs is reported too.  The baseline
is pytest with the plugin blocked (``-p no:leakguard``): the suite's time
without leakguard at all.

Rows: ``{"name", "baseline_us", "leakguard_us", "ratio", "wall_ratio"}``: CPU time
(user + system) of the whole pytest process, start-up included, divided by the
number of tests.  CPU time rather than wall time because benchmark machines are
shared: another process's load stretches wall time, not our CPU time (the wall
ratio is kept too).  With ``quick=False`` the nearest existing tools are measured
on a smaller suite (they take minutes on 2,000 tests) when available:
pytest-openfiles' ``--open-files`` and ``-X tracemalloc=16 -W error::ResourceWarning``.

On a shared 2-core machine the timed ratios swing by +-15 % from run to run (one
full run gave a paired 1.18x that 14 rounds right after measured at 1.017x).
Instruction counts do not: :func:`instructions` (also in the full run) counts,
under ``valgrind --tool=callgrind``, suites of 1 and 201 tests side by side and
extrapolates to 2,000: 5.851 G instructions without the plugin and 5.971 G with
``--leakguard`` (1.020x), of which 44 M are start-up (importing leakguard and
``install()``) and 38 k per test (the setup and teardown hooks; the report wrapper
is registered with the first verdict).  It was 1.036x (80 k per test) before a test
that opens no socket was judged in a few operations, and 1.026x (60 k per test,
55 M start-up) before the per-report wrapper and the import-time costs went.
One effect is not in the count: leakguard's ~950 objects shift when CPython's
automatic full collection triggers (one more of them in this suite), which costs
CPU time on the order of 1-2 %.

    python benchmarks/bench_pytest.py [--quick]
    python benchmarks/bench_pytest.py --instructions
"""

from __future__ import annotations

import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python benchmarks/bench_pytest.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N_TESTS = 2000
PER_FILE = 100

# Plugins of the development environment that have nothing to do with the measurement
# (hypothesis' alone takes seconds to import); blocked in every configuration alike.
_QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:randomly", "-p", "no:xdist")


def make_suite(root: Path, n: int = N_TESTS, per_file: int = PER_FILE) -> None:
    """*n* trivial tests in files of *per_file*, plus an empty ini so no outer config applies."""
    (root / "pytest.ini").write_text("[pytest]\n")
    for f in range(0, n, per_file):
        body = "".join(f"def test_{f + i}():\n    assert {f + i} + 1 > {f + i}\n\n" for i in range(min(per_file, n - f)))
        (root / f"test_gen_{f // per_file:03d}.py").write_text(body)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _unset() -> tuple[str, ...]:
    """What no measured run inherits: leakguard and pytest settings from outside, and a switch
    that turns bytecode caching off (on, as on a developer's machine)."""
    return tuple(k for k in os.environ if k.startswith(("LEAKGUARD_", "PYTEST_")) or k == "PYTHONDONTWRITEBYTECODE")


def _time(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of *cmd*."""
    unset = _unset()
    env = {k: v for k, v in os.environ.items() if k not in unset}
    cpu, start = _cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall, cpu = time.perf_counter() - start, _cpu() - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return cpu, wall


def _pytest(*args: str, python: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, *python, "-m", "pytest", "-q", *_QUIET, *args]


def _compare(
    root: Path, name: str, baseline: list[str], candidate: list[str], rounds: int, n: int, warm: bool = True
) -> dict[str, Any]:
    """Best CPU (and wall) time of *rounds* runs of each, alternating which goes first, and the
    median ratio of the rounds' pairs (a baseline and a candidate run back to back).  *warm*:
    run each once first (bytecode and page caches), unless an earlier comparison on the same
    suite already did."""
    base, cand = [], []
    if warm:
        _time(baseline, root)
        _time(candidate, root)
    for r in range(rounds):
        if r % 2 == 0:
            base.append(_time(baseline, root))
            cand.append(_time(candidate, root))
        else:
            cand.append(_time(candidate, root))
            base.append(_time(baseline, root))
    b, c = min(t[0] for t in base), min(t[0] for t in cand)
    bw, cw = min(t[1] for t in base), min(t[1] for t in cand)
    return {
        "name": name,
        "baseline_us": round(b / n * 1e6, 1),
        "leakguard_us": round(c / n * 1e6, 1),
        "ratio": round(c / b, 3),
        "pair_ratio": round(statistics.median(ct[0] / bt[0] for bt, ct in zip(base, cand)), 4),
        "wall_ratio": round(cw / bw, 3),
        "tests": n,
        "rounds": rounds,
    }


def run(quick: bool) -> list[dict[str, Any]]:
    rounds = 3 if quick else 11
    n = 500 if quick else N_TESTS
    rows = []
    with tempfile.TemporaryDirectory(prefix="leakguard-bench-pytest-") as tmp:
        root = Path(tmp) / "suite"
        root.mkdir()
        make_suite(root, n)
        without = _pytest("-p", "no:leakguard")
        rows.append(
            _compare(root, f"pytest {n} trivial tests: --leakguard vs without the plugin", without,
                     _pytest("--leakguard"), rounds, n)
        )
        rows.append(
            _compare(root, f"pytest {n} trivial tests: plugin installed but off vs without it", without,
                     _pytest(), 1, n, warm=False)
        )
        if not quick:
            small = Path(tmp) / "small"
            small.mkdir()
            k = 100  # tracemalloc takes about 150 ms per trivial test, pytest-openfiles about 40 ms
            make_suite(small, k)
            if importlib.util.find_spec("pytest_openfiles") is not None:
                rows.append(
                    _compare(small, f"pytest {k} trivial tests: pytest-openfiles --open-files (for comparison)",
                             without, _pytest("-p", "no:leakguard", "--open-files"), 1, k)
                )
            else:
                print("bench_pytest: pytest-openfiles is not installed; its row is skipped", file=sys.stderr)
            rows.append(
                _compare(
                    small,
                    f"pytest {k} trivial tests: -X tracemalloc=16 -W error::ResourceWarning (for comparison)",
                    without,
                    _pytest("-p", "no:leakguard", "-W", "error::ResourceWarning", python=("-X", "tracemalloc=16")),
                    1,
                    k,
                    warm=False,  # 15 s a run; the suite is warm from the row above
                )
            )
            rows.append(
                _compare(small, f"pytest {k} trivial tests: --leakguard (same suite as the rows above)",
                         without, _pytest("--leakguard"), 1, k, warm=False)
            )
    if not quick:
        rows.append(instructions(n))
    return rows


def instructions(n: int = N_TESTS, small: int = 1, large: int = 201) -> dict[str, Any]:
    """Instructions of a run of *n* trivial tests, without the plugin vs ``--leakguard``: from
    runs of *small* and *large* tests under callgrind (start-up, and cost per test), so no
    run of *n* tests is needed under valgrind.  Deterministic; about two minutes on 2 cores."""
    from benchmarks import _callgrind

    if not _callgrind.available():
        return {"name": "pytest instructions", "error": "valgrind is not installed"}
    configs = {"without": ("-p", "no:leakguard"), "leakguard": ("--leakguard",)}
    with tempfile.TemporaryDirectory(prefix="leakguard-bench-pytest-") as tmp:
        roots = {}
        for k in (small, large):
            roots[k] = Path(tmp) / f"suite{k}"
            roots[k].mkdir()
            make_suite(roots[k], k)
        jobs = [(name, k) for name in configs for k in (small, large)]
        for name, k in jobs:  # warm: bytecode caches of the suite and of leakguard
            _time(_pytest(*configs[name], str(roots[k])), Path(tmp))
        counted = _callgrind.counts(
            [_pytest(*configs[name], str(roots[k])) for name, k in jobs],
            cwd=tmp,
            unset=_unset(),  # as in the timed runs
        )
    total = {}
    for name in configs:
        i_small, i_large = (counted[jobs.index((name, k))] for k in (small, large))
        per_test = (i_large - i_small) / (large - small)
        total[name] = (i_small + (n - small) * per_test, per_test, i_small)
    return {
        "name": f"pytest {n} trivial tests: --leakguard vs without the plugin (instructions)",
        "baseline_instructions": round(total["without"][0]),
        "leakguard_instructions": round(total["leakguard"][0]),
        "ratio": round(total["leakguard"][0] / total["without"][0], 4),
        "per_test_added": round(total["leakguard"][1] - total["without"][1]),
        "startup_added": round(total["leakguard"][2] - total["without"][2]),
    }


def main() -> None:
    if "--instructions" in sys.argv[1:]:
        print(instructions())
        return
    quick = "--quick" in sys.argv[1:]
    for row in run(quick):
        print(
            f"{row['name']}: {row['baseline_us']} -> {row['leakguard_us']} us CPU per test "
            f"({row['ratio']}x CPU, {row['wall_ratio']}x wall)"
        )


if __name__ == "__main__":
    main()
