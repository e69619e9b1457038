"""asyncio: task boundaries, accepted connections, and loops that make their sockets in C.

Tasks.  A socket made in a task that library code created (``asyncio.wait_for``
runs its awaitable in a new task on 3.10-3.11; ``gather``, ``TaskGroup``,
``ensure_future`` on a library coroutine) would name only the event loop below
it: ``asyncio.run(main())``.  Every task is made by ``loop.create_task``; the
wrapper there, when the task's coroutine is not application code, captures the
creating stack once and leaves it in the context the task copies (a
continuation scope, :class:`leakguard.registry.Scope`).  A capture inside that
task whose own frames (down to the task's coroutine or the loop's driver) hold
no application frame goes on with it.  A task running an application coroutine
costs one cache lookup: its own frames already name the application.  A task
given its caller's own context (``create_task(coro, context=ctx)``, as
``asyncio.Runner`` and ``uvloop.run`` do) may share it with other tasks: that
context gets a :class:`leakguard.stacks.PerTask` once, in which each such task
finds its own continuation by its coroutine.

Accepted connections name the handler that got them (innermost) and the stack
of the ``create_server`` call (the ``start_server`` line; else the listening socket's record).
``sock_accept`` names its caller even when the accept completes in a loop callback.

uvloop (and any loop wrapped through :func:`wrap_loop_class`) connects and
accepts in C: no ``socket.socket`` exists.  Its ``create_connection`` /
``create_server`` / unix variants / ``connect_accepted_socket`` are wrapped
and the transport's descriptor adopted with the stack of that call (or the
enclosing integration's scope: aiohttp, asyncpg, redis on uvloop).  Server-side
connections are adopted once the protocol has its transport (as ``transport``
or ``_transport``: asyncio's streams, uvicorn, aiohttp do so); a protocol that
keeps it elsewhere leaves that connection untracked.
"""

from __future__ import annotations

import functools
import weakref
from types import CodeType
from typing import Any

from leakguard import registry, stacks
from leakguard._patch import Patches

from ._attribution import call_then_reset, callable_code, contained

__all__ = ["REQUIRES", "instrument", "uninstrument", "wrap_loop_class"]

REQUIRES = None  # standard library

_patches = Patches()
_scope = registry._scope
_is_app_code = stacks._is_app_code


# --------------------------------------------------------------------------- tasks


def _create_task(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """``loop.create_task``: the new task continues with the creating stack (see the module doc)."""
    try:
        ctx = kwargs.get("context")
        if ctx is not None:
            _continue_in(ctx, args, kwargs)
            return wrapped(*args, **kwargs)
        coro = args[0] if args else kwargs.get("coro")
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        sc = _scope.get()
        if code is not None and _is_app_code(code):
            if sc is None or sc.origin is not None:
                return wrapped(*args, **kwargs)  # the common case: one cache lookup
            token = _scope.set(None)  # an application coroutine needs no continuation
        else:
            cont = registry.continuation(1, code)
            if cont is None:
                return wrapped(*args, **kwargs)
            token = registry.enter_continuation(cont)
    except Exception:
        registry.count_error()
        return wrapped(*args, **kwargs)
    return call_then_reset(_scope.reset, token, wrapped, args, kwargs)


def _continue_in(ctx: Any, args: Any, kwargs: Any) -> None:
    """A task about to run in the caller's own context *ctx*: that context may be shared by other
    tasks, so it gets a :class:`stacks.PerTask` (once) and this task's continuation goes in there,
    keyed by its coroutine.  A context that already carries a scope of ours keeps it."""
    with contained:
        coro = args[0] if args else kwargs.get("coro")
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is not None and _is_app_code(code):
            return  # its own frames name the application
        sc = ctx.get(_scope)
        if sc is not None and (sc.origin is not None or type(sc.cont) is not stacks.PerTask):
            return
        cont = registry.continuation(2, code)
        if cont is None:
            return
        if sc is None:
            sc = registry.Scope(None, None, None, stacks.PerTask())
            try:
                ctx.run(_scope.set, sc)
            except RuntimeError:  # ctx is entered: the running one (tasks sharing it), or another thread's
                token = _scope.set(sc)
                if ctx.get(_scope) is not sc:
                    _scope.reset(token)
                    return
        sc.cont.conts[coro] = cont


_MISSING = object()


def task_hook(original: Any) -> Any:
    """``create_task`` as a plain function around *original*: on the path of every task, where a
    wrapt binding per call would cost more than the rest of the wrapper (its name, doc and
    ``__wrapped__`` are the original's, so ``inspect.signature`` reads the same)."""

    def create_task(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _create_task(functools.partial(original, self), self, args, kwargs)

    def fast(self: Any, coro: Any = _MISSING, *args: Any, **kwargs: Any) -> Any:
        if coro is _MISSING:  # let the original say what is missing
            return original(self, *args, **kwargs)
        # the common case without the partial: an application coroutine outside any continuation
        code = getattr(coro, "cr_code", None)
        if code is not None and not args and "context" not in kwargs and _scope.get() is None:
            try:
                is_app = _is_app_code(code)
            except Exception:
                is_app = False
            if is_app:
                return original(self, coro, **kwargs)
        return create_task(self, coro, *args, **kwargs)

    functools.update_wrapper(fast, original)
    return fast


def _driver_codes() -> set[Any]:
    """The event loop's own frames: a task's or callback's frames end below the first of them."""
    import asyncio.base_events
    import asyncio.events
    import asyncio.runners

    out: set[Any] = {asyncio.events.Handle._run.__code__, asyncio.runners.run.__code__}
    for name in ("run_forever", "run_until_complete", "_run_once"):
        out.add(getattr(asyncio.base_events.BaseEventLoop, name).__code__)
    runner = getattr(asyncio.runners, "Runner", None)  # 3.11+
    if runner is not None:
        out.add(runner.run.__code__)
    return out


_drivers: set[Any] = set()


# --------------------------------------------------------------------------- accepted connections


def _protocol_code(f: Any) -> CodeType | None:
    for _ in range(8):  # bounded: partials of partials
        if not isinstance(f, functools.partial):
            break
        f = f.func
    if isinstance(f, type):  # a protocol class: the method that gets the transport
        f = getattr(f, "connection_made", None) or getattr(f, "__init__", None)
    return callable_code(f)


def handler_code(protocol_factory: Any) -> CodeType | None:
    """The code that gets a server's connections: ``start_server``'s ``client_connected_cb``
    (read from the factory it builds), else the protocol factory or class."""
    code = getattr(protocol_factory, "__code__", None)
    closure = getattr(protocol_factory, "__closure__", None)
    if isinstance(code, CodeType) and closure and "client_connected_cb" in code.co_freevars:
        cb = closure[code.co_freevars.index("client_connected_cb")].cell_contents
        found = _protocol_code(cb)
        if found is not None:
            return found
    return _protocol_code(protocol_factory)


def accept_frames(protocol_factory: Any, server_frames: stacks.Frames) -> stacks.Frames:
    """An accepted connection's stack: the handler's code, then where the server was started."""
    code = handler_code(protocol_factory)
    frames = server_frames if code is None else (code, 0) + server_frames
    return frames[: 2 * registry.depth[0]]


def app_code(protocol: Any) -> CodeType | None:
    """The application a server's protocol serves, when the protocol itself is library code:
    uvicorn's (and hypercorn-style) ``protocol.app``, through middleware that keeps the next
    one as ``.app`` (uvicorn's ProxyHeaders, MessageLogger, ASGI2, WSGI).  Instance attributes
    only (no property runs); None when no application code is found."""
    obj = vars(protocol).get("app") if hasattr(protocol, "__dict__") else None
    for _ in range(8):  # bounded: a chain of middleware
        if obj is None:
            return None
        code = callable_code(obj)
        if code is not None and _is_app_code(code):
            return code
        obj = vars(obj).get("app") if hasattr(obj, "__dict__") else None
    return None


def served_frames(protocol: Any, frames: stacks.Frames) -> stacks.Frames:
    """An accepted connection's *frames*, with the application its protocol serves innermost
    when the handler in them is library code (uvicorn: the ASGI app, then ``Server.run``'s line)."""
    if frames and _is_app_code(frames[0]):
        return frames
    code = app_code(protocol)
    return frames if code is None else ((code, 0) + frames)[: 2 * registry.depth[0]]


# protocol factory -> the stack of the create_server call that was given it
_server_frames: weakref.WeakKeyDictionary[Any, stacks.Frames] = weakref.WeakKeyDictionary()


def _create_server(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """``create_server`` / ``create_unix_server`` of asyncio's own loops: remember where it was called."""
    try:
        factory = args[0] if args else kwargs.get("protocol_factory")
        _server_frames[factory] = registry.stack_here(1)
    except Exception:  # a factory that takes no weak reference: the listening socket's record names it
        pass
    return wrapped(*args, **kwargs)


def _listening_frames(factory: Any, server: Any) -> stacks.Frames:
    try:
        frames = _server_frames.get(factory)
    except TypeError:
        frames = None
    if frames is not None:
        return frames
    for sock in getattr(server, "_sockets", None) or ():
        try:
            rec = registry.get(sock.fileno())
        except Exception:
            continue
        if rec is not None:
            return rec.frames
    return ()


def _accept_connection2(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """``BaseSelectorEventLoop._accept_connection2(protocol_factory, conn, extra, sslcontext, server, ...)``:
    the accepted socket's record names the handler and the line that started the server."""
    with contained:
        factory = args[0] if args else kwargs["protocol_factory"]
        conn = args[1] if len(args) > 1 else kwargs["conn"]
        server = args[4] if len(args) > 4 else kwargs.get("server")
        fd = conn.fileno()
        rec = registry.get(fd)
        server_frames = _listening_frames(factory, server)
        if rec is not None and server_frames:
            adopted = registry.adopt(fd, rec.origin, target=rec.target, frames=accept_frames(factory, server_frames), owner=conn)
            if not (adopted.frames and _is_app_code(adopted.frames[0])):  # a library's protocol: name its app
                serving = _Serving(factory, conn, adopted)
                args = (serving, *args[1:]) if args else args
                if not args:
                    kwargs = {**kwargs, "protocol_factory": serving}
    return wrapped(*args, **kwargs)


class _Serving:
    """The protocol factory of one accepted connection (asyncio's own loops): once the protocol
    exists, the connection's record names the application it serves (:func:`served_frames`)."""

    __slots__ = ("conn", "factory", "rec")

    def __init__(self, factory: Any, conn: Any, rec: registry.Record) -> None:
        self.factory, self.conn, self.rec = factory, conn, rec

    def __call__(self) -> Any:
        protocol = self.factory()
        with contained:
            rec = self.rec
            frames = served_frames(protocol, rec.frames)
            current = registry.get(rec.fd)
            if frames is not rec.frames and current is not None and current.entry is rec.entry:
                registry.adopt(rec.fd, rec.origin, target=rec.target, frames=frames, owner=self.conn)
        return protocol


def _sock_accept(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """``loop.sock_accept``: the accepted socket names the awaiting line, not the loop callback."""
    try:
        frames = registry.stack_here(1)
    except Exception:
        registry.count_error()
        return wrapped(*args, **kwargs)
    return _readopt_accepted(wrapped(*args, **kwargs), frames)


async def _readopt_accepted(coro: Any, frames: stacks.Frames) -> Any:
    result = await coro
    with contained:
        conn = result[0]
        fd = conn.fileno()
        rec = registry.get(fd)
        registry.adopt(
            fd, rec.origin if rec is not None else "socket", target=rec.target if rec else None, frames=frames, owner=conn
        )
    return result


# --------------------------------------------------------------------------- loops that connect in C


class _Descriptor:
    """What an adopted transport's record watches: the transport's socket, until it closes."""

    __slots__ = ("__weakref__", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return int(self.sock.fileno())


# transport or server -> the _Descriptor objects its records hold weakly: they live as long as it does
_owners: weakref.WeakKeyDictionary[Any, list[_Descriptor]] = weakref.WeakKeyDictionary()


def adopt_socket(holder: Any, sock: Any, frames: stacks.Frames, sc: registry.Scope | None, after: int) -> None:
    """Adopt *sock*'s descriptor (a transport's socket made in C) unless a record newer than *after* has it."""
    fd = sock.fileno()
    if not isinstance(fd, int) or fd < 0:
        return
    entry = registry.entry(fd)
    if entry is not None and entry[2] > after and registry.get(fd) is not None:
        return  # recorded already: a Python socket, or an inner integration adopted it
    owner = _Descriptor(sock)
    _owners.setdefault(holder, []).append(owner)
    origin, target = (sc.origin, sc.target) if sc is not None and sc.origin is not None else ("socket", None)
    registry.adopt_fd(fd, origin, target, frames, owner)


def adopt_transport(transport: Any, frames: stacks.Frames, sc: registry.Scope | None, after: int) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        adopt_socket(transport, sock, frames, sc, after)


def _connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """``create_connection`` / ``create_unix_connection`` / ``connect_accepted_socket`` of a C loop."""
    try:
        frames = registry.stack_here(1)
        sc = registry.current_scope()
        after = registry.mark()
    except Exception:
        registry.count_error()
        return wrapped(*args, **kwargs)
    return _adopt_connected(wrapped(*args, **kwargs), frames, sc, after)


async def _adopt_connected(coro: Any, frames: stacks.Frames, sc: registry.Scope | None, after: int) -> Any:
    result = await coro
    with contained:
        adopt_transport(result[0], frames, sc, after)
    return result


class _AcceptingFactory:
    """The protocol factory a C loop's server is given: the host's, plus adoption of each connection."""

    __slots__ = ("factory", "frames", "loop")

    def __init__(self, factory: Any, frames: stacks.Frames, loop: Any) -> None:
        self.factory = factory
        self.frames = frames
        self.loop = loop

    def __call__(self) -> Any:
        protocol = self.factory()
        with contained:
            # The loop makes the transport after the factory returns and schedules connection_made
            # next: two turns later the protocol holds its transport.
            self.loop.call_soon(self.loop.call_soon, self._adopt, protocol)
        return protocol

    def _adopt(self, protocol: Any) -> None:
        with contained:
            transport = getattr(protocol, "transport", None) or getattr(protocol, "_transport", None)
            if transport is not None and hasattr(transport, "get_extra_info"):
                adopt_transport(transport, served_frames(protocol, self.frames), None, 0)


def _serve(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """``create_server`` / ``create_unix_server`` of a C loop: listening sockets and every accepted one."""
    try:
        frames = registry.stack_here(1)
        after = registry.mark()
        if args:
            factory = args[0]
            args = (_AcceptingFactory(factory, accept_frames(factory, frames), instance), *args[1:])
        else:
            factory = kwargs["protocol_factory"]
            kwargs = {**kwargs, "protocol_factory": _AcceptingFactory(factory, accept_frames(factory, frames), instance)}
    except Exception:
        registry.count_error()
        return wrapped(*args, **kwargs)
    return _adopt_listening(wrapped(*args, **kwargs), frames, after)


async def _adopt_listening(coro: Any, frames: stacks.Frames, after: int) -> Any:
    server = await coro
    with contained:
        for sock in server.sockets:
            adopt_socket(server, sock, frames, None, after)
    return server


#: C-loop methods and their wrappers (uvloop.Loop's; see integrations/uvloop.py).
LOOP_METHODS = {
    "create_task": _create_task,
    "create_connection": _connect,
    "create_unix_connection": _connect,
    "connect_accepted_socket": _connect,
    "create_server": _serve,
    "create_unix_server": _serve,
    "sock_accept": _sock_accept,
}


def wrap_loop_class(patches: Patches, module: Any, name: str) -> None:
    """Instrument the event-loop class ``module.name`` whose sockets are made in C (uvloop.Loop)."""
    cls = getattr(module, name)
    for method, wrapper in LOOP_METHODS.items():
        if hasattr(cls, method):
            patches.wrap(module, f"{name}.{method}", wrapper)


# --------------------------------------------------------------------------- install


def instrument() -> None:
    import asyncio.base_events
    import asyncio.selector_events
    import asyncio.unix_events

    loop_class = asyncio.base_events.BaseEventLoop
    if not getattr(vars(loop_class)["create_task"], "_leakguard", False):
        hook = task_hook(vars(loop_class)["create_task"])
        hook._leakguard = True
        _patches.set(loop_class, "create_task", hook)
    _patches.wrap(asyncio.base_events, "BaseEventLoop.create_server", _create_server)
    if hasattr(asyncio.unix_events, "_UnixSelectorEventLoop"):
        _patches.wrap(asyncio.unix_events, "_UnixSelectorEventLoop.create_unix_server", _create_server)
    _patches.wrap(asyncio.selector_events, "BaseSelectorEventLoop._accept_connection2", _accept_connection2)
    _patches.wrap(asyncio.selector_events, "BaseSelectorEventLoop.sock_accept", _sock_accept)
    codes = _driver_codes() - stacks.DRIVERS
    _drivers.update(codes)
    stacks.DRIVERS.update(codes)


def uninstrument() -> None:
    _patches.undo()
    stacks.DRIVERS.difference_update(_drivers)
    _drivers.clear()
