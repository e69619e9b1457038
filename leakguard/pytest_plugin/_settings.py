"""The plugin's settings: one flag, ini option and environment variable each, merged once.

Flag wins over environment, environment over ini (see the table in :mod:`leakguard.pytest_plugin`).
Values are checked by :mod:`leakguard._config`'s validators, the ones ``install()`` uses: a bad one is a
``pytest.UsageError`` naming the flag, variable or ini option it came from and what it accepts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import pytest

from leakguard import _config

__all__ = ["DEFAULT_GRACE", "GC_MODES", "MODES", "Settings", "addoption", "load_settings", "matched_globs", "parse_globs", "settings_key"]

MODES = ("fail", "warn")
GC_MODES = ("warn", "fail", "off")
DEFAULT_GRACE = 0.5
MAX_GRACE = 60


class Settings(NamedTuple):
    """The plugin's settings, merged once from flags, environment and ini (immutable)."""

    enabled: bool = False
    mode: str = "fail"
    gc: str = "warn"
    grace: float = DEFAULT_GRACE
    ignore: tuple[str, ...] = ()

    def describe(self) -> str:
        out = f"leakguard: on (mode={self.mode}, gc={self.gc}, grace={self.grace:g}s"
        if self.ignore:
            out += f", ignoring {', '.join(self.ignore)}"
        return out + ")"



settings_key = pytest.StashKey[Settings]()

#: Ignore globs that matched a socket in this process (the summary names those that matched nothing).
matched_globs: set[str] = set()


def addoption(parser: pytest.Parser) -> None:
    """The flags and ini options (``pytest_addoption``)."""
    group = parser.getgroup("leakguard", "socket leak checks (leakguard)")
    group.addoption(
        "--leakguard",
        action="store_true",
        default=None,
        dest="leakguard",
        help="fail tests that leave sockets open (also: ini leakguard=true, LEAKGUARD_PYTEST=1)",
    )
    group.addoption(
        "--leakguard-mode",
        default=None,
        dest="leakguard_mode",
        metavar="fail|warn",
        help="fail (default): a leaking test fails; warn: leaks are listed in the terminal summary",
    )
    group.addoption(
        "--leakguard-gc",
        default=None,
        dest="leakguard_gc",
        metavar="warn|fail|off",
        help="sockets never closed but freed by the garbage collector: warn (default), fail or off",
    )
    group.addoption(
        "--leakguard-grace",
        default=None,
        dest="leakguard_grace",
        metavar="SECONDS",
        help=f"how long a socket that is still closing gets before it counts as leaked (default {DEFAULT_GRACE})",
    )
    group.addoption(
        "--leakguard-ignore",
        action="append",
        default=None,
        dest="leakguard_ignore",
        metavar="GLOB",
        help="ignore sockets whose creation site (path.py:LINE), peer (host:port) or target matches "
        "(comma- or space-separated globs; repeatable)",
    )
    parser.addini("leakguard", "enable leakguard's socket leak checks", type="bool", default=False)
    parser.addini("leakguard_mode", "leakguard: fail or warn", default="")
    parser.addini("leakguard_gc", "leakguard: sockets freed by the garbage collector: warn, fail or off", default="")
    parser.addini("leakguard_grace", "leakguard: seconds a closing socket gets", default="")
    parser.addini(
        "leakguard_ignore",
        "leakguard: globs of creation sites (path.py:LINE), peers (host:port) or targets to ignore",
        type="linelist",
        default=[],
    )


def _pick(config: pytest.Config, option: str, env: str, ini: str) -> tuple[Any, str]:
    """(value, where it came from): flag, then environment, then ini."""
    value = config.getoption(option, None)
    if value is not None:
        return value, f"--{option.replace('_', '-')}"
    if env in os.environ:
        return os.environ[env], f"environment variable {env}"
    return config.getini(ini), f"ini option {ini}"


def _checked(check: Callable[[str, Any], Any], default: Any, value: Any, where: str) -> Any:
    """``check(where, value)`` (an empty value is *default*); a bad value is a UsageError naming *where*."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        return check(where, value)
    except ValueError as exc:
        raise pytest.UsageError(f"leakguard: {exc}") from None


_MODE = _config._choice(*MODES)
_GC_MODE = _config._choice(*GC_MODES)
_GRACE = _config._seconds_from(0, MAX_GRACE)


def load_settings(config: pytest.Config) -> Settings:
    """Merge flags, environment and ini into :class:`Settings` (UsageError on bad values)."""
    enabled = _checked(_config._bool, False, *_pick(config, "leakguard", "LEAKGUARD_PYTEST", "leakguard"))
    mode = _checked(_MODE, "fail", *_pick(config, "leakguard_mode", "LEAKGUARD_PYTEST_MODE", "leakguard_mode"))
    gc_mode = _checked(_GC_MODE, "warn", *_pick(config, "leakguard_gc", "LEAKGUARD_PYTEST_GC", "leakguard_gc"))
    grace = _checked(_GRACE, DEFAULT_GRACE, *_pick(config, "leakguard_grace", "LEAKGUARD_PYTEST_GRACE", "leakguard_grace"))
    ignore = parse_globs(config.getini("leakguard_ignore") or [])
    ignore += parse_globs([os.environ.get("LEAKGUARD_PYTEST_IGNORE", "")])
    ignore += parse_globs(config.getoption("leakguard_ignore", None) or [])
    return Settings(enabled, mode, gc_mode, grace, tuple(dict.fromkeys(ignore)))


def parse_globs(values: Iterable[str]) -> list[str]:
    """Ignore globs from any source (flag, ini line, environment): each value is split
    on commas and whitespace, so ``'a.py:*,127.0.0.1:*'`` is two globs everywhere."""
    return [g for v in values for g in str(v).replace(",", " ").split()]
