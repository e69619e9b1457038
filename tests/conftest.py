from __future__ import annotations

from collections.abc import Iterator

import pytest

import leakguard

from .helpers import HangUpServer


@pytest.fixture
def installed() -> Iterator[None]:
    """leakguard installed for the duration of one test, uninstalled after."""
    leakguard.install()
    try:
        yield
    finally:
        leakguard.uninstall()


@pytest.fixture
def hangup_server() -> Iterator[HangUpServer]:
    with HangUpServer() as srv:
        yield srv
