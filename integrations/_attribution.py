"""Attribution: which origin, target and stack a socket an integration opens gets.

Every integration opens its scope one way, :class:`scope`::

    with scope(ORIGIN, target, frames):
        return wrapped(*args, **kwargs)

Sockets created inside the block belong to *origin* and *target*, with
*frames* as their creation stack (see :func:`registry.push_scope`).  The scope
is failure-contained: if opening or closing it fails, the failure is counted
(:func:`registry.count_error`) and the wrapped call runs exactly as without
leakguard; its result and exceptions pass through untouched.  It works the same
in a coroutine (an async wrapper opens it when the coroutine runs, in the task's
context).  :data:`contained` is the same containment for the rest of an
integration's bookkeeping: ``with contained: ...`` counts and swallows an
``Exception`` raised in the block.  The paths every request or task takes (a
pool's checkout and check-in, ``create_task``, a thread pool's job) keep a plain
``try``/``except Exception: registry.count_error()``: it costs nothing until
something fails, where a ``with`` costs two calls each time.

Each HTTP integration wraps the one place where its library opens a
connection (never the per-request path, so keep-alive requests cost nothing)
and opens an :class:`app_scope` there.  That captures the application's stack
once and names the *outermost* instrumented library on it as the origin
(:func:`register_package`): a socket urllib3 opens for requests belongs to
``requests``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import BuiltinFunctionType, CodeType, FunctionType, MethodType, ModuleType, TracebackType
from typing import Any, TypeVar

from leakguard import registry, stacks

__all__ = [
    "app_scope",
    "call_then_reset",
    "callable_code",
    "contained",
    "register_package",
    "scope",
    "unregister_package",
]

T = TypeVar("T")


class _Contained:
    """``with contained:``: an ``Exception`` raised in the block is counted, never raised."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if kind is not None and issubclass(kind, Exception):
            registry.count_error()
            return True
        return False  # KeyboardInterrupt, SystemExit, ...: not ours to swallow


#: Runs leakguard's own bookkeeping inside a wrapper: a failure of ours is counted
#: (:func:`registry.count_error`) and swallowed, so the host's call goes on as without us.
contained = _Contained()


class scope:
    """A failure-contained :func:`registry.push_scope` / :func:`registry.pop_scope` pair.

    ``with scope(origin, target, frames) as sc:`` -- *sc* is the scope in effect inside
    the block (nested scopes keep the outermost origin), or None when opening it failed.
    """

    __slots__ = ("origin", "target", "frames", "_token")

    def __init__(self, origin: str, target: str | None = None, frames: stacks.Frames | None = None) -> None:
        self.origin = origin
        self.target = target
        self.frames = frames
        self._token: Any = None

    def __enter__(self) -> registry.Scope | None:
        try:
            self._token = registry.push_scope(self.origin, self.target, self.frames)
            return registry._scope.get()
        except Exception:
            registry.count_error()
            return None

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        token, self._token = self._token, None
        if token is None:
            return
        try:
            registry.pop_scope(token)
        except Exception:  # e.g. a coroutine closed from another context
            registry.count_error()


class app_scope(scope):
    """The :class:`scope` of a connection a library is about to open, attributed from the stack.

    Entering captures the application's stack once (leaving out ``__enter__`` and
    the wrapper whose ``with`` it is; wrapt adds no Python frame) and names the
    outermost registered library on it as the origin (*default_origin* when there
    is none).  Inside an enclosing scope that already has the application's stack
    nothing is captured: the outer scope wins.
    """

    __slots__ = ()

    def __enter__(self) -> registry.Scope | None:
        try:
            outer = registry.current_scope()
            if outer is None:
                self.frames = stacks.capture(2, registry.depth[0])
                self.origin = _origin(self.frames, self.origin)
            else:  # current_scope() has an origin; its frames, if any, win over a capture here
                self.origin = outer.origin or self.origin
                if outer.frames is None:
                    self.frames = stacks.capture(2, registry.depth[0])
        except Exception:
            registry.count_error()
            return None
        return super().__enter__()


def call_then_reset(reset: Callable[[Any], object], token: Any, wrapped: Callable[..., T], args: Any, kwargs: Any) -> T:
    """``wrapped(*args, **kwargs)``, then ``reset(token)`` (contained: never raises, never hides the call's exception)."""
    try:
        return wrapped(*args, **kwargs)
    finally:
        try:
            reset(token)
        except Exception:  # a token from another context: nothing of the host's to disturb
            registry.count_error()


# --------------------------------------------------------------------------- origin from the stack

_APP = "\0app"  # label of application code in the per-code cache
_packages: dict[str, str] = {}  # package directory (with trailing sep) -> origin
# Keyed by filename, not code object: a str caches its hash, a code object
# rehashes its bytecode, consts and names on every lookup (~0.5 µs per frame).
_labels: dict[str, str | None] = {}  # per code filename: origin, _APP or None


def register_package(origin: str, module: ModuleType) -> None:
    """Sockets opened with *module*'s package on the stack belong to *origin*.

    Called by an integration's ``instrument()``; the outermost registered
    package between the application and the socket names the origin.
    """
    global _packages
    # Copy on write: _label() may be iterating the old dict in another thread.
    _packages = {**_packages, **{d: origin for d in _module_dirs(module)}}
    _labels.clear()


def unregister_package(origin: str) -> None:
    global _packages
    _packages = {d: o for d, o in _packages.items() if o != origin}
    _labels.clear()


def _module_dirs(module: ModuleType) -> list[str]:
    paths: list[str] = list(getattr(module, "__path__", None) or ())
    if not paths and module.__file__:
        paths = [module.__file__]  # a plain module such as http/client.py
    out = []
    for p in paths:
        for q in {os.path.abspath(p), os.path.realpath(p)}:
            out.append(q if q.endswith(".py") else os.path.join(q, ""))
    return out


def _label(filename: str) -> str | None:
    if stacks.is_app_file(filename):
        label: str | None = _APP
    else:
        label = None
        for d, origin in _packages.items():
            if filename == d or filename.startswith(d):
                label = origin
                break
    if len(_labels) > 20_000:  # exec()'d code with made-up filenames: stay bounded
        _labels.clear()
    _labels[filename] = label
    return label


def _origin(frames: stacks.Frames, default: str) -> str:
    """The outermost registered library below the first application frame."""
    origin = default
    get = _labels.get
    for i in range(0, len(frames), 2):
        filename = frames[i].co_filename
        label: str | int | None = get(filename, 0)
        if label == 0:
            label = _label(filename)
        if label is None:
            continue
        if label is _APP:
            break
        origin = str(label)
    return origin


def callable_code(f: Any) -> CodeType | None:
    """The code object a callable runs (through partials, bound methods, callable objects), or None
    (a builtin, a class, anything else without Python code)."""
    kind = type(f)
    if kind is FunctionType:  # the common cases first, without a failed attribute lookup
        code: CodeType = f.__code__
        return code
    if kind is BuiltinFunctionType or kind is MethodType and type(f.__func__) is BuiltinFunctionType:
        return None
    for _ in range(4):  # bounded: partials of partials
        found = getattr(f, "__code__", None)
        if isinstance(found, CodeType):
            return found
        if isinstance(f, functools.partial):
            f = f.func
            continue
        func = getattr(f, "__func__", None)
        if func is not None:  # a bound method
            f = func
            continue
        if isinstance(f, type):
            return None
        call = getattr(type(f), "__call__", None)
        if not isinstance(call, FunctionType):
            return None  # builtins, method wrappers: no Python code
        f = call
    return None
