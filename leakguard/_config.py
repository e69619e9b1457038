"""install() options: parsing, validation, ``LEAKGUARD_*`` environment fallback."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ._value import Value

__all__ = ["Config", "OPTIONS", "parse"]


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


class Config(Value):
    """The effective configuration of an install(): immutable, compared and hashed by
    value, as ``@dataclass(frozen=True)`` made it (see :class:`Value`)."""

    report_interval: float | None
    stack_depth: int
    integrations: tuple[str, ...] | None
    checkout_threshold: float | None
    log_format: str
    dump_signal: int | None
    top_sites: int
    max_events_per_report: int
    churn_warning: bool
    churn_limit: int | None  # closes per site per 60 s; None = half of ip_local_port_range
    max_events_per_minute: int
    metrics_port: int | None
    metrics_addr: str

    def __init__(
        self,
        report_interval: float | None = None,
        stack_depth: int = 48,
        integrations: tuple[str, ...] | None = None,
        checkout_threshold: float | None = None,
        log_format: str = "auto",
        dump_signal: int | None = None,
        top_sites: int = 10,
        max_events_per_report: int = 50,
        churn_warning: bool = True,
        churn_limit: int | None = None,
        max_events_per_minute: int = 120,
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
    ) -> None:
        vars(self).update(
            report_interval=report_interval,
            stack_depth=stack_depth,
            integrations=integrations,
            checkout_threshold=checkout_threshold,
            log_format=log_format,
            dump_signal=dump_signal,
            top_sites=top_sites,
            max_events_per_report=max_events_per_report,
            churn_warning=churn_warning,
            churn_limit=churn_limit,
            max_events_per_minute=max_events_per_minute,
            metrics_port=metrics_port,
            metrics_addr=metrics_addr,
        )

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


#: option name -> validator(name, value)
OPTIONS: dict[str, Callable[[str, Any], Any]] = {
    "report_interval": _seconds_or_none,
    "stack_depth": _int_range(1, 1024),
    "integrations": _integrations,
    "checkout_threshold": _seconds_or_none,
    "log_format": _choice("auto", "console", "json"),
    "dump_signal": _signal,
    "top_sites": _int_range(1, 10_000),
    "max_events_per_report": _int_range(1, 100_000),
    "churn_warning": _bool,
    "churn_limit": _int_or_none(1, 10_000_000),
    "max_events_per_minute": _int_range(1, 1_000_000),
    "metrics_port": _port_or_none,
    "metrics_addr": _host,
}


def parse(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Options from arguments, falling back to ``LEAKGUARD_<OPTION>``; ValueError on bad values."""
    environ = os.environ if environ is None else environ
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown leakguard option(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(sorted(OPTIONS))}"
        )
    values: dict[str, Any] = {}
    for name, check in OPTIONS.items():
        if name in options:
            values[name] = check(name, options[name])
            continue
        env = f"LEAKGUARD_{name.upper()}"
        if env in environ:
            try:
                values[name] = check(name, environ[env])
            except ValueError as exc:
                raise ValueError(f"environment variable {env}={_show(environ[env])}: {exc}") from None
    return Config(**values)
