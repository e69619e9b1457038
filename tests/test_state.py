"""install() and uninstall() (leakguard._state, leakguard._patch): idempotent, configurable, in any order and
number; uninstall() restores the exact originals."""

from __future__ import annotations

import errno
import io
import socket
import sys
import threading

import pytest

import leakguard
from leakguard import _sockets, registry

from .helpers import HangUpServer, wait_for


class TestInstallUninstall:
    """install() is idempotent and configurable; uninstall() restores socket exactly."""

    def test_round_trip_restores_socket(self) -> None:
        before_cls = dict(vars(socket.socket))
        before_mod = dict(vars(socket))
        meta = list(sys.meta_path)
        for _ in range(2):
            leakguard.install()
            leakguard.install(stack_depth=10)
            assert socket.socket.__init__ is not before_cls["__init__"]
            leakguard.uninstall()
            leakguard.uninstall()
        assert vars(socket.socket) == before_cls
        assert all(vars(socket.socket)[k] is v for k, v in before_cls.items())
        assert all(vars(socket)[k] is v for k, v in before_mod.items())
        assert sys.meta_path == meta
        assert registry.stats()["records"] == 0

    def test_uninstall_without_install(self) -> None:
        leakguard.uninstall()
        assert not leakguard.installed()

    def test_reconfigure(self) -> None:
        leakguard.install(stack_depth=5)
        try:
            assert leakguard.get_config().stack_depth == 5
            leakguard.install(stack_depth=7)
            assert leakguard.get_config().stack_depth == 7
        finally:
            leakguard.uninstall()

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("report_interval", -1),
            ("report_interval", "soon"),
            ("report_interval", True),
            ("stack_depth", 0),
            ("stack_depth", "deep"),
            ("integrations", ["nosuchlib"]),
            ("integrations", 3),
            ("log_format", "xml"),
            ("dump_signal", "SIGNOPE"),
            ("checkout_threshold", float("nan")),
        ],
    )
    def test_bad_option_value(self, option: str, value: object) -> None:
        with pytest.raises(ValueError, match=option):
            leakguard.install(**{option: value})
        assert not leakguard.installed()

    def test_unknown_option(self) -> None:
        with pytest.raises(ValueError, match="unknown leakguard option"):
            leakguard.install(repot_interval=3)

    def test_environment_fallback(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("LEAKGUARD_STACK_DEPTH", "9")
        leakguard.install()
        try:
            assert leakguard.get_config().stack_depth == 9
            leakguard.install(stack_depth=11)  # an explicit argument wins
            assert leakguard.get_config().stack_depth == 11
        finally:
            leakguard.uninstall()

    def test_bad_environment_value(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("LEAKGUARD_REPORT_INTERVAL", "often")
        with pytest.raises(ValueError, match="LEAKGUARD_REPORT_INTERVAL"):
            leakguard.install()

    def test_concurrent_install(self) -> None:
        original = vars(socket.socket)["__init__"]
        threads = [threading.Thread(target=leakguard.install) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        leakguard.uninstall()
        assert vars(socket.socket)["__init__"] is original


class TestLifecycle:
    """install/uninstall in any order and number is fine; uninstall restores the exact originals."""

    def test_any_order(self) -> None:
        original = vars(socket.socket)["__init__"]
        leakguard.uninstall()  # without install
        leakguard.uninstall()
        leakguard.install(integrations="none")
        leakguard.install(integrations="none")  # twice
        assert leakguard.installed()
        leakguard.uninstall()
        leakguard.uninstall()  # twice
        assert vars(socket.socket)["__init__"] is original
        assert not leakguard.installed()
        leakguard.install(integrations="none", report_interval=0.05)  # after uninstall
        try:
            with socket.socket() as s:
                assert registry.get(s.fileno()) is not None
        finally:
            leakguard.uninstall()
        assert vars(socket.socket)["__init__"] is original
        from leakguard import watcher

        assert not watcher.running()

    def test_integrations_restored(self) -> None:
        pytest.importorskip("requests")
        import urllib3.connection

        before = vars(urllib3.connection.HTTPConnection)["_new_conn"]
        for _ in range(3):
            leakguard.install()
            leakguard.install(integrations=["requests"])
            leakguard.uninstall()
            assert vars(urllib3.connection.HTTPConnection)["_new_conn"] is before

    def test_install_uninstall_race(self) -> None:
        """Threads installing, uninstalling and opening sockets at once: no exception, consistent end state."""
        errors: list[BaseException] = []
        stop = threading.Event()

        def flip() -> None:
            try:
                for i in range(40):
                    if i % 2:
                        leakguard.uninstall()
                    else:
                        leakguard.install(integrations="none")
            except BaseException as exc:  # pragma: no cover - the failure we look for
                errors.append(exc)

        def churn() -> None:
            try:
                while not stop.is_set():
                    socket.socket().close()
                    leakguard.snapshot()
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)

        flippers = [threading.Thread(target=flip) for _ in range(4)]
        churners = [threading.Thread(target=churn) for _ in range(2)]
        for t in churners + flippers:
            t.start()
        for t in flippers:
            t.join(60)
        stop.set()
        for t in churners:
            t.join(60)
        leakguard.uninstall()
        assert errors == []
        assert vars(socket.socket)["__init__"] is _sockets._original_init

    def test_output_redirect_survives(self) -> None:
        """A host that replaced sys.stderr with something odd still gets no exception from reports."""

        class Broken(io.TextIOBase):
            def write(self, s: str) -> int:
                raise OSError(errno.EPIPE, "broken pipe")

        old = sys.stderr
        sys.stderr = Broken()
        try:
            leakguard.install(integrations="none", report_interval=0.02, log_format="console")
            from leakguard import watcher

            w = watcher.current()
            assert w is not None
            with HangUpServer() as srv:
                s = socket.create_connection(srv.address)
                try:
                    ticks = w.ticks
                    assert wait_for(lambda: w.ticks >= ticks + 3)
                finally:
                    s.close()
        finally:
            leakguard.uninstall()
            sys.stderr = old
