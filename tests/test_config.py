"""Option validation, property-based: any value is either accepted and works, or a ValueError naming the option.

For every option, as an ``install()`` argument and as its ``LEAKGUARD_*`` variable.
The values the hostile review found (``report_interval=1e10`` killing the watcher,
``10**400`` raising OverflowError, ``5e-324`` flooding stderr, ``dump_signal='SIGKILL'``,
``metrics_addr='nan'``) are always among the examples.  A rejected value leaves the state unchanged.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import leakguard
from leakguard import _config, _sockets, registry, watcher
from leakguard.integrations import INTEGRATIONS

from .test_containment import Opaque

NAMES = sorted(_config.OPTIONS)

#: What the review tried, and their neighbours at each limit.
EDGES: list[Any] = [
    1e10, 10**400, -(10**400), 5e-324, "5e-324", "1e10", "SIGKILL", "SIGSTOP", "kill", 9, 19, 11, "SIGSEGV",
    "nan", "NaN", math.nan, math.inf, -math.inf, "inf", 0, 0.0, -0.0, "0", 1, "1", 0.01, 0.009, 365 * 86400,
    365 * 86400 + 1, 1024, 1025, 65535, 65536, 10_000_000, 10_000_001, "1" * 5000, "  7  ", "١٢", "1_0",
    "SIGUSR1", "usr2", "sigterm", 10, "localhost", "::1", "0.0.0.0", "127.0.0.1", "::", "fe80::1%lo",
    "256.0.0.1", "nan.example", "", " ", None, True, False, "true", "off", "all", "none", "requests,redis",
    ["requests"], ("redis", "httpx"), [], b"1", bytearray(b"2"), 1 + 0j, Decimal("2.5"), Decimal("nan"),
    Fraction(1, 3), Fraction(4, 1), object(), "json", "JSON", "console", "xml",
]

values = st.one_of(
    st.sampled_from(EDGES),
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(),
    st.floats(min_value=1e-9, max_value=1e9),
    st.floats().map(repr),
    st.integers().map(str),
    st.text(max_size=30),
    st.binary(max_size=8),
    st.decimals(),
    st.fractions(),
    st.complex_numbers(),
    st.lists(st.sampled_from([*INTEGRATIONS, "nosuchlib", "", " "]), max_size=3),
    st.sampled_from([s.name for s in signal.Signals]),
    st.sampled_from([int(s) for s in signal.Signals]),
)


def _checked(name: str, value: Any) -> Any:
    """Parse *value*: the accepted value, or None after checking the ValueError names the option."""
    try:
        cfg = _config.parse({name: value}, environ={})
    except ValueError as exc:
        assert name in str(exc), exc
        return _REJECTED
    return getattr(cfg, name)


_REJECTED = object()


def _assert_sane(name: str, got: Any) -> None:
    """An accepted value is of the option's type and within its documented range."""
    if name in ("report_interval", "checkout_threshold"):
        assert got is None or (type(got) is float and _config.MIN_SECONDS <= got <= _config.MAX_SECONDS), got
    elif name == "integrations":
        assert got is None or (type(got) is tuple and set(got) <= set(INTEGRATIONS)), got
    elif name == "dump_signal":
        assert got is None or (type(got) is int and got in {int(s) for s in signal.valid_signals()}), got
        assert got not in {int(getattr(signal, n)) for n in _config.REFUSED_SIGNALS}, got
    elif name == "log_format":
        assert got in ("auto", "console", "json"), got
    elif name == "churn_warning":
        assert type(got) is bool, got
    elif name == "metrics_addr":
        assert type(got) is str and got, got
        family = socket.AF_INET6 if ":" in got else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:  # it can be bound here: the server will bind it
            s.bind((got, 0))
    else:
        assert got is None or type(got) is int, got
        if got is not None:
            assert got >= 0


@pytest.mark.parametrize("name", NAMES)
class TestEveryValue:
    """Any value is either accepted (of the right type, in range, and working) or a ValueError naming the option."""

    @settings(max_examples=80, deadline=None)
    @given(value=values)
    @example(value=1e10)
    @example(value=10**400)
    @example(value=5e-324)
    @example(value="SIGKILL")
    @example(value="nan")
    def test_argument(self, name: str, value: Any) -> None:
        got = _checked(name, value)
        if got is not _REJECTED:
            _assert_sane(name, got)

    @settings(max_examples=80, deadline=None)
    @given(text=st.one_of(st.sampled_from([str(v) for v in EDGES]), st.text(max_size=30)))
    def test_environment(self, name: str, text: str) -> None:
        if "\x00" in text:
            return  # no environment variable can hold NUL
        var = f"LEAKGUARD_{name.upper()}"
        try:
            cfg = _config.parse({}, {var: text})
        except ValueError as exc:
            assert var in str(exc) and name in str(exc), exc
        else:
            _assert_sane(name, getattr(cfg, name))


class TestAcceptedValuesWork:
    """What is accepted works: the watcher runs with any accepted interval, a dump signal gets its handler."""

    @settings(max_examples=40, deadline=None)
    @given(value=st.one_of(st.sampled_from(EDGES), st.floats(), st.integers(), st.text(max_size=12)))
    @example(value=1e10)
    @example(value=365 * 86400)
    @example(value=0.01)
    def test_report_interval(self, value: Any) -> None:
        got = _checked("report_interval", value)
        if got is _REJECTED or got is None:
            return
        leakguard.install(integrations="none", report_interval=value, log_format="json")
        try:
            w = watcher.current()
            assert w is not None and w.alive
        finally:
            leakguard.uninstall()
        assert not w.alive

    @settings(max_examples=40, deadline=None)
    @given(value=st.one_of(st.sampled_from(EDGES), st.sampled_from([s.name for s in signal.Signals])))
    @example(value="SIGKILL")
    def test_dump_signal(self, value: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            pytest.skip("signal handlers need the main thread")
        sig = _checked("dump_signal", value)
        if sig is _REJECTED or sig is None:
            return
        before = signal.getsignal(sig)
        leakguard.install(integrations="none", dump_signal=value, log_format="json")
        try:
            assert signal.getsignal(sig) is watcher._on_signal
        finally:
            leakguard.uninstall()
        assert signal.getsignal(sig) is before


class TestOneTable:
    """Every place an option is written is made from the one table, ``_config.TABLE``."""

    def test_config_fields_are_the_table(self) -> None:
        assert [o.name for o in _config.TABLE] == list(_config.Config._fields) == list(_config.OPTIONS)
        assert vars(_config.Config()) == {o.name: o.default for o in _config.TABLE}
        for o in _config.TABLE:  # each default passes its own check
            assert o.check(o.name, o.default) == o.default, o.name
            assert o.env == f"LEAKGUARD_{o.name.upper()}"

    def test_readme_shows_the_table(self) -> None:
        # The README's options table is _config.readme_table(), verbatim (regenerate it from there).
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        assert _config.readme_table() in readme

    def test_install_docstring_lists_every_option(self) -> None:
        doc = leakguard.install.__doc__ or ""
        for o in _config.TABLE:
            assert f"``{o.name}`` (default " in doc, o.name
        assert "{options}" not in doc

    def test_run_flags_and_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        from leakguard import cli

        with pytest.raises(SystemExit) as exc:
            cli.main(["run", "--help"])
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for o in _config.TABLE:
            assert f"{o.flag} VALUE" in text and f"[{o.env}]" in text, o.name
        assert cli.main(["run", "--stack-depth", "0", "--", "true"]) == 2  # a flag's value goes through its check
        assert "--stack-depth: stack_depth must be an integer from 1 to 1024" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input

_GENERIC_BAD: list[Any] = [Opaque(), {"a": 1}, b"\xff", 1 + 2j, ["x"]]


#: per option: wrong values of a plausible type
_BAD_VALUES: dict[str, list[Any]] = {
    "report_interval": [-1, 0, math.nan, math.inf, "soon", True],
    "stack_depth": [0, -3, 1025, 2.5, "deep", True, math.nan],
    "integrations": ["nosuchlib", ["requests", "nosuchlib"], [1, 2], 5],
    "checkout_threshold": [-0.5, math.nan, "long", False],
    "log_format": ["xml", "", 1],
    "dump_signal": ["SIGNOPE", 99999, -1, 1.5, True],
    "top_sites": [0, -1, 10_001, "many", 2.5],
    "max_events_per_report": [0, -1, 100_001, "lots"],
    "churn_warning": ["maybe", 2, -1, 0.5],
    "churn_limit": [0, -5, "fast", 2.5],
    "max_events_per_minute": [0, -1, "x"],
    "metrics_port": [-1, 65536, "http", 1.5, True],
    "metrics_addr": ["", "a b", 127, None],
}


_GOOD_ENV: dict[str, str] = {
    "report_interval": "2.5",
    "stack_depth": "12",
    "integrations": "requests,redis",
    "checkout_threshold": "30",
    "log_format": "JSON",
    "dump_signal": "usr1",
    "top_sites": "3",
    "max_events_per_report": "7",
    "churn_warning": "off",
    "churn_limit": "500",
    "max_events_per_minute": "60",
    "metrics_port": "none",
    "metrics_addr": "::1",
}


def _bad_cases() -> list[tuple[str, Any]]:
    out = []
    for name in _config.OPTIONS:
        for value in _GENERIC_BAD + _BAD_VALUES.get(name, []):
            out.append((name, value))
    return out


class TestBadInput:
    """Every option rejects wrong types and values with a ValueError naming it; the state is unchanged."""

    def test_every_option_is_covered(self) -> None:
        assert set(_BAD_VALUES) == set(_config.OPTIONS) == set(_GOOD_ENV)

    @pytest.mark.parametrize(("name", "value"), _bad_cases(), ids=lambda v: repr(v)[:20])
    def test_bad_value(self, name: str, value: Any) -> None:
        with pytest.raises(ValueError, match=name):
            leakguard.install(**{name: value})
        assert not leakguard.installed()
        assert vars(socket.socket)["__init__"] is _sockets._original_init

    def test_bad_value_keeps_previous_install(self) -> None:
        leakguard.install(integrations="none", top_sites=4)
        try:
            with pytest.raises(ValueError, match="top_sites"):
                leakguard.install(integrations="none", top_sites=0)
            assert leakguard.installed() and leakguard.get_config().top_sites == 4
            with socket.socket() as s:
                assert registry.get(s.fileno()) is not None
        finally:
            leakguard.uninstall()

    @pytest.mark.parametrize("name", sorted(_config.OPTIONS))
    def test_good_environment_values(self, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(f"LEAKGUARD_{name.upper()}", _GOOD_ENV[name])
        cfg = _config.parse({})
        assert getattr(cfg, name) != getattr(_config.Config(), name) or name in ("metrics_port",)

    @pytest.mark.parametrize(
        ("name", "value"),
        [(n, v) for n, vals in _BAD_VALUES.items() for v in vals if isinstance(v, str)]
        + [(n, "garbage\u2603") for n in _config.OPTIONS if n != "metrics_addr"],
        ids=lambda v: repr(v)[:20],
    )
    def test_bad_environment_variable(self, name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
        var = f"LEAKGUARD_{name.upper()}"
        with pytest.raises(ValueError) as caught:
            _config.parse({}, {var: value})
        assert var in str(caught.value) and name in str(caught.value)
        monkeypatch.setenv(var, value)
        with pytest.raises(ValueError, match=var):
            leakguard.install()
        assert not leakguard.installed()

    @pytest.mark.parametrize(
        ("var", "value"),
        [("LEAKGUARD_REPORT_INTERVAL", "-3"), ("LEAKGUARD_INTEGRATIONS", "nosuchlib"), ("LEAKGUARD_LOG_FORMAT", "xml")],
    )
    def test_leakguard_run_bad_variable(self, var: str, value: str) -> None:
        env = {**os.environ, var: value}
        proc = subprocess.run(
            [sys.executable, "-m", "leakguard", "run", "--", sys.executable, "-c", "print('ran')"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 2, proc
        assert "ran" not in proc.stdout
        assert var in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.count("\n") <= 2  # one clear line, not a wall of text

    @pytest.mark.parametrize(("flag", "value"), [("--report-interval", "-3"), ("--stack-depth", "zero")])
    def test_leakguard_run_bad_flag(self, flag: str, value: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "leakguard", "run", flag, value, "--", sys.executable, "-c", "print('ran')"],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr
