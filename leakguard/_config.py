"""install() options: parsing, validation, ``LEAKGUARD_*`` environment fallback."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ._value import Value

__all__ = ["Config", "OPTIONS", "parse"]


def _positive_or_none(name: str, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off", "0")):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}") from None
    if not (out > 0) or out != out or out == float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
    return out


def _int_range(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be an integer from {lo} to {hi}, not {value!r}")
        try:
            out = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            out = None
        if out is None or not lo <= out <= hi:
            raise ValueError(f"{name} must be an integer from {lo} to {hi}, not {value!r}")
        return out

    return check


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
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
    raise ValueError(f"{name} must be true or false, not {value!r}")


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
            f"not {value!r}"
        )
    unknown = [p for p in items if p not in INTEGRATIONS]
    if unknown:
        raise ValueError(
            f"{name}: unknown integration(s) {', '.join(unknown)}; known: {', '.join(sorted(INTEGRATIONS))}"
        )
    return tuple(dict.fromkeys(items))


def _signal(name: str, value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    import signal  # its enums cost more to build than the rest of this module: only when a signal is named

    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return int(signal.Signals(value))
        except ValueError:
            pass
    if isinstance(value, str):
        v = value.strip().upper()
        v = v if v.startswith("SIG") else "SIG" + v
        sig = getattr(signal, v, None)
        if isinstance(sig, signal.Signals):
            return int(sig)
    raise ValueError(f"{name} must be a signal name such as SIGUSR1, or None, not {value!r}")


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
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
        raise ValueError(f"{name} must be an address to bind such as 127.0.0.1, not {value!r}")
    return value.strip()


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
    "report_interval": _positive_or_none,
    "stack_depth": _int_range(1, 1024),
    "integrations": _integrations,
    "checkout_threshold": _positive_or_none,
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
                raise ValueError(f"environment variable {env}={environ[env]!r}: {exc}") from None
    return Config(**values)
