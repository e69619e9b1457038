"""Post-import hooks that can be removed again.

wrapt's post-import hooks cannot be unregistered, and ``uninstall()`` must leave
nothing behind, so leakguard keeps its own small ``sys.meta_path`` finder: it
only looks at the watched module names, lets the real finders find them, and
runs the callbacks after the module has executed.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
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


class _Loader(_LoaderBase):
    def __init__(self, loader: Any, on_loaded: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._on_loaded = on_loaded

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        if spec is not None:
            spec.loader = self._loader  # the module keeps its real loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        self._on_loaded(module)

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
        if fullname not in self.names or getattr(self._busy, "name", None) == fullname:
            return None
        self._busy.name = fullname
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.name = None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, self._loaded)
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
