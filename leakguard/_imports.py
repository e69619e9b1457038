"""Post-import hooks that can be removed again.

wrapt's post-import hooks cannot be unregistered, and ``uninstall()`` must leave
nothing behind, so leakguard keeps its own small ``sys.meta_path`` finder: it
only looks at the watched module names, lets the real finders find them, and
runs the callbacks once the module has executed.

Two things keep this invisible to the host:

- The callback runs as the import system would leave the module a moment later:
  the submodule is already an attribute of its parent package (the import system
  binds it only after the loader returns, so ``import http.client`` inside the
  callback would otherwise fail with "cannot access submodule 'client'").
- Only the import system's own load of a watched module goes through leakguard's
  loader; a spec asked for by anything else (``importlib.util.find_spec``,
  ``pkgutil``, ``runpy``) is the real finders' spec, untouched, and a loaded
  module's ``__spec__.loader`` / ``__loader__`` are its real loader.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from types import CodeType, FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from ._log import log

if TYPE_CHECKING:
    from importlib.abc import Loader as _LoaderBase
    from importlib.machinery import ModuleSpec
else:
    try:  # what importlib.abc.Loader is, without importlib.abc's own imports (importlib.resources, tempfile, ...)
        from importlib._abc import Loader as _LoaderBase
    except ImportError:  # pragma: no cover - an interpreter without it
        from importlib.abc import Loader as _LoaderBase

__all__ = ["ImportWatcher"]


def _loading_code() -> CodeType | None:
    """The code of the import system's "find and load one module" step, if it can be told apart."""
    bootstrap = sys.modules.get("_frozen_importlib") or sys.modules.get("importlib._bootstrap")
    fn = getattr(bootstrap, "_find_and_load_unlocked", None)
    code = getattr(fn, "__code__", None)
    return code if isinstance(code, CodeType) else None


_LOADING = _loading_code()
# Frames between a meta path finder and the import system's load: _find_spec, then
# _find_and_load_unlocked; a few more where another finder delegates to sys.meta_path
# (wrapt's post-import hooks call importlib.util.find_spec from their own find_spec).
_MAX_DEPTH = 12


def _import_system_loads(fullname: str, frame: FrameType | None) -> bool:
    """Is this find_spec call the import system about to load *fullname* (not introspection)?"""
    if _LOADING is None:  # pragma: no cover - another implementation: hook every find
        return True
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return False
        if frame.f_code is _LOADING:
            return bool(frame.f_locals.get("name") == fullname)
        frame = frame.f_back
    return False


def _bind_to_parent(name: str, module: ModuleType) -> None:
    """``setattr(parent, child, module)``: what the import system does right after the loader returns."""
    parent_name, _, child = name.rpartition(".")
    parent = sys.modules.get(parent_name) if parent_name else None
    if parent is None or getattr(parent, child, None) is module:
        return
    try:
        setattr(parent, child, module)
    except Exception:  # the import system warns about this itself, a moment later
        pass


class _Loader(_LoaderBase):
    """The real loader's stand-in for one load; gone from the spec before the module runs."""

    def __init__(self, spec: ModuleSpec, loader: Any, on_loaded: Callable[[ModuleType], None]) -> None:
        self._spec = spec
        self._loader = loader
        self._on_loaded = on_loaded

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        # The module runs with its real loader, so its own code (and anything that looks at it
        # later: importlib.resources, inspect, linecache, pickle) sees exactly what it would plain.
        self._spec.loader = self._loader
        spec = module.__spec__
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        self._loader.exec_module(module)
        name = self._spec.name
        loaded = sys.modules.get(name, module)  # a module may replace itself in sys.modules
        _bind_to_parent(name, loaded)
        self._on_loaded(loaded)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class ImportWatcher:
    """Calls ``callback(module)`` right after any of *names* is first imported.

    A meta path finder by protocol (``find_spec``), not by subclassing
    ``importlib.abc.MetaPathFinder``: importing :mod:`importlib.abc` costs more
    than the rest of ``import leakguard``.
    """

    def __init__(self, names: Sequence[str], callback: Callable[[ModuleType], None]) -> None:
        self.names = frozenset(names)
        self.callback = callback
        self._busy = threading.local()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in self.names:
            return None
        busy: set[str] | None = getattr(self._busy, "names", None)
        if busy is None:
            busy = self._busy.names = set()
        if fullname in busy:  # our own search below, through a finder that asks sys.meta_path again
            return None
        if not _import_system_loads(fullname, sys._getframe(1)):
            return None  # introspection: the real finders answer, with the real loader
        busy.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec, spec.loader, self._loaded)
        return spec

    def _loaded(self, module: ModuleType) -> None:
        try:
            self.callback(module)
        except Exception:  # never break the host's import
            log.warning("leakguard: instrumenting %s failed", module.__name__, exc_info=True)

    def start(self) -> None:
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def stop(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
