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
import threading
from types import CodeType, FrameType
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = [
    "CONTEXT",
    "Folded",
    "Frame",
    "DRIVERS",
    "capture",
    "continued",
    "PerTask",
    "own_continuation",
    "creation_site",
    "fold",
    "format_folded",
    "format_site",
    "has_app_frame",
    "frames",
    "from_application",
    "is_app_file",
    "library_of",
    "mark_application",
    "relpath",
    "rendering",
    "resolve",
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


class PerTask:
    """The continuations of tasks created with an explicit ``context=`` (``loop.create_task(coro,
    context=ctx)``): the context is the caller's to share between tasks, so what goes in it is one
    of these, and each task finds its own :class:`Continuation` here by its coroutine.  A task (or a
    plain ``ctx.run``) not in it has none: its frames stay as they are."""

    __slots__ = ("conts",)

    def __init__(self) -> None:
        import weakref

        self.conts: weakref.WeakKeyDictionary[Any, Continuation] = weakref.WeakKeyDictionary()

    def current(self) -> Continuation | None:
        asyncio = sys.modules.get("asyncio")
        try:
            task = asyncio.current_task() if asyncio is not None else None
            return self.conts.get(task.get_coro()) if task is not None else None
        except Exception:  # no running loop, a task-like object without get_coro
            return None


def own_continuation(cont: Continuation | PerTask | None) -> Continuation | None:
    """*cont* itself, or for a :class:`PerTask` the running task's own continuation."""
    return cont.current() if isinstance(cont, PerTask) else cont


def continued(frames: Frames, cont: Continuation | PerTask, depth: int) -> Frames:
    """*frames* captured in a task, thread or executor job, continued with the stack that created it.

    The task's own frames end at its coroutine (*cont*'s boundary) or at the first
    event-loop driver frame; below them lies the loop (``asyncio.run(...)``), not the
    code that asked for the work.  When those own frames hold an application frame,
    *frames* are returned unchanged; otherwise the own frames followed by the parent's
    stack, at most *depth* frames in all.  Applying it twice gives the same result.
    """
    if isinstance(cont, PerTask):
        found = cont.current()
        if found is None:
            return frames
        cont = found
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


# --- resolving and formatting (only when a report is rendered) -------------------------------------
#
# Resolving is cached per process at two levels, both exact:
# - each (code, offset) once: id(code) -> (code, {offset: Frame}).  The code object is held,
#   so its id cannot be reused while the entry exists; a code object's line table never
#   changes, and a recompiled or reloaded module has new code objects (new ids, new lines).
#   Keyed by id, not by the code object: hashing a code object hashes its bytecode and
#   constants again at every lookup.
# - each resolved stack once: equal stacks are one tuple object (see resolve()), so a
#   renderer can share work between sockets by the tuple's id.
# Bounded: a cache past _CACHE_MAX entries starts again (its old results stay valid where held).
_CACHE_MAX = 10_000
_codes: dict[int, tuple[CodeType, dict[int, Frame]]] = {}
_stacks: dict[tuple[Frame, ...], tuple[Frame, ...]] = {}


def resolve(captured: Frames) -> tuple[Frame, ...]:
    """The captured stack as :class:`Frame` objects, outermost first.

    Equal stacks give the same tuple object while the cache holds it.
    """
    codes = _codes
    out = []
    for i in range(len(captured) - 2, -1, -2):
        code = captured[i]
        ent = codes.get(id(code))
        if ent is None:
            if len(codes) >= _CACHE_MAX:
                codes.clear()
            ent = codes[id(code)] = (code, {})
        lasti = captured[i + 1]
        fr = ent[1].get(lasti)
        if fr is None:
            fr = ent[1][lasti] = Frame(code.co_filename, _line_of(code, lasti), code.co_name)
        out.append(fr)
    stack = tuple(out)
    shared = _stacks.get(stack)
    if shared is None:
        if len(_stacks) >= _CACHE_MAX:
            _stacks.clear()
        shared = _stacks[stack] = stack
    return shared


def frames(captured: Frames) -> list[Frame]:
    """The captured stack as :class:`Frame` objects, outermost first (a new list)."""
    return list(resolve(captured))


def creation_site(stack: Sequence[Frame]) -> Frame | None:
    """The innermost application frame of an outermost-first stack.

    Falls back to the innermost frame outside leakguard when no application frame
    was captured (a socket opened entirely inside a library or the event loop).
    """
    get = _app_files.get
    for fr in reversed(stack):
        app = get(fr.file)
        if app is None:
            app = is_app_file(fr.file)
        if app:
            return fr
    return stack[-1] if stack else None


def from_application(stack: Sequence[Frame]) -> Sequence[Frame]:
    """*stack* (outermost first) from the application's outermost frame inwards: no test runner's
    or thread bootstrap's frames; all of it when it has no application frame."""
    for i, fr in enumerate(stack):
        if is_app_file(fr.file):
            return stack[i:]
    return stack


def format_site(frame: Frame | None) -> str:
    """``path/to/file.py:LINE`` as a traceback prints it (relative to cwd when inside it)."""
    if frame is None:
        return "<unknown>"
    return f"{relpath(frame.file)}:{frame.line}"


# Relative paths: filename -> as shown, valid for the working directory _rel_cwd[0].  Looking at
# the working directory costs a system call, so a render pass looks once (see rendering()); a
# call outside one looks every time.  A chdir() therefore shows in the next render, never stale.
_rel: dict[str, str] = {}
_rel_cwd: list[str | None] = [None]
_render_cwd = threading.local()


def _cwd() -> str | None:
    cwd = getattr(_render_cwd, "cwd", None)
    if cwd is None:
        try:
            cwd = os.getcwd()
        except OSError:
            return None
    return cwd


def relpath(filename: str) -> str:
    """*filename* relative to the working directory when inside it, else as it is."""
    cwd = _cwd()
    if cwd is None:
        return filename
    if cwd != _rel_cwd[0]:
        _rel.clear()
        _rel_cwd[0] = cwd
    r = _rel.get(filename)
    if r is None:
        prefix = os.path.join(cwd, "")
        r = filename[len(prefix) :] if filename.startswith(prefix) else filename
        if len(_rel) >= _CACHE_MAX:
            _rel.clear()
        _rel[filename] = r
    return r


class rendering:
    """``with stacks.rendering():`` one render pass: paths are made relative to the working
    directory as it is at its start, read once (nested passes keep the outer one's)."""

    __slots__ = ("_outer",)

    def __enter__(self) -> None:
        self._outer = getattr(_render_cwd, "cwd", None)
        if self._outer is None:
            try:
                _render_cwd.cwd = os.getcwd()
            except OSError:
                pass

    def __exit__(self, *exc: object) -> None:
        _render_cwd.cwd = self._outer


# --- folding library frames for display ----------------------------------------------------------

_libraries: dict[str, str] = {}


def library_of(filename: str) -> str:
    """The library a file belongs to, as a person names it: ``urllib3``, ``socket``, ``asyncio``."""
    name = _libraries.get(filename)
    if name is None:
        name = _library_of(filename)
        if len(_libraries) >= _CACHE_MAX:
            _libraries.clear()
        _libraries[filename] = name
    return name


def _library_of(filename: str) -> str:
    if filename.startswith("<"):  # "<frozen importlib._bootstrap>" -> importlib; "<string>" stays
        inner = filename[1:-1].split()[-1] if filename.endswith(">") else filename
        return inner.split(".")[0] if filename.startswith("<frozen ") else filename
    if filename.startswith(_LEAKGUARD_DIR) or filename.startswith(_INTEGRATIONS_DIR):
        return "leakguard"
    rest = None
    for marker in ("site-packages", "dist-packages"):
        i = filename.rfind(os.sep + marker + os.sep)
        if i >= 0:
            rest = filename[i + len(marker) + 2 :]
            break
    if rest is None:
        absname = os.path.abspath(filename)
        best = ""
        for prefix in _LIBRARY_PREFIXES or library_prefixes():
            if absname.startswith(prefix) and len(prefix) > len(best):
                best = prefix
        rest = absname[len(best) :] if best else os.path.basename(filename)
    first = rest.split(os.sep, 1)[0]
    return first[:-3] if first.endswith(".py") else first


_LEAKGUARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")

#: What :func:`fold` puts in place of consecutive library frames: (how many, their libraries in order).
Folded = tuple[int, tuple[str, ...]]


def fold(stack: Sequence[Frame], limit: int = 8, keep: Frame | None = None) -> list[Frame | Folded]:
    """An outermost-first *stack* for display: the application's frames, library frames folded.

    Consecutive frames outside the application become one ``Folded`` entry; the
    innermost *limit* application frames are kept (older ones fold too).  The
    creation site (:func:`creation_site`, or *keep*) is always shown, even when
    it lies in a library (no application frame was captured).
    """
    site = keep if keep is not None else creation_site(stack)
    shown = 0
    show: list[bool] = [False] * len(stack)
    get = _app_files.get
    for i in range(len(stack) - 1, -1, -1):
        fr = stack[i]
        if fr is site and shown < max(limit, 1):
            show[i] = True
            shown += 1
            continue
        app = get(fr.file)
        if app is None:
            app = is_app_file(fr.file)
        if app and shown < limit:
            show[i] = True
            shown += 1
    out: list[Frame | Folded] = []
    n = 0
    libs: list[str] = []
    for fr, visible in zip(stack, show):
        if visible:
            if n:
                out.append((n, tuple(libs)))
                n, libs = 0, []
            out.append(fr)
        else:
            n += 1
            lib = library_of(fr.file) if not is_app_file(fr.file) else "application code"
            if lib not in libs:
                libs.append(lib)
    if n:
        out.append((n, tuple(libs)))
    return out


def format_folded(item: Folded) -> str:
    """``[+8 frames in urllib3, requests]``"""
    n, libs = item
    where = f" in {', '.join(libs)}" if libs else ""
    return f"[+{n} frame{'' if n == 1 else 's'}{where}]"
