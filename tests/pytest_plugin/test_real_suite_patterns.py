"""The plugin on patterns met in real third-party suites (docs/REAL_SUITES.md): no false failure."""

from __future__ import annotations

import pytest


_LOOP_SUITE = '''
import asyncio

import pytest


@pytest.fixture(scope="session")
def event_loop_policy():
    return asyncio.get_event_loop_policy()


@pytest.fixture
def event_loop(event_loop_policy):
    loop = event_loop_policy.new_event_loop()
    yield loop
    loop.close()
    # what pytest-asyncio 0.23 does after each test: a fresh loop, set on the policy, never closed
    event_loop_policy.set_event_loop(event_loop_policy.new_event_loop())


def test_one(event_loop):
    assert event_loop.run_until_complete(asyncio.sleep(0, 1)) == 1


def test_two(event_loop):
    assert event_loop.run_until_complete(asyncio.sleep(0, 2)) == 2
'''


class TestPluginOnRealSuitePatterns:
    """Patterns met in real suites (docs/REAL_SUITES.md) cause no false failure under ``--leakguard``."""

    def test_event_loop_kept_by_session_fixture(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_loop=_LOOP_SUITE)
        result = pytester.runpytest_subprocess("--leakguard", "-p", "no:cacheprovider")
        result.assert_outcomes(passed=2, errors=0)
