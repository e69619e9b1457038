"""install() / uninstall(): the one place that owns leakguard's global state."""

from __future__ import annotations

import importlib
import os
import sys
import threading
from types import ModuleType
from typing import Any

from leakguard.integrations import INTEGRATIONS

from . import _config, _sockets, registry, stacks
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


def _after_fork_in_child() -> None:
    # The parent's lock may have been held by another thread at fork time.
    _state.lock = threading.RLock()
    if _state.installed:
        _state.pid = os.getpid()
        # The parent's records describe descriptors the child inherited, not ones it created.
        registry.clear()
        from . import watcher

        watcher.after_fork(_state)


if hasattr(os, "register_at_fork"):
    # Registered once at import, inert unless installed (at-fork hooks cannot be removed).
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
    from . import watcher

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
        _sync_integrations()
        watcher.configure(_state)


if install.__doc__ is not None:  # None under python -OO
    install.__doc__ = install.__doc__.replace("{options}", "\n    ".join(_config.docstring_lines()))


def uninstall() -> None:
    """Undo everything install() did; safe to call at any time, any number of times."""
    from . import watcher

    with _state.lock:
        if not _state.installed:
            return
        _state.installed = False
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
