"""``no_leaks()``: the test-framework-neutral check (goleak's ``VerifyNone``), and ``LeakError``.

    with leakguard.no_leaks():
        fetch_orders()

    @leakguard.no_leaks(grace=1.0, ignore=["*/vendor/*"])
    async def test_fetch() -> None: ...

On exit, every socket opened inside the block and still open after the grace
period is a leak; the sockets the process held before the block are not its
leaks.  Open sockets get their grace with short exponential back-off (under
``async`` the event loop keeps running meanwhile, so transports can finish
closing).  The judging itself is :mod:`leakguard.judge`'s, as for the pytest
plugin.  When leakguard is not installed, the block installs it for its
duration (so the leaks carry creation sites) and uninstalls it after.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

from . import _state, judge, kernel, registry, snapshot, stacks

__all__ = ["LeakError", "no_leaks"]

F = TypeVar("F", bound=Callable[..., Any])


class LeakError(AssertionError):
    """Sockets opened inside a :func:`no_leaks` block were still open at its end.

    ``leaks`` is the list of :class:`~leakguard.SocketInfo`, each with its
    creation site, state, peer and diagnosis (``verdict``, ``held_by``, ``in_use``).
    """

    def __init__(self, leaks: list[snapshot.SocketInfo]) -> None:
        self.leaks = leaks
        super().__init__(format_leaks(leaks))


def format_leaks(leaks: list[snapshot.SocketInfo]) -> str:
    """The message of a :class:`LeakError`: one line per leak, naming its creation site as ``file.py:LINE``."""
    lines = [f"{len(leaks)} socket{'' if len(leaks) == 1 else 's'} opened in this block {'is' if len(leaks) == 1 else 'are'} still open:"]
    for info in leaks:
        site = info.site_str if info.stack else "<creation site unknown>"
        bits = [info.type, info.state or "no state"]
        if info.remote:
            bits.append(f"peer {info.remote}")
        bits.append(f"origin {info.origin}")
        line = f"  {site}: {' '.join(bits)}; verdict {info.verdict}"
        if info.held_by:
            line += f", held by {info.held_by[0]}"
        if info.in_use:
            line += f", in use at {stacks.relpath(info.in_use['file'])}:{info.in_use['line']} in {info.in_use['function']}()"
        lines.append(line)
        if info.verdict_reason:
            lines.append(f"      {info.verdict_reason}")
    return "\n".join(lines)


_install_lock = threading.Lock()
_installed_by_us = [0]  # blocks running that installed leakguard themselves


class _Block:
    """One run of a no_leaks block: what existed before, and the installation it made."""

    __slots__ = ("before", "frame", "installed", "mark")

    def __init__(self, frame: Any) -> None:
        self.frame = frame  # the frame that entered the block: done with it at the check
        with _install_lock:
            self.installed = False
            if not _state.installed() or _installed_by_us[0]:
                if not _state.installed():
                    _state.install()
                _installed_by_us[0] += 1
                self.installed = True
        self.mark = registry.mark()
        self.before = kernel.socket_inodes()

    def release(self) -> None:
        if self.installed:
            with _install_lock:
                _installed_by_us[0] -= 1
                if _installed_by_us[0] == 0:
                    _state.uninstall()

    def candidates(self) -> list[Any]:
        """What was opened inside the block and is open now: records, and (fd, link) of sockets without one."""
        recs = registry.live_between(self.mark)
        recorded = {r.fd for r in recs}
        before = self.before
        untracked = [
            (fd, f"socket:[{ino}]")
            for fd, ino in kernel.socket_inodes().items()
            if before.get(fd) != ino and fd not in recorded
        ]
        return [*recs, *untracked]


def _alive(c: Any) -> bool:
    if isinstance(c, registry.Record):
        return c.alive()
    fd, link = c
    try:
        return bool(os.readlink(f"/proc/self/fd/{fd}") == link)
    except OSError:
        return False


class no_leaks:
    """Context manager and decorator (sync and async): raise :class:`LeakError` for sockets opened inside and
    still open at the end.

    *grace*: seconds a socket that is still closing gets (retried with short
    exponential back-off) before it counts.  *ignore*: ``fnmatch`` globs matched
    against each leak's creation site (``path/file.py:LINE``), its frames'
    files, and its origin (``"redis"``).  Sockets that existed before the block
    are never its leaks.  When the block raises, its exception goes on and no
    check is made.
    """

    def __init__(self, *, grace: float = 0.5, ignore: Iterable[str] = ()) -> None:
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
            raise ValueError(f"grace: expected a number of seconds >= 0, got {grace!r}")
        if isinstance(ignore, str):
            raise ValueError(f"ignore: expected a list of glob patterns, got the string {ignore!r}")
        try:
            globs = tuple(ignore)
        except TypeError:
            raise ValueError(f"ignore: expected a list of glob patterns, got {ignore!r}") from None
        bad = [g for g in globs if not isinstance(g, str)]
        if bad:
            raise ValueError(f"ignore: expected glob patterns (str), got {bad[0]!r}")
        self.grace = float(grace)
        self.ignore = globs
        self._blocks: list[_Block] = []  # a stack: the same object may be entered again while in use
        self._lock = threading.Lock()

    # -- context manager -------------------------------------------------------------------------------------

    def __enter__(self) -> no_leaks:
        return self._enter(sys._getframe(1))

    def _enter(self, frame: Any) -> no_leaks:
        block = _Block(frame)
        with self._lock:
            self._blocks.append(block)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        block = self._pop()
        try:
            if et is None:
                self._check(block, self._settle(block))
        finally:
            block.release()

    async def __aenter__(self) -> no_leaks:
        return self._enter(sys._getframe(1))

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        block = self._pop()
        try:
            if et is None:
                self._check(block, await self._settle_async(block))
        finally:
            block.release()

    def _pop(self) -> _Block:
        with self._lock:
            return self._blocks.pop()

    # -- decorator -------------------------------------------------------------------------------------------

    def __call__(self, fn: F) -> F:
        grace, ignore = self.grace, self.ignore
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                async with no_leaks(grace=grace, ignore=ignore):
                    return await fn(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with no_leaks(grace=grace, ignore=ignore):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    # -- judging ---------------------------------------------------------------------------------------------

    def _settle(self, block: _Block) -> list[Any]:
        left = [c for c in block.candidates() if _alive(c)]
        for delay in judge.backoff(self.grace):
            if not left:
                break
            time.sleep(delay)
            left = [c for c in left if _alive(c)]
        return left

    async def _settle_async(self, block: _Block) -> list[Any]:
        left = [c for c in block.candidates() if _alive(c)]
        for delay in judge.backoff(self.grace):
            if not left:
                break
            await asyncio.sleep(delay)
            left = [c for c in left if _alive(c)]
        return left

    def _check(self, block: _Block, left: list[Any]) -> None:
        if not left:
            return
        fds = {c.fd if isinstance(c, registry.Record) else c[0] for c in left}
        infos = judge.diagnosed([s for s in snapshot.take().sockets if s.fd in fds], (block.frame,))
        leaks = [i for i in infos if not judge.ignored(i, self.ignore)]
        if leaks:
            raise LeakError(leaks)
