"""The benchmark table and its floor verdicts (benchmarks/run.py), on rows shaped as the benchmarks return them."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
run = pytest.importorskip("benchmarks.run")


def rows(connect_pair: float = 1.02, connect_instr: float = 1.025, to_dict_ratio: float = 0.08) -> list[dict[str, object]]:
    return [
        {"name": "socket create+close", "baseline_us": 6.7, "leakguard_us": 6.9, "added_us": 0.2, "ratio": 1.03,
         "pair_ratio": 1.04},
        {"name": "loopback connect+close", "baseline_us": 35.0, "leakguard_us": 38.0, "added_us": 3.0,
         "ratio": 1.086, "pair_ratio": connect_pair},
        {"name": "loopback connect+close: plain vs plain (noise of the method)", "baseline_us": 35.0,
         "leakguard_us": 37.0, "added_us": 2.0, "ratio": 1.057, "pair_ratio": 1.002},
        {"name": "loopback connect+close (instructions)", "baseline_instructions": 45_400,
         "leakguard_instructions": round(45_400 * connect_instr), "ratio": connect_instr},
        {"name": "snapshot() 1000 own sockets", "baseline_us": 40_000.0, "leakguard_us": 3_000.0, "ratio": 0.075,
         "sockets": 1000},
        {"name": "snapshot() 1000 own + 20000 foreign sockets", "baseline_us": 90_000.0, "leakguard_us": 3_100.0,
         "ratio": 0.034, "sockets": 1000, "flat": 1.03},
        {"name": "memory per live tracked socket", "value": 337, "unit": "bytes", "floor": 1024},
        {"name": "RSS growth after 1,000,000 create/close cycles", "value": 0.0, "unit": "MiB", "floor": 2},
        {"name": "pytest 2000 trivial tests: --leakguard vs without the plugin", "baseline_us": 530.0,
         "leakguard_us": 545.0, "ratio": 1.028, "pair_ratio": 1.03, "tests": 2000},
        {"name": "watcher CPU share at report_interval=1, 1001 tracked sockets", "value": 0.4, "unit": "%"},
        *rendered(to_dict_ratio),
        *path_rows(),
    ]  # fmt: skip


def path_rows(create: int = 700, accept: int = 900, cycle: float = 1.025) -> list[dict[str, object]]:
    """bench_core's per-creation-path instruction rows."""
    return [
        {"name": "socket create+close (instructions)", "baseline_instructions": 5_900, "leakguard_instructions": 5_900 + create,
         "added_instructions": create, "added_per_socket": create, "ratio": 1.12, "path": "create", "sockets_per_op": 1},
        {"name": "accept() + close (instructions)", "baseline_instructions": 36_700, "leakguard_instructions": 36_700 + accept,
         "added_instructions": accept, "added_per_socket": accept, "ratio": 1.02, "path": "accept", "sockets_per_op": 1},
        {"name": "in-process connect + accept + close cycle (instructions)", "baseline_instructions": 69_600,
         "leakguard_instructions": round(69_600 * cycle), "added_instructions": round(69_600 * (cycle - 1)),
         "added_per_socket": round(69_600 * (cycle - 1) / 2), "ratio": cycle, "path": "cycle", "sockets_per_op": 2},
    ]  # fmt: skip


def rendered(to_dict_ratio: float = 0.08) -> list[dict[str, object]]:
    """bench_render's rows at 1,000 sockets: timed and instruction rows, one site and 500 sites."""
    out: list[dict[str, object]] = []
    for render, ratio in (("to_dict", to_dict_ratio), ("str", 0.05), ("snapshot", 0.06)):
        for sites in (1, 500):
            common = {"render": render, "own_sockets": 1000, "sites": sites, "baseline": "psutil net_connections('tcp')"}
            out.append({"name": f"{render}, 1,000 own sockets, {sites} sites", "baseline_us": 40_000.0,
                        "leakguard_us": 40_000.0 * ratio * sites, "ratio": ratio * sites, **common})
            out.append({"name": f"{render}, 1,000 own sockets, {sites} sites (instructions)",
                        "baseline_instructions": 20_000_000, "leakguard_instructions": 3_000_000, "ratio": 0.15,
                        **common})
    return out  # fmt: skip


def test_every_floor_is_judged() -> None:
    lines = run.floors(rows())
    assert len(lines) == 13
    assert all("**ok**" in line for line in lines), lines


def connect_line(rs: list[dict[str, object]]) -> str:
    return next(ln for ln in run.floors(rs) if "connect+close" in ln)


def test_ratio_floors_are_judged_on_instructions_where_measured() -> None:
    line = connect_line(rows(connect_pair=1.035))  # a noisy timed figure: the count decides
    assert "**ok**" in line and "1.035× (paired)" in line and "1.025× instructions" in line and "plain vs plain" in line
    assert "**OVER**" in connect_line(rows(connect_instr=1.031))


def test_ratio_floors_fall_back_to_paired_rounds() -> None:
    without = [r for r in rows(connect_pair=1.035) if "instructions" not in str(r["name"])]
    assert "**OVER**" in connect_line(without)
    assert "**ok**" in connect_line([r for r in rows() if "instructions" not in str(r["name"])])


def test_pytest_floor_uses_its_instruction_row() -> None:
    rs = rows() + [
        {"name": "pytest 2000 trivial tests: --leakguard vs without the plugin (instructions)",
         "baseline_instructions": 5_852_621_383, "leakguard_instructions": 5_972_933_462, "ratio": 1.0206},
    ]  # fmt: skip
    rs[8]["pair_ratio"] = 1.06  # type: ignore[index]
    line = next(ln for ln in run.floors(rs) if "pytest" in ln)
    assert "**ok**" in line and "1.021× instructions" in line and "1.060× CPU (paired)" in line


def test_missing_rows_are_not_measured() -> None:
    lines = run.floors([{"name": "socket create+close", "error": "boom"}])
    assert len(lines) == 13 and all("not measured" in line for line in lines)


def test_table_has_instruction_rows() -> None:
    md = run.table(rows())
    assert "| loopback connect+close (instructions) | 45,400 | 46,535 | +1,135 | 1.025× |" in md


def test_rendering_floors_use_the_one_site_timed_row() -> None:
    """to_dict() and str() of 1,000 sockets from one site: judged on time (psutil's cost is mostly the
    kernel's), with the instruction counts beside; the 500-site rows do not stand in for them."""
    line = next(ln for ln in run.floors(rows()) if ln.startswith("- snapshot().to_dict()"))
    assert "**ok**" in line and "0.080× (3.20 ms vs 40.0 ms)" in line and "3,000,000 instructions" in line
    assert "**OVER**" in next(ln for ln in run.floors(rows(to_dict_ratio=0.11)) if ln.startswith("- snapshot().to_dict()"))
    one_site_gone = [r for r in rows() if not (r.get("render") == "to_dict" and r.get("sites") == 1)]
    assert "not measured" in next(ln for ln in run.floors(one_site_gone) if ln.startswith("- snapshot().to_dict()"))

def test_creation_path_floors() -> None:
    def verdict(label: str, rs: list[dict[str, object]]) -> str:
        return next(ln for ln in run.floors(rs) if label in ln)

    line = verdict("every creation path", path_rows())
    assert "**ok**" in line and "create +700" in line and "accept +900" in line
    assert "**OVER**" in verdict("every creation path", path_rows(accept=1_001))
    assert "**OVER**" in verdict("create+close ≤ +800", path_rows(create=801))
    assert "**ok**" in verdict("create+close ≤ +800", path_rows(create=800))
    assert "**OVER**" in verdict("cycle ≤ 1.03×", path_rows(cycle=1.031))


def test_table_takes_ratios_of_other_units() -> None:
    """bench_diagnose's rows carry a ratio of milliseconds or objects, no µs: the table shows them (the full run
    crashed there with KeyError: 'leakguard_us', after every benchmark had run)."""
    md = run.table([{"name": "diagnosis, 1M objects", "ms": 4.9, "psutil_ms": 12.5, "ratio": 0.39, "module": "bench_diagnose"}])
    assert "| diagnosis, 1M objects | | ms 4.900, psutil_ms 12.500 | | 0.390× |" in md
