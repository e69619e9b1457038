"""install() / uninstall(): the one place that owns leakguard's global state."""

from __future__ import annotations

import importlib
import os
import sys
import threading
from types import ModuleType
from typing import Any

from leakguard.integrations import INTEGRATIONS

from . import _config, _sockets, judge, registry, stacks
from ._imports import ImportWatcher
from ._log import log

__all__ = ["get_config", "install", "installed", "uninstall"]


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.installed = False
        self.config = _config.Config()
        self.applied: dict[str, ModuleType] = {}  # integration name -> its module, instrumented
        #: integration name -> why it is not applied ("needs urllib3 >= 1.26, < 3", "failed: ..."), for doctor
        self.not_applied: dict[str, str] = {}
        self.watcher: Any = None  # watcher.Watcher
        self.imports: ImportWatcher | None = None
        self.pid = os.getpid()


_state = _State()


# -- fork: the one at-fork handler ------------------------------------------------------------------

#: The modules with fork bookkeeping, in the order a forked child resets them (each one's
#: ``after_fork_in_child``); those with a thread of their own (:mod:`leakguard._threads`) also end it
#: before the fork (``before_fork``) and start it again in the parent (``after_fork_in_parent``, in
#: reverse order).  A module not imported has nothing to reset: they are looked up, never imported,
#: here (an import in an at-fork hook can deadlock on a module lock held by another thread).
FORK_ORDER = (
    "leakguard.registry",  # its lock first: everything after may take it
    "leakguard.integrations._pools",  # the checkout timer
    "leakguard.metrics",  # the scrape server
    "leakguard.watcher",  # the periodic reports: last, it restarts on the others' state
)


def _fork_parts(hook: str) -> list[Any]:
    out = []
    for name in FORK_ORDER:
        fn = getattr(sys.modules.get(name), hook, None)
        if fn is not None:
            out.append(fn)
    return out


def _run_fork_hooks(hooks: list[Any]) -> None:
    for fn in hooks:
        try:
            fn()
        except Exception:  # a fork never fails because of us
            registry.count_error()


def _before_fork() -> None:
    _run_fork_hooks(_fork_parts("before_fork"))


def _after_fork_in_parent() -> None:
    hooks = _fork_parts("after_fork_in_parent")[::-1]
    if hooks and sys.version_info >= (3, 13) and sys.getprofile() is None:
        _when_fork_returns(hooks)
    else:
        _run_fork_hooks(hooks)


#: Calls that fork (one called again before the last one's hooks ran: they run first).
_FORKS = frozenset(("fork", "forkpty", "fork1"))
#: Profile events :func:`_when_fork_returns` waits at most (then it runs the hooks anyway).
_FORK_RETURN_EVENTS = 10_000


def _when_fork_returns(hooks: list[Any]) -> None:
    """Run *hooks* once ``os.fork()`` has returned in this thread.

    3.13+ counts the process's threads for its "multi-threaded" warning after
    the at-fork hooks ran, not before them as 3.12 does: a thread of ours
    started again in an ``after_in_parent`` hook would be counted.  A one-shot
    profile function of this thread only (installed when the host has none)
    runs them at the first event once the frame that called ``fork`` has moved
    on (its instruction is no longer the call), and is removed at once.  At-fork
    hooks and the warning itself run inside the call: they do not count.
    """
    try:
        caller = sys._getframe(2)  # _after_fork_in_parent, then the frame whose call forks
        at = caller.f_lasti
    except Exception:
        _run_fork_hooks(hooks)
        return
    left = [_FORK_RETURN_EVENTS]

    def profile(frame: Any, event: str, arg: Any) -> None:
        left[0] -= 1
        if (
            frame is caller
            or caller.f_lasti != at
            or (event == "c_call" and getattr(arg, "__name__", None) in _FORKS)
            or left[0] <= 0
        ):
            sys.setprofile(None)
            _run_fork_hooks(hooks)

    try:
        sys.setprofile(profile)
    except Exception:
        _run_fork_hooks(hooks)


def _after_fork_in_child() -> None:
    # The parent's lock may have been held by another thread at fork time.
    _state.lock = threading.RLock()
    _run_fork_hooks(_fork_parts("after_fork_in_child"))
    if _state.installed:
        _state.pid = os.getpid()
        # The parent's records describe descriptors the child inherited, not ones it created;
        # the sockets it holds now are its parent's.
        _run_fork_hooks([registry.clear, judge.remember_inherited])
        watcher = sys.modules.get("leakguard.watcher")
        if watcher is not None:
            watcher.restart_in_child(_state)


if hasattr(os, "register_at_fork"):
    # Registered once at import, inert unless installed (at-fork hooks cannot be removed).
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def _installed_version(name: str) -> str | None:
    """The distribution's version; else the imported module's ``__version__`` (psycopg2 is
    installed as ``psycopg2-binary``, a vendored copy has no distribution of its own)."""
    import importlib.metadata  # 50 ms to import: only when an integration is applied

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    version = getattr(sys.modules.get(name.replace("-", "_")), "__version__", None)
    if isinstance(version, str) and version.split():
        return version.split()[0]  # psycopg2: "2.9.9 (dt dec pq3 ext lo64)"
    return None


def version_ok(requires: str) -> bool:
    """Is the installed version within the gate ``"name >= 1.2, < 3"`` (PEP 440)?  False if absent.

    A gate that is not a valid requirement raises ``ValueError``; a version that is not PEP 440
    (nothing we can compare) is out of the gate.
    """
    from packaging.requirements import InvalidRequirement, Requirement  # only when an integration is applied
    from packaging.version import InvalidVersion, Version

    try:
        gate = Requirement(requires)
    except InvalidRequirement as exc:
        raise ValueError(f"bad version gate {requires!r}: {exc}") from None
    have = _installed_version(gate.name)
    if have is None:
        return False
    try:
        return gate.specifier.contains(Version(have), prereleases=True)
    except InvalidVersion:
        return False


def _enabled() -> list[str]:
    chosen = _state.config.integrations
    return list(INTEGRATIONS) if chosen is None else list(chosen)


def _apply(name: str) -> None:
    """Instrument one integration now (its library is imported)."""
    if name in _state.applied:
        return
    try:
        mod = importlib.import_module(f"leakguard.integrations.{name}")
    except ImportError:
        log.debug("leakguard: no integration module for %s", name)
        _state.not_applied[name] = "no integration module"
        return
    try:
        requires = getattr(mod, "REQUIRES", None)
        if requires and not version_ok(requires):
            log.debug("leakguard: %s skipped, needs %s", name, requires)
            _state.not_applied[name] = f"skipped: needs {requires}"
            return
        mod.instrument()
        _state.applied[name] = mod
        _state.not_applied.pop(name, None)
    except Exception as exc:
        _state.not_applied[name] = f"failed: {type(exc).__name__}: {exc}"
        log.warning("leakguard: the %s integration failed and is skipped", name, exc_info=True)
        try:
            mod.uninstrument()
        except Exception:
            pass


def _on_import(module: ModuleType) -> None:
    with _state.lock:
        if not _state.installed:
            return
        for name in _enabled():
            if module.__name__ in INTEGRATIONS[name] and all(m in sys.modules for m in INTEGRATIONS[name]):
                _apply(name)


def _sync_integrations() -> None:
    enabled = _enabled()
    for name in list(_state.applied):
        if name not in enabled:
            _unapply(name)
    waiting: list[str] = []
    for name in enabled:
        triggers = INTEGRATIONS[name]
        if all(m in sys.modules for m in triggers):
            _apply(name)
        else:
            waiting.extend(m for m in triggers if m not in sys.modules)
    if _state.imports is not None:
        _state.imports.stop()
        _state.imports = None
    if waiting:
        _state.imports = ImportWatcher(waiting, _on_import)
        _state.imports.start()


def _unapply(name: str) -> None:
    mod = _state.applied.pop(name)
    try:
        mod.uninstrument()
    except Exception:
        log.warning("leakguard: uninstrumenting %s failed", name, exc_info=True)


def install(**options: Any) -> None:
    """Start tracking sockets.  Idempotent; a second call with other options reconfigures.

    Options (each also read from ``LEAKGUARD_<OPTION>`` when not given):

    {options}

    A bad value raises ``ValueError`` naming the option and what it accepts.
    """
    config = _config.parse(options)
    from leakguard.integrations import _pools

    from . import report, watcher

    with _state.lock:
        _state.config = config
        registry.set_depth(config.stack_depth)
        if not _state.installed:
            # Before any hook runs, here rather than at the first is_app_file() miss inside a socket
            # hook: that would import sysconfig in whatever thread opens a socket first, and an import
            # in flight in one thread when another forks leaves the child stuck on its module lock.
            stacks.library_prefixes()
            _sockets.instrument()
            _state.installed = True
            _state.pid = os.getpid()
        _pools.configure(config.checkout_threshold, report.event_sink(config.log_format))
        _sync_integrations()
        watcher.configure(_state)


if install.__doc__ is not None:  # None under python -OO
    install.__doc__ = install.__doc__.replace("{options}", "\n    ".join(_config.docstring_lines()))


def uninstall() -> None:
    """Undo everything install() did; safe to call at any time, any number of times."""
    from leakguard.integrations import _pools

    from . import watcher

    with _state.lock:
        if not _state.installed:
            return
        _state.installed = False
        _pools.configure(None, None)  # before the pool integrations' stop(): it forgets the checkouts then
        watcher.stop(_state)
        if _state.imports is not None:
            _state.imports.stop()
            _state.imports = None
        for name in reversed(list(_state.applied)):
            _unapply(name)
        _sockets.uninstrument()
        registry.clear()
        _state.config = _config.Config()


def installed() -> bool:
    return _state.installed


def get_config() -> _config.Config:
    """The configuration in effect (defaults when not installed)."""
    return _state.config
