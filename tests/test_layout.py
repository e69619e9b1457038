"""tests/README.md stays true: every module of the package has its tests named there, and every test file
is listed (by module, or as a cross-cutting file), so a module's tests are found next to its name."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "tests" / "README.md").read_text()


def _modules() -> set[str]:
    found = [*ROOT.glob("leakguard/*.py"), *ROOT.glob("leakguard/*.c"), *ROOT.glob("leakguard/*/*.py"),
             *ROOT.glob("integrations/*.py")]
    return {p.relative_to(ROOT).as_posix() for p in found}


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _named() -> set[str]:
    """The files the README's tables name (a cell may add ``(TestClass)`` after a file)."""
    rows = "\n".join(line for line in README.splitlines() if line.startswith("| "))
    return set(re.findall(r"`(tests/[^`]+\.py)`", rows))


def test_every_module_has_a_row() -> None:
    rows = re.findall(r"^\| `([^`]+)` \|", _section("By module"), re.M)
    assert sorted(rows) == sorted(set(rows)), "a module is listed twice"
    assert set(rows) == _modules()


def test_every_named_test_file_exists() -> None:
    named = _named()
    assert named, "tests/README.md names no test file"
    assert sorted(n for n in named if not (ROOT / n).is_file()) == []


def test_every_test_file_is_named() -> None:
    named = _named()
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")}
    assert sorted(files - named) == []
