"""Capture creation stacks cheaply; format them only when a report needs them.

A captured stack is a flat tuple ``(code, lasti, code, lasti, ...)``, innermost
frame first.  Storing the instruction offset instead of ``f_lineno`` keeps the
hot path O(1) per frame: the line number is computed from the code's line table
only when the stack is formatted.

The walk stops at the first frame of *application* code plus a few of its
callers (``CONTEXT``), or at ``depth`` frames, whichever comes first: that keeps
a plain ``socket.socket()`` from a test at a handful of frames while a socket
created deep inside requests + urllib3 still reaches the line that asked for it.
"""

from __future__ import annotations

import os
import sys
from types import CodeType, FrameType
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "CONTEXT",
    "Frame",
    "DRIVERS",
    "capture",
    "continued",
    "creation_site",
    "format_site",
    "has_app_frame",
    "frames",
    "is_app_file",
    "mark_application",
]

#: Frames kept beyond the first application frame (its callers).
CONTEXT = 3

Frames = tuple[Any, ...]  # (code, lasti, code, lasti, ...), innermost first


# NamedTuple's functional form: in the class form, under ``from __future__ import annotations``,
# typing compiles every field's annotation string at import (several times this module's own cost).
class Frame(NamedTuple("Frame", [("file", str), ("line", int), ("function", str)])):
    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "function": self.function}

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"


def _find_library_prefixes() -> tuple[str, ...]:
    import site
    import sysconfig

    paths: set[str] = set()
    scheme = sysconfig.get_paths()  # expands every path of the scheme: once, not per key
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = scheme.get(key)
        if p:
            paths.add(p)
    try:
        paths.update(site.getsitepackages())
    except AttributeError:  # some virtualenv builds of site lack it
        pass
    user = getattr(site, "USER_SITE", None)
    if user:
        paths.add(user)
    for p in sys.path:
        if p and ("site-packages" in p or "dist-packages" in p):
            paths.add(p)
    # wrapt lives in site-packages already; leakguard may be installed editable.
    paths.add(os.path.dirname(os.path.abspath(__file__)))
    paths.add(os.path.dirname(os.__file__))  # the stdlib, even if sysconfig lies
    out = set()
    for p in paths:
        out.add(os.path.join(os.path.abspath(p), ""))
        out.add(os.path.join(os.path.realpath(p), ""))
    return tuple(sorted(out))


_LIBRARY_PREFIXES: tuple[str, ...] | None = None  # see library_prefixes()


def library_prefixes() -> tuple[str, ...]:
    """The directories of library code (stdlib, site-packages, leakguard).

    Computed on first use, not at import (sysconfig is not otherwise imported):
    by ``install()`` before any hook runs, or by the first :func:`is_app_file`
    miss without install (``snapshot()`` formatting a stack).
    """
    global _LIBRARY_PREFIXES
    if _LIBRARY_PREFIXES is None:
        _LIBRARY_PREFIXES = _find_library_prefixes()
    return _LIBRARY_PREFIXES


_INTEGRATIONS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integrations", ""
)
_FORCED_APP: set[str] = set()


def mark_application(filename: str) -> None:
    """Treat *filename* as application code even if it lives in a library tree.

    ``python -m leakguard demo`` uses this for its own demonstration program.
    """
    _FORCED_APP.add(filename)
    _app_files.clear()
    for forget in on_app_change:
        forget()


#: Called when the answers of :func:`is_app_file` may change (the compiled walker's cache).
on_app_change: list[Callable[[], object]] = []


# Keyed by filename, not code object: a str caches its hash, a code object
# recomputes one over its bytecode and constants at every lookup.
_app_files: dict[str, bool] = {}


def is_app_file(filename: str) -> bool:
    """True for the application's own code: not stdlib, site-packages or leakguard."""
    r = _app_files.get(filename)
    if r is None:
        r = _is_app_file(filename)
        if len(_app_files) > 10_000:
            _app_files.clear()
        _app_files[filename] = r
    return r


def _is_app_file(filename: str) -> bool:
    if filename in _FORCED_APP:
        return True
    if not filename or filename.startswith("<"):
        return False  # <frozen importlib._bootstrap>, <string>, ...
    if filename.startswith(_INTEGRATIONS_DIR):
        return False
    absname = filename if os.path.isabs(filename) else os.path.abspath(filename)
    return not absname.startswith(_LIBRARY_PREFIXES or library_prefixes())


def _is_app_code(code: CodeType) -> bool:
    r = _app_files.get(code.co_filename)
    return is_app_file(code.co_filename) if r is None else r


_getframe = sys._getframe


def capture_py(skip: int = 1, depth: int = 32) -> Frames:
    """Capture the caller's stack: innermost first, stopping ``CONTEXT`` frames past the app frame.

    *skip* frames are left out (1 = the caller of ``capture``).  :mod:`leakguard.registry`
    replaces :func:`capture` with the compiled equivalent when it is built.
    """
    f: FrameType | None
    try:
        f = _getframe(skip + 1)
    except ValueError:
        return ()
    out: list[Any] = []
    add = out.extend
    get = _app_files.get
    while f is not None and depth > 0:
        code = f.f_code
        add((code, f.f_lasti))
        depth -= 1
        is_app = get(code.co_filename)
        if is_app is None:
            is_app = is_app_file(code.co_filename)
        f = f.f_back
        if is_app:  # the application's frame: keep a few of its callers, then stop
            n = CONTEXT if CONTEXT < depth else depth
            while f is not None and n > 0:
                add((f.f_code, f.f_lasti))
                f = f.f_back
                n -= 1
            break
    return tuple(out)


capture = capture_py


#: Code objects of event-loop drivers (``Handle._run``, ``run_forever``, ...): a task's or a
#: callback's own frames end below the first of them.  Filled by the asyncio integration.
DRIVERS: set[Any] = set()

class Continuation:
    """Where a task's or thread's own frames end, and the stack that created it (see :func:`continued`).

    ``boundary`` is the code of the task's coroutine (None for a thread or job); ``frames``
    the capture at creation, itself continued with ``outer`` (the creator's own
    continuation) only when first needed: creating a task costs one capture, and a task
    whose sockets never ask pays nothing more.  Resolving drops ``outer``, so a library
    that keeps respawning its own task keeps no chain of them alive.
    """

    __slots__ = ("boundary", "frames", "outer")

    def __init__(self, boundary: Any, frames: Frames, outer: Continuation | None, depth: int = 64) -> None:
        if outer is not None and outer.outer is not None:
            outer.stack(depth)  # at most one unresolved link behind any continuation
        self.boundary = boundary
        self.frames: Frames = frames
        self.outer: Continuation | None = outer

    def stack(self, depth: int = 64) -> Frames:
        """The creating stack, continued across the creator's own boundary (computed once)."""
        outer = self.outer
        if outer is not None:
            self.frames = continued(self.frames, outer, depth)
            self.outer = None
        return self.frames


def continued(frames: Frames, cont: Continuation, depth: int) -> Frames:
    """*frames* captured in a task, thread or executor job, continued with the stack that created it.

    The task's own frames end at its coroutine (*cont*'s boundary) or at the first
    event-loop driver frame; below them lies the loop (``asyncio.run(...)``), not the
    code that asked for the work.  When those own frames hold an application frame,
    *frames* are returned unchanged; otherwise the own frames followed by the parent's
    stack, at most *depth* frames in all.  Applying it twice gives the same result.
    """
    boundary = cont.boundary
    end = len(frames)
    drivers = DRIVERS
    for i in range(0, end, 2):
        code = frames[i]
        if code is boundary:
            end = i + 2
            break
        if code in drivers:
            end = i
            break
    for i in range(0, end, 2):
        if _is_app_code(frames[i]):
            return frames
    parent = cont.stack(depth)
    room = 2 * depth - end
    return frames[:end] + (parent if len(parent) <= room else parent[: max(room, 0)])


def has_app_frame(frames: Frames) -> bool:
    """Does *frames* (a capture) hold an application frame?"""
    return any(_is_app_code(frames[i]) for i in range(0, len(frames), 2))


def _line_of(code: CodeType, lasti: int) -> int:
    try:
        for start, end, line in code.co_lines():
            if start <= lasti < end:
                return line if line is not None else code.co_firstlineno
    except Exception:  # pragma: no cover - exotic code objects
        pass
    return code.co_firstlineno


# Formatting memo: sockets created at the same place share one captured tuple
# value, so a snapshot of 1,000 sockets from one site formats one stack.
_formatted: dict[Frames, tuple[Frame, ...]] = {}


def frames(captured: Frames) -> list[Frame]:
    """The captured stack as :class:`Frame` objects, outermost first."""
    done = _formatted.get(captured)
    if done is None:
        out = [
            Frame(captured[i].co_filename, _line_of(captured[i], captured[i + 1]), captured[i].co_name)
            for i in range(len(captured) - 2, -1, -2)
        ]
        done = tuple(out)
        if len(_formatted) > 10_000:
            _formatted.clear()
        _formatted[captured] = done
    return list(done)


def creation_site(stack: list[Frame]) -> Frame | None:
    """The innermost application frame of an outermost-first stack.

    Falls back to the innermost frame outside leakguard when no application frame
    was captured (a socket opened entirely inside a library or the event loop).
    """
    for fr in reversed(stack):
        if is_app_file(fr.file):
            return fr
    return stack[-1] if stack else None


def format_site(frame: Frame | None) -> str:
    """``path/to/file.py:LINE`` as a traceback prints it (relative to cwd when inside it)."""
    if frame is None:
        return "<unknown>"
    return f"{relpath(frame.file)}:{frame.line}"


def relpath(filename: str) -> str:
    try:
        cwd = os.getcwd()
    except OSError:
        return filename
    if filename.startswith(os.path.join(cwd, "")):
        return filename[len(cwd) + 1 :]
    return filename
