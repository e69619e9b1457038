"""concurrent.futures' thread pools: a job continues with the stack that submitted it.

``ThreadPoolExecutor.submit`` (and so ``loop.run_in_executor``,
``asyncio.to_thread``, ``Executor.map``) makes one ``_WorkItem`` per job in the
submitting thread; its ``__init__`` captures the submitting stack when the job's
function is not application code, and ``_WorkItem.run`` makes it the worker's
continuation for that job (see :class:`leakguard.registry.Scope`).
``asyncio.to_thread`` runs the function in a copy of the caller's context
(``ctx.run``): the continuation goes into that private copy.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

from leakguard import registry, stacks
from leakguard._patch import Patches

from ._attribution import call_then_reset, callable_code, contained

__all__ = ["REQUIRES", "instrument", "uninstrument"]

REQUIRES = None  # standard library

_patches = Patches()
_ATTR = "_leakguard_scope"
_scope = registry._scope


def _job_context(fn: Any) -> contextvars.Context | None:
    """The context a job runs its function in: to_thread's ``partial(ctx.run, func, ...)``."""
    if isinstance(fn, functools.partial):
        run = fn.func
        ctx = getattr(run, "__self__", None)
        if isinstance(ctx, contextvars.Context) and getattr(run, "__name__", "") == "run":
            return ctx
    return None


def _note_job(item: Any) -> None:
    """In the submitting thread: the scope the job will run in, when its function is not application code."""
    with contained:
        fn = item.fn
        ctx = _job_context(fn)
        code = callable_code(fn.args[0] if ctx is not None and fn.args else fn)
        if code is None or not stacks._is_app_code(code):
            cont = registry.continuation(2, None, inherits=False)
            if cont is not None:  # made here: run() only sets it
                setattr(item, _ATTR, registry.Scope(None, None, None, cont))


def _init_hook(original: Any) -> Any:
    # Plain functions, not wrapt: a wrapt binding per call costs more than the job's own bookkeeping.
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _note_job(self)

    return functools.update_wrapper(__init__, original)


def _reset_in(ctx: contextvars.Context) -> Callable[[contextvars.Token[registry.Scope | None]], None]:
    def reset(token: contextvars.Token[registry.Scope | None]) -> None:
        ctx.run(_scope.reset, token)

    return reset


def _run_hook(original: Any) -> Any:
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        sc = vars(self).pop(_ATTR, None)
        if sc is None:
            return original(self, *args, **kwargs)
        try:
            ctx = _job_context(self.fn)
            if ctx is not None:  # to_thread: the continuation goes into its private copy of the context
                token = ctx.run(_scope.set, sc)
                reset = _reset_in(ctx)
            else:
                token, reset = _scope.set(sc), _scope.reset
        except Exception:
            registry.count_error()
            return original(self, *args, **kwargs)
        return call_then_reset(reset, token, functools.partial(original, self), args, kwargs)

    return functools.update_wrapper(run, original)


def instrument() -> None:
    import concurrent.futures.thread as thread

    item = thread._WorkItem
    if "fn" not in item.__init__.__code__.co_varnames:  # 3.14 reshaped the work item
        return
    for name, make in (("__init__", _init_hook), ("run", _run_hook)):
        if not getattr(vars(item)[name], "_leakguard", False):
            hook = make(vars(item)[name])
            hook._leakguard = True
            _patches.set(item, name, hook)


def uninstrument() -> None:
    _patches.undo()
