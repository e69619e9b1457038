"""Integration version gates: PEP 440 requirements read through packaging."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest

from leakguard._state import version_ok
from leakguard.integrations import INTEGRATIONS


def test_installed_versions_inside_and_outside() -> None:
    have = importlib.metadata.version("redis")
    assert version_ok(f"redis == {have}") and version_ok(f"redis >= {have}, < 999")
    assert not version_ok(f"redis > {have}") and not version_ok("redis >= 999")
    assert not version_ok("no-such-distribution-here >= 1")


def test_psycopg2_binary_gate_reads_the_module() -> None:
    """psycopg2 is installed as psycopg2-binary: the gate falls back to psycopg2.__version__."""
    import psycopg2

    version = psycopg2.__version__.split()[0]
    assert version_ok(f"psycopg2 == {version}") and not version_ok(f"psycopg2 != {version}")


@pytest.mark.parametrize("gate", ["redis >=> 1", "redis >= 1 <", ""])
def test_a_bad_gate_is_a_value_error(gate: str) -> None:
    with pytest.raises(ValueError, match="bad version gate"):
        version_ok(gate)


@pytest.mark.parametrize("name", sorted(INTEGRATIONS))
def test_every_gate_parses(name: str) -> None:
    requires = getattr(importlib.import_module(f"leakguard.integrations.{name}"), "REQUIRES", None)
    if requires is not None:
        version_ok(requires)  # raises ValueError if not a PEP 440 requirement
