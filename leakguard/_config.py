"""install() options: parsing, validation, ``LEAKGUARD_*`` environment fallback."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ._value import Value

__all__ = ["Config", "OPTIONS", "Option", "TABLE", "parse"]


def _show(value: Any) -> str:
    """*value* for an error message: its repr, shortened; never an exception of its own."""
    try:
        text = repr(value)
    except Exception:  # a repr that raises, or an int too long to print
        return f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _to_float(value: Any) -> float | None:
    """*value* as a float if it is a number (or a number's text), else None; never raises."""
    if isinstance(value, bool) or isinstance(value, (bytes, bytearray, complex)):
        return None
    try:
        if isinstance(value, str):
            return float(value.strip())
        if isinstance(value, (int, float)) or hasattr(type(value), "__float__"):
            return float(value)
    except Exception:  # 10**400 (OverflowError), "soon", an odd __float__
        return None
    return None


def _to_int(value: Any) -> int | None:
    """*value* as an int if it is an integer (an integral float, an integer's text), else None; never raises."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return int(value) if value.is_integer() else None
        if isinstance(value, str):
            return int(value.strip())
        if hasattr(type(value), "__index__"):
            import operator

            return operator.index(value)
    except Exception:  # "deep", a 5,000-digit string, an odd __index__
        return None
    return None


#: Seconds accepted for report_interval and checkout_threshold: above the upper bound a wait
#: would overflow (or never end), below the lower one the watcher would do nothing but report.
MIN_SECONDS = 0.01
MAX_SECONDS = 365 * 86400


def _seconds_or_none(name: str, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off", "0")):
        return None
    out = _to_float(value)
    if out is None or not MIN_SECONDS <= out <= MAX_SECONDS:  # NaN fails both comparisons
        raise ValueError(
            f"{name} must be a positive number of seconds from {MIN_SECONDS} to {MAX_SECONDS} (365 days), or None,"
            f" not {_show(value)}"
        )
    return out


def _int_range(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        out = _to_int(value)
        if out is None or not lo <= out <= hi:
            raise ValueError(f"{name} must be an integer from {lo} to {hi}, not {_show(value)}")
        return out

    return check


def _seconds_from(lo: int, hi: int) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        out = _to_float(value)
        if out is None or not lo <= out <= hi:  # NaN fails both comparisons
            raise ValueError(f"{name} must be a number of seconds from {lo} to {hi}, not {_show(value)}")
        return out

    return check


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, not {_show(value)}")
        return value.strip().lower()

    return check


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be true or false, not {_show(value)}")


def _integrations(name: str, value: Any) -> tuple[str, ...] | None:
    """None = all; () = none; else the named ones."""
    from leakguard.integrations import INTEGRATIONS

    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("all", "*"):
            return None
        if v in ("none", "", "off"):
            return ()
        items = [p.strip() for p in v.split(",") if p.strip()]
    elif isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in value):
        items = [p.strip().lower() for p in value]
    else:
        raise ValueError(
            f"{name} must be 'all', 'none' or a list of integration names ({', '.join(sorted(INTEGRATIONS))}), "
            f"not {_show(value)}"
        )
    unknown = [p for p in items if p not in INTEGRATIONS]
    if unknown:
        raise ValueError(
            f"{name}: unknown integration(s) {', '.join(unknown)}; known: {', '.join(sorted(INTEGRATIONS))}"
        )
    return tuple(dict.fromkeys(items))


#: Signals a dump handler may not take: uncatchable ones, and the faults whose Python-level
#: handler would return to the faulting instruction.
REFUSED_SIGNALS = ("SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL")


def _signal(name: str, value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    import signal  # its enums cost more to build than the rest of this module: only when a signal is named

    found: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            found = int(signal.Signals(value))
        except ValueError:
            pass
    elif isinstance(value, str):
        v = value.strip().upper()
        v = v if v.startswith("SIG") else "SIG" + v
        sig = getattr(signal, v, None)
        if isinstance(sig, signal.Signals):
            found = int(sig)
    refused = {int(getattr(signal, n)) for n in REFUSED_SIGNALS if hasattr(signal, n)}
    if found is None or found in refused:
        raise ValueError(
            f"{name} must be a signal name such as SIGUSR1, of a signal that can be caught"
            f" (not {', '.join(REFUSED_SIGNALS)}),"
            f" or None, not {_show(value)}"
        )
    return found


def _port_or_none(name: str, value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    return _int_range(0, 65535)(name, value)


def _int_or_none(lo: int, hi: int) -> Callable[[str, Any], int | None]:
    check = _int_range(lo, hi)

    def maybe(name: str, value: Any) -> int | None:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "auto")):
            return None
        return check(name, value)

    return maybe


def _host(name: str, value: Any) -> str:
    """An address the metrics server can bind here: an IP address of this host (v4 or v6) or ``localhost``."""
    text = value.strip() if isinstance(value, str) else ""
    ok = text.lower() == "localhost"
    if text and not ok:
        import ipaddress

        try:
            ipaddress.ip_address(text)
            ok = True
        except ValueError:
            pass
    why = ""
    if ok:
        # Bound once now, as the metrics server will (its family rule): an address of another
        # host is an error here, not a warning when the server starts.  A raw _socket.socket:
        # the socket hook records nothing of leakguard's own.
        import _socket

        try:
            probe = _socket.socket(_socket.AF_INET6 if ":" in text else _socket.AF_INET, _socket.SOCK_STREAM)
            try:
                probe.bind((text, 0))
            finally:
                probe.close()
        except OSError as exc:
            ok, why = False, f" ({exc.strerror or exc})"
    if not ok:
        raise ValueError(
            f"{name} must be an IP address of this host to bind, such as 127.0.0.1, ::1 or 0.0.0.0, or localhost,"
            f" not {_show(value)}{why}"
        )
    return text


T = TypeVar("T")


class Option:
    """One ``install()`` option: the one place its name, type, check, default and help are written.

    ``Config``'s fields, ``leakguard run``'s flags and help, the ``install()`` docstring
    and the README's options table are all made from :data:`TABLE`.
    """

    __slots__ = ("check", "default", "help", "name", "shown")

    def __init__(self, default: Any, check: Callable[[str, Any], Any], help: str, shown: str) -> None:
        self.name = ""  # the Config field it is assigned to
        self.default = default
        self.check = check  # check(name, value) -> the value, or ValueError naming the option
        self.help = help  # what it does and what it accepts, one sentence
        self.shown = shown  # the default as the docs print it

    @property
    def env(self) -> str:
        """The environment variable it is read from when install() is not given it."""
        return f"LEAKGUARD_{self.name.upper()}"

    @property
    def flag(self) -> str:
        """Its ``leakguard run`` flag."""
        return "--" + self.name.replace("_", "-")


def option(default: T, check: Callable[[str, Any], T], help: str, shown: str | None = None) -> T:
    """A field of :class:`Config` (typed as its value, as ``dataclasses.field`` is)."""
    return Option(default, check, help, str(default) if shown is None else shown)  # type: ignore[return-value]


class Config(Value):
    """The effective configuration of an install(): immutable, compared and hashed by
    value, as ``@dataclass(frozen=True)`` made it (see :class:`Value`).

    The class body is the table of options (:data:`TABLE`): each field's type, default,
    check and help, in the order ``leakguard run --help`` and the docs list them.
    """

    report_interval: float | None = option(
        None,
        _seconds_or_none,
        "seconds between periodic structlog reports, 0.01 to 31,536,000 (365 days); unset = no watcher thread"
        " (`leakguard run`: 60)",
        "unset",
    )
    stack_depth: int = option(
        48,
        _int_range(1, 1024),
        "most frames captured per socket, 1 to 1,024 (the capture stops three frames past the application's frame)",
    )
    integrations: tuple[str, ...] | None = option(
        None,
        _integrations,
        "`all`, `none`, or a comma-separated list of integration names (`leakguard doctor` lists them)",
        "`all`",
    )
    checkout_threshold: float | None = option(
        None,
        _seconds_or_none,
        "report pooled connections checked out longer than this many seconds, with the checkout stack, and again"
        " when returned (HikariCP's `leakDetectionThreshold`); 0.01 s to 365 days",
        "unset",
    )
    log_format: str = option(
        "auto",
        _choice("auto", "console", "json"),
        "`auto` (the host's structlog configuration, else readable lines on stderr), `console` or `json`",
        "`auto`",
    )
    dump_signal: int | None = option(
        None,
        _signal,
        "a signal (e.g. `SIGUSR1`) that writes a report at once; not " + ", ".join(REFUSED_SIGNALS),
        "unset",
    )
    top_sites: int = option(10, _int_range(1, 10_000), "most leak sites per report, 1 to 10,000")
    max_events_per_report: int = option(
        50, _int_range(1, 100_000), "most events per report, 1 to 100,000: a leak storm cannot flood the logs"
    )
    churn_warning: bool = option(
        True,
        _bool,
        "warn when one creation site closes connections to one peer fast enough to exhaust ephemeral ports"
        " (TIME_WAIT)",
        "on",
    )
    churn_limit: int | None = option(
        None,
        _int_or_none(1, 10_000_000),
        "closes per site and peer per 60 s that trigger the churn warning, 1 to 10,000,000",
        "half the ephemeral port range",
    )
    max_events_per_minute: int = option(120, _int_range(1, 1_000_000), "rate limit on report events, 1 to 1,000,000")
    metrics_port: int | None = option(
        None,
        _port_or_none,
        "serve Prometheus metrics on this port (0 = any free port; extra `leakguard[prometheus]`), or call"
        " `leakguard.metrics.register(registry)`",
        "unset",
    )
    metrics_addr: str = option(
        "127.0.0.1", _host, "address the metrics server binds: an IP address of this host, or `localhost`", "`127.0.0.1`"
    )

    def __init__(self, **values: Any) -> None:
        unknown = [name for name in values if name not in OPTIONS]
        if unknown:
            raise TypeError(f"Config() got an unexpected keyword argument {unknown[0]!r}")
        vars(self).update({o.name: values.get(o.name, o.default) for o in TABLE})

    def replace(self, **changes: Any) -> Config:
        """A copy with *changes* applied (``dataclasses.replace``)."""
        return Config(**{**vars(self), **changes})

    def __hash__(self) -> int:  # type: ignore[override]  # frozen: hashable, as a frozen dataclass
        return hash(self._values())

    def __setattr__(self, name: str, value: Any) -> None:
        from dataclasses import FrozenInstanceError  # what a frozen dataclass raises: an AttributeError

        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        from dataclasses import FrozenInstanceError

        raise FrozenInstanceError(f"cannot delete field {name!r}")


def _table(cls: type) -> tuple[Option, ...]:
    out = []
    for name in Config._fields:
        opt = vars(cls)[name]
        opt.name = name
        delattr(cls, name)  # an instance always has its own value
        out.append(opt)
    return tuple(out)


#: Every install() option, in order.
TABLE: tuple[Option, ...] = _table(Config)

#: option name -> validator(name, value)
OPTIONS: dict[str, Callable[[str, Any], Any]] = {o.name: o.check for o in TABLE}


def docstring_lines() -> list[str]:
    """The options as the ``install()`` docstring lists them (reST)."""
    return [f"- ``{o.name}`` (default {o.shown.strip('`')}): {o.help.replace('`', '``')}." for o in TABLE]


def readme_table() -> str:
    """The README's options table (Markdown); tests/test_config.py checks the README shows it."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    rows += [f"| `{o.name}` | {o.shown} | {o.help} |" for o in TABLE]
    return "\n".join(rows)


def parse(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Options from arguments, falling back to ``LEAKGUARD_<OPTION>``; ValueError on bad values."""
    environ = os.environ if environ is None else environ
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown leakguard option(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(sorted(OPTIONS))}"
        )
    values: dict[str, Any] = {}
    for opt in TABLE:
        name, check, env = opt.name, opt.check, opt.env
        if name in options:
            values[name] = check(name, options[name])
            continue
        if env in environ:
            try:
                values[name] = check(name, environ[env])
            except ValueError as exc:
                raise ValueError(f"environment variable {env}={_show(environ[env])}: {exc}") from None
    return Config(**values)
