"""The integrations' one way to open a scope (integrations/_attribution.py): attributed, failure-contained."""

from __future__ import annotations

import contextvars
import socket

import pytest

from leakguard import registry
from leakguard.integrations._attribution import contained, scope


def _errors() -> int:
    return registry.stats()["hook_errors"]


@pytest.mark.usefixtures("installed")
class TestScope:
    """Sockets made inside ``with scope(...)`` carry its origin and target; the block's own
    exceptions pass through untouched, and a failure of ours is counted, never raised."""

    def test_sockets_inside_carry_origin_and_target(self) -> None:
        with scope("testlib", "testlib://127.0.0.1:1") as sc:
            assert sc is not None and registry.current_scope() is sc
            s = socket.socket()
        try:
            assert registry.current_scope() is None
            rec = registry.get(s.fileno())
            assert rec is not None and (rec.origin, rec.target) == ("testlib", "testlib://127.0.0.1:1")
            plain = socket.socket()  # outside the block: the socket hook's own attribution
            try:
                other = registry.get(plain.fileno())
                assert other is not None and other.origin == "socket"
            finally:
                plain.close()
        finally:
            s.close()

    def test_the_blocks_exception_passes_through_unchanged(self) -> None:
        raised = OSError(111, "refused")
        errors = _errors()
        with pytest.raises(OSError) as info:
            with scope("testlib"):
                raise raised
        assert info.value is raised and info.traceback[-1].name == "test_the_blocks_exception_passes_through_unchanged"
        assert registry.current_scope() is None and _errors() == errors

    def test_closing_in_another_context_is_contained(self) -> None:
        # A coroutine closed from another context: resetting the token fails (ValueError from contextvars).
        cm = scope("testlib")
        ctx = contextvars.copy_context()
        assert ctx.run(cm.__enter__) is not None
        errors = _errors()
        cm.__exit__(None, None, None)  # here, not in ctx: counted, not raised
        assert _errors() == errors + 1
        assert registry.current_scope() is None


class TestContained:
    """``with contained:`` swallows and counts an Exception of leakguard's bookkeeping, nothing else."""

    def test_exception_is_counted_not_raised(self) -> None:
        errors = _errors()
        after = []
        with contained:
            after.append(1)
            raise KeyError("ours")
        after.append(2)
        assert after == [1, 2] and _errors() == errors + 1

    def test_no_exception_counts_nothing(self) -> None:
        errors = _errors()
        with contained:
            pass
        assert _errors() == errors

    def test_base_exceptions_are_not_ours_to_swallow(self) -> None:
        errors = _errors()
        with pytest.raises(KeyboardInterrupt):
            with contained:
                raise KeyboardInterrupt
        assert _errors() == errors
