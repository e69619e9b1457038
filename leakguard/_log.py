"""leakguard's own logger, ``logging.getLogger("leakguard")``, with :mod:`logging` imported on first use.

leakguard logs only on debug and error paths; importing :mod:`logging` (and the
traceback, string and weakref machinery it brings) would otherwise cost a program
that never logs more than the rest of ``import leakguard``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import logging

__all__ = ["log"]


class _LazyLogger:
    __slots__ = ()

    def __getattr__(self, name: str) -> Any:  # debug, warning, ...: only on paths that log
        import logging

        return getattr(logging.getLogger("leakguard"), name)

    def __repr__(self) -> str:
        return "<lazy logger 'leakguard'>"


log = cast("logging.Logger", _LazyLogger())
