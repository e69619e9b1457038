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
from typing import Any

from leakguard import registry, stacks
from leakguard._patch import Patches

from ._common import call_then_reset, callable_code

__all__ = ["REQUIRES", "instrument", "uninstrument"]

REQUIRES = None  # standard library

_patches = Patches()
_ATTR = "_leakguard_cont"


def _job_context(fn: Any) -> contextvars.Context | None:
    """The context a job runs its function in: to_thread's ``partial(ctx.run, func, ...)``."""
    if isinstance(fn, functools.partial):
        run = fn.func
        ctx = getattr(run, "__self__", None)
        if isinstance(ctx, contextvars.Context) and getattr(run, "__name__", "") == "run":
            return ctx
    return None


def _work_init(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    wrapped(*args, **kwargs)
    try:
        fn = instance.fn
        ctx = _job_context(fn)
        code = callable_code(fn.args[0] if ctx is not None and fn.args else fn)
        if code is None or not stacks._is_app_code(code):
            cont = registry.continuation(1, None, inherits=False)
            if cont is not None:
                setattr(instance, _ATTR, cont)
    except Exception:
        registry.count_error()


def _run(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    try:
        cont = vars(instance).pop(_ATTR, None)
        if cont is None:
            return wrapped(*args, **kwargs)
        ctx = _job_context(instance.fn)
        if ctx is not None:  # to_thread: the continuation goes into its private copy of the context
            token = ctx.run(registry.enter_continuation, cont)
            reset: Any = functools.partial(ctx.run, registry.pop_scope)
        else:
            token, reset = registry.enter_continuation(cont), registry.pop_scope
    except Exception:
        registry.count_error()
        return wrapped(*args, **kwargs)
    return call_then_reset(reset, token, wrapped, args, kwargs)


def instrument() -> None:
    import concurrent.futures.thread as thread

    if "fn" not in thread._WorkItem.__init__.__code__.co_varnames:  # 3.14 reshaped the work item
        return
    _patches.wrap(thread, "_WorkItem.__init__", _work_init)
    _patches.wrap(thread, "_WorkItem.run", _run)


def uninstrument() -> None:
    _patches.undo()
