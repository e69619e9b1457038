"""leakguard.no_leaks / LeakError: the test-framework-neutral check (unittest, a plain script, async code)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import leakguard
from leakguard import diagnose

from .helpers import HangUpServer, this_line

PY = sys.executable
KEEP: list[object] = []  # a module global: what the blocks below forget on purpose


@pytest.fixture(autouse=True)
def patient(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(diagnose, "BUDGET_SECONDS", 120.0)  # a loaded machine: the object budget decides
    try:
        yield
    finally:
        while KEEP:
            obj = KEEP.pop()
            close = getattr(obj, "close", None)
            if close is not None:
                close()


@pytest.fixture
def server() -> Iterator[HangUpServer]:
    with HangUpServer() as srv:
        yield srv


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LEAKGUARD_") and k != "PYTHONPATH"}


class TestNoLeaks:
    """A socket opened in the block and still open at its end raises LeakError naming its line, state, peer, verdict."""

    def test_leak_raises_with_site_state_peer_and_verdict(self, server: HangUpServer) -> None:
        with pytest.raises(leakguard.LeakError) as err:
            with leakguard.no_leaks(grace=0.2):
                KEEP.append(socket.create_connection(server.address))
                line = this_line() - 1
                KEEP[-1].recv(1)  # type: ignore[attr-defined]  # b"": the server hung up
        (leak,) = err.value.leaks
        assert isinstance(err.value, AssertionError)
        assert leak.state == "CLOSE_WAIT" and leak.remote == f"{server.host}:{server.port}"
        assert leak.verdict == "forgotten" and leak.held_by == ["tests.test_checks.KEEP[0]"]
        text = str(err.value)
        assert f"test_checks.py:{line}: tcp CLOSE_WAIT peer {server.host}:{server.port}" in text
        assert "verdict forgotten" in text and "held by tests.test_checks.KEEP[0]" in text

    def test_a_local_of_the_block_is_held_not_in_use(self, server: HangUpServer) -> None:
        with pytest.raises(leakguard.LeakError) as err:
            with leakguard.no_leaks(grace=0.05):
                conn = socket.create_connection(server.address)
        try:
            (leak,) = err.value.leaks
            assert leak.verdict == "forgotten", leak.verdict_reason
            assert "test_a_local_of_the_block_is_held_not_in_use() local conn" in leak.held_by
        finally:
            conn.close()

    def test_clean_block_and_sockets_from_before(self, server: HangUpServer) -> None:
        before = socket.create_connection(server.address)
        try:
            with leakguard.no_leaks(grace=0.05):
                with socket.create_connection(server.address):
                    pass
        finally:
            before.close()

    def test_closed_during_grace_is_not_reported(self, server: HangUpServer) -> None:
        with leakguard.no_leaks(grace=3.0):
            conn = socket.create_connection(server.address)
            closer = threading.Timer(0.1, conn.close)
            closer.start()
        closer.join()

    def test_ignore_globs(self, server: HangUpServer) -> None:
        with leakguard.no_leaks(grace=0.05, ignore=["*test_checks.py:*"]):
            KEEP.append(socket.create_connection(server.address))
        with leakguard.no_leaks(grace=0.05, ignore=["socket"]):  # by origin
            KEEP.append(socket.create_connection(server.address))

    def test_nested(self, server: HangUpServer) -> None:
        with pytest.raises(leakguard.LeakError) as outer:
            with leakguard.no_leaks(grace=0.05):
                KEEP.append(socket.create_connection(server.address))
                first = this_line() - 1
                with pytest.raises(leakguard.LeakError) as inner:
                    with leakguard.no_leaks(grace=0.05):
                        KEEP.append(socket.create_connection(server.address))
                        second = this_line() - 1
        assert [i.site_str for i in inner.value.leaks] == [f"tests/test_checks.py:{second}"]
        assert sorted(i.site_str for i in outer.value.leaks) == sorted(
            [f"tests/test_checks.py:{first}", f"tests/test_checks.py:{second}"]
        )

    def test_the_block_raising_is_not_masked(self, server: HangUpServer) -> None:
        with pytest.raises(KeyError):
            with leakguard.no_leaks(grace=0.05):
                KEEP.append(socket.create_connection(server.address))
                raise KeyError("mine")

    def test_installs_for_the_block_only(self, server: HangUpServer) -> None:
        assert not leakguard.installed()
        with pytest.raises(leakguard.LeakError):
            with leakguard.no_leaks(grace=0.05):
                assert leakguard.installed()
                KEEP.append(socket.create_connection(server.address))
        assert not leakguard.installed()

    def test_keeps_an_existing_installation(self, installed: None, server: HangUpServer) -> None:
        with leakguard.no_leaks(grace=0.05):
            pass
        assert leakguard.installed()

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"grace": -1}, "grace: expected a number of seconds >= 0, got -1"),
            ({"grace": "1"}, "grace: expected a number of seconds >= 0, got '1'"),
            ({"ignore": "*.py"}, "ignore: expected a list of glob patterns, got the string"),
            ({"ignore": [1]}, r"ignore: expected glob patterns \(str\), got 1"),
        ],
    )
    def test_bad_arguments(self, kwargs: dict[str, object], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            leakguard.no_leaks(**kwargs)  # type: ignore[arg-type]


class TestDecorator:
    """As a decorator on sync and async functions; each call is checked on its own."""

    def test_sync(self, server: HangUpServer) -> None:
        @leakguard.no_leaks(grace=0.05)
        def leaky() -> int:
            KEEP.append(socket.create_connection(server.address))
            return 7

        @leakguard.no_leaks(grace=0.05)
        def clean() -> int:
            with socket.create_connection(server.address):
                return 8

        assert clean() == 8 and clean.__name__ == "clean"
        with pytest.raises(leakguard.LeakError):
            leaky()

    def test_async(self, server: HangUpServer) -> None:
        @leakguard.no_leaks(grace=0.5)
        async def leaky() -> None:
            _, writer = await asyncio.open_connection(*server.address)
            KEEP.append(writer)  # a StreamWriter freed unclosed closes its transport (3.11.5+): keep it

        @leakguard.no_leaks(grace=0.5)
        async def clean() -> str:
            _, writer = await asyncio.open_connection(*server.address)
            writer.close()  # the transport closes its socket on a later loop iteration: the grace lets it
            return "ok"

        assert asyncio.iscoroutinefunction(leaky)
        assert asyncio.run(clean()) == "ok"

        async def main() -> None:
            with pytest.raises(leakguard.LeakError) as err:
                await leaky()
            (leak,) = err.value.leaks
            assert leak.held_by and leak.held_by[0].startswith("tests.test_checks.KEEP[0]"), leak.held_by
            writer = KEEP.pop()
            writer.close()  # type: ignore[attr-defined]
            await writer.wait_closed()  # type: ignore[attr-defined]

        asyncio.run(main())


class TestFreshInterpreter:
    """unittest and a plain script get what pytest users get."""

    def run(self, tmp_path: Path, name: str, source: str, *args: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / name).write_text(textwrap.dedent(source))
        return subprocess.run(
            [PY, "-W", "error", *args], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60
        )

    def test_unittest(self, tmp_path: Path) -> None:
        r = self.run(
            tmp_path,
            "test_app.py",
            """\
            import socket, unittest
            import leakguard

            KEEP = []

            class T(unittest.TestCase):
                def setUp(self):
                    self.srv = socket.socket()
                    self.srv.bind(("127.0.0.1", 0))
                    self.srv.listen()
                    self.addCleanup(self.srv.close)

                def test_leaks(self):
                    with leakguard.no_leaks(grace=0.05):
                        KEEP.append(socket.create_connection(self.srv.getsockname()))  # LEAK

                @leakguard.no_leaks(grace=0.05)
                def test_clean(self):
                    with socket.create_connection(self.srv.getsockname()):
                        pass

                @classmethod
                def tearDownClass(cls):
                    for s in KEEP:
                        s.close()
            """,
            "-m",
            "unittest",
            "-v",
            "test_app",
        )
        assert "test_clean (test_app.T" in r.stderr and "ok" in r.stderr
        assert "FAIL: test_leaks (test_app.T" in r.stderr, r.stderr
        assert "leakguard.checks.LeakError: 1 socket opened in this block is still open:" in r.stderr
        assert "test_app.py:15: tcp ESTABLISHED peer 127.0.0.1:" in r.stderr
        assert "verdict forgotten, held by test_app.KEEP[0]" in r.stderr
        assert "FAILED (failures=1)" in r.stderr

    def test_plain_script(self, tmp_path: Path) -> None:
        r = self.run(
            tmp_path,
            "script.py",
            """\
            import socket, threading
            import leakguard

            srv = socket.socket()
            srv.bind(("127.0.0.1", 0))
            srv.listen()
            threading.Thread(target=lambda: srv.accept()[0].close(), daemon=True).start()
            try:
                with leakguard.no_leaks(grace=0.2):
                    conn = socket.create_connection(srv.getsockname())  # LEAK
                    conn.recv(1)
            except leakguard.LeakError as exc:
                (leak,) = exc.leaks
                print(leak.site_str, leak.state, leak.verdict, leak.held_by)
            conn.close()
            srv.close()
            """,
            "script.py",
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split(" ", 3) == ["script.py:10", "CLOSE_WAIT", "forgotten", "['__main__.conn']\n"]
        assert r.stderr == ""
