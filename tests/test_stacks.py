"""Stack capture: the compiled stack walk captures exactly what the pure-Python one does."""

from __future__ import annotations

import pytest

from leakguard import registry


class TestCompiledCapture:
    """The compiled stack walk captures exactly what the pure-Python one does."""

    def test_same_frames(self) -> None:
        from leakguard import stacks

        if registry._speedups is None:
            pytest.skip("the compiled hot path is not built here (pure-Python install)")

        def inner(skip: int) -> tuple[object, ...]:
            return (registry._speedups.capture(skip, 48), stacks.capture_py(skip, 48))

        def outer() -> tuple[object, ...]:
            return inner(1)

        compiled, python = outer()
        assert compiled == python and len(compiled) > 0
        assert stacks.frames(compiled)[-1].function == "outer"
