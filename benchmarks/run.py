"""Run every benchmark in one process run and print one table of ratios (plus a PNG plot).

    python -m benchmarks            # full run (under 5 minutes on 2 cores)
    python -m benchmarks --quick    # smaller counts, for a smoke test
    python benchmarks/run.py        # the same

Each module's ``run(quick)`` returns rows measured side by side in this run:
``{"name", "baseline_us", "leakguard_us", "ratio", ...}`` or ``{"name", "value", "unit", ...}``.
Results go to ``benchmarks/results/latest.json`` and ``latest.md``; the plot to ``latest.png``
when matplotlib (the ``bench`` extra) is installed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from typing import Any

if __package__ in (None, ""):  # python benchmarks/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODULES = ["bench_core", "bench_requests", "bench_db", "bench_watcher", "bench_pytest"]
HERE = os.path.dirname(os.path.abspath(__file__))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| benchmark | baseline | with leakguard | added | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | error: {r['error']} | | | |")
        elif "ratio" in r:
            base = r.get("baseline", "plain")
            extra = f" (vs {base})" if base != "plain" else ""
            added = r.get("added_us", r["leakguard_us"] - r["baseline_us"])
            line = (
                f"| {r['name']}{extra} | {_fmt(r['baseline_us'])} µs | {_fmt(r['leakguard_us'])} µs "
                f"| {_fmt(added)} µs | {r['ratio']:.3f}× |"
            )
            if "pair_ratio" in r:
                line += f" median of paired rounds: {r['pair_ratio']:.3f}×"
            if "proc_net_tcp_us" in r:
                line += f" /proc/net/tcp: {_fmt(r['proc_net_tcp_us'])} µs"
            if "flat" in r:
                line += f" vs without foreign sockets: {r['flat']:.2f}×"
            out.append(line)
        else:
            floor = f" (floor {r['floor']} {r['unit']})" if "floor" in r else ""
            out.append(f"| {r['name']} | | {_fmt(r['value'])} {r['unit']}{floor} | | |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    snap = [r for r in rows if r.get("sockets") and "foreign" not in r["name"] and "ratio" in r]
    ops = [r for r in rows if "ratio" in r and not r.get("sockets")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    if snap:
        xs = [r["sockets"] for r in snap]
        a.loglog(xs, [r["leakguard_us"] / 1000 for r in snap], "o-", label="leakguard.snapshot()")
        a.loglog(xs, [r["baseline_us"] / 1000 for r in snap], "s-", label="psutil net_connections('tcp')")
        if all("proc_net_tcp_us" in r for r in snap):
            a.loglog(xs, [r["proc_net_tcp_us"] / 1000 for r in snap], "^-", label="/proc/net/tcp join")
        a.set_xlabel("own sockets")
        a.set_ylabel("ms per snapshot")
        a.set_title("Reading the process's sockets")
        a.legend()
        a.grid(True, which="both", alpha=0.3)
    if ops:
        names = [r["name"] for r in ops]
        pct = [(r["ratio"] - 1) * 100 for r in ops]
        b.barh(names, pct, color=["tab:red" if p > 5 else "tab:green" for p in pct])
        b.set_xlabel("% added by leakguard (side by side, best of rounds)")
        b.set_title("Per-operation overhead")
        b.axvline(0, color="black", lw=0.8)
        b.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller counts (smoke test)")
    p.add_argument("--only", action="append", help="run only these modules (e.g. bench_core)")
    args = p.parse_args(argv)
    started = time.time()
    rows: list[dict[str, Any]] = []
    for name in args.only or MODULES:
        t = time.time()
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
            got = mod.run(args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others
            traceback.print_exc()
            got = [{"name": name, "error": f"{type(exc).__name__}: {exc}"}]
        for r in got:
            r.setdefault("module", name)
        rows.extend(got)
        print(f"# {name}: {time.time() - t:.1f} s", file=sys.stderr, flush=True)
    md = table(rows)
    header = (
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs; {'quick' if args.quick else 'full'} run, {time.time() - started:.0f} s"
    )
    print(header)
    print()
    print(md)
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "latest.json"), "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "latest.md"), "w") as f:
        f.write(header + "\n\n" + md + "\n")
    if plot(rows, os.path.join(out, "latest.png")):
        print(f"\nplot: {os.path.join(out, 'latest.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
