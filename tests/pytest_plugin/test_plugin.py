"""The pytest plugin, run on small generated test suites in a fresh pytest process each.

Every inner run is a subprocess (``runpytest_subprocess``): the plugin installs
leakguard and hooks ``socket`` in the process it runs in, which must not be
this test session's own.
"""

from __future__ import annotations

import os
import re

import pytest

# Plugins the inner runs do not need: hypothesis' alone costs seconds per run here.
_BASE = ("-p", "no:hypothesispytest", "-p", "no:cacheprovider", "-p", "no:randomly")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LEAKGUARD_"):
            monkeypatch.delenv(name)


def run(pytester: pytest.Pytester, *args: str, on: bool = True) -> pytest.RunResult:
    flags = ("--leakguard",) if on else ()
    return pytester.runpytest_subprocess(*_BASE, *flags, *args, timeout=120)


def line_of(source: str, marker: str) -> int:
    """1-based line number of the line containing *marker* in *source*."""
    for n, line in enumerate(source.splitlines(), 1):
        if marker in line:
            return n
    raise AssertionError(f"{marker!r} not in source")


LEAKY = """\
import socket

KEEP = []

def test_leaks():
    s = socket.socket()  # LEAK
    KEEP.append(s)

def test_clean():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
"""

CLOSE_WAIT = """\
import socket

KEEP = []

def test_close_wait():
    srv = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(srv.getsockname())  # CONNECT
    conn, _ = srv.accept()
    conn.close()
    srv.close()
    KEEP.append(client)
"""

SERVER_CONFTEST = """\
import http.server
import socket
import threading

import pytest


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: pooled client connections stay open

    def do_GET(self):
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def http_url():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    t.join(5)


class Echo:
    \"\"\"A session-wide TCP server that keeps every accepted connection until teardown.\"\"\"

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.accepted = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if conn.recv(1) == b"":
                conn.close()
                return
            self.accepted.append(conn)

    def close(self):
        with socket.create_connection(self.address):
            pass  # wakes accept(); the empty read tells serve() to stop
        self.thread.join(5)
        self.listener.close()
        for c in self.accepted:
            c.close()


@pytest.fixture(scope="session")
def echo():
    server = Echo()
    yield server
    server.close()
"""


class TestSwitch:
    """Off unless --leakguard, ini `leakguard = true` or LEAKGUARD_PYTEST=1; the header says it is on."""

    def test_off_by_default(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_leaky=LEAKY)
        result = run(pytester, on=False)
        result.assert_outcomes(passed=2)
        result.stdout.no_fnmatch_line("leakguard: on*")
        result.stdout.no_fnmatch_line("leakguard (*")

    def test_flag_turns_it_on_and_the_header_names_the_mode(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_leaky=LEAKY)
        result = run(pytester, "--leakguard-mode=fail", "--leakguard-grace=0.1")
        result.stdout.fnmatch_lines(["leakguard: on (mode=fail, gc=warn, grace=0.1s)"])
        result.assert_outcomes(passed=1, failed=1)

    def test_ini_turns_it_on(self, pytester: pytest.Pytester) -> None:
        pytester.makeini("[pytest]\nleakguard = true\nleakguard_mode = warn\n")
        pytester.makepyfile(test_leaky=LEAKY)
        result = run(pytester, "--strict-config", on=False)
        result.stdout.fnmatch_lines(["leakguard: on (mode=warn*"])
        result.assert_outcomes(passed=2)

    def test_environment_turns_it_on(self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("LEAKGUARD_PYTEST", "1")
        monkeypatch.setenv("LEAKGUARD_PYTEST_GC", "off")
        pytester.makepyfile(test_leaky=LEAKY)
        result = run(pytester, on=False)
        result.stdout.fnmatch_lines(["leakguard: on (mode=fail, gc=off*"])
        result.assert_outcomes(passed=1, failed=1)

    def test_bad_setting_is_a_usage_error_naming_it(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_leaky=LEAKY)
        result = run(pytester, "--leakguard-mode=loud")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*leakguard: --leakguard-mode must be one of fail, warn, not 'loud'*"])


class TestSettings:
    """Each setting comes from its flag, else its environment variable, else its ini option."""

    def test_flag_beats_environment_beats_ini(self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
        from leakguard.pytest_plugin import load_settings

        pytester.makeini(
            "[pytest]\nleakguard = false\nleakguard_mode = warn\nleakguard_gc = fail\nleakguard_grace = 2\n"
            "leakguard_ignore =\n    a.py:*\n"
        )
        assert load_settings(pytester.parseconfig()) == (False, "warn", "fail", 2.0, ("a.py:*",))
        monkeypatch.setenv("LEAKGUARD_PYTEST", "yes")
        monkeypatch.setenv("LEAKGUARD_PYTEST_MODE", "fail")
        monkeypatch.setenv("LEAKGUARD_PYTEST_IGNORE", "b.py:1,127.0.0.1:*")
        settings = load_settings(pytester.parseconfig("--leakguard-gc=off", "--leakguard-ignore=c.py:*"))
        assert settings == (True, "fail", "off", 2.0, ("a.py:*", "b.py:1", "127.0.0.1:*", "c.py:*"))

    @pytest.mark.parametrize(
        ("args", "env", "message"),
        [
            (("--leakguard-grace=soon",), {}, "--leakguard-grace must be a number of seconds"),
            ((), {"LEAKGUARD_PYTEST_GC": "later"}, "environment variable LEAKGUARD_PYTEST_GC must be one of warn"),
            ((), {"LEAKGUARD_PYTEST": "maybe"}, "environment variable LEAKGUARD_PYTEST must be true or false"),
        ],
    )
    def test_bad_values_name_the_setting(
        self,
        pytester: pytest.Pytester,
        monkeypatch: pytest.MonkeyPatch,
        args: tuple[str, ...],
        env: dict[str, str],
        message: str,
    ) -> None:
        from leakguard.pytest_plugin import load_settings

        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(pytest.UsageError, match=re.escape(message)):
            load_settings(pytester.parseconfig(*args))


class TestTestLeaks:
    """A socket a test opened and left open fails that test, naming state, peer and the exact line."""

    def test_leaking_test_fails_naming_its_line(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_leaky=LEAKY)
        line = line_of(LEAKY, "# LEAK")
        result = run(pytester)
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(
            [
                "*_ test_leaks _*",
                f"leakguard: this test left 1 socket open, created at test_leaky.py:{line} (*",
                f"Leaked tcp socket created at test_leaky.py:{line}, in *",
                "  origin socket, *fd *",
                "  fix: close it: *",
                "  created by:",
                f'    File "test_leaky.py", line {line}, in test_leaks  <- the test',
                "*leakguard (fail mode): 2 tests checked, 1 leaked socket in 1 test*",
            ]
        )
        result.stdout.fnmatch_lines(["FAILED test_leaky.py::test_leaks - leakguard: this test left 1*"])
        # The test runner's own frames are not part of "the relevant stack".
        assert "_pytest" not in result.stdout.str()

    def test_failed_and_xfail_tests_are_not_judged(self, pytester: pytest.Pytester) -> None:
        # A test that failed (or is expected to) has its own report: leakguard adds nothing to it.
        pytester.makepyfile(
            test_outcomes="""
            import socket
            import pytest

            kept = []

            def test_fails_and_leaks():
                kept.append(socket.socket())
                assert False, "its own failure"

            @pytest.mark.xfail(reason="known")
            def test_xfail_leaks():
                kept.append(socket.socket())
                assert False

            def test_after_leaks():
                kept.append(socket.socket())  # LEAK
            """
        )
        result = run(pytester, "-rA")
        result.assert_outcomes(failed=2, xfailed=1)
        result.stdout.fnmatch_lines(["FAILED test_outcomes.py::test_fails_and_leaks - AssertionError: its own failure*"])
        result.stdout.fnmatch_lines(["FAILED test_outcomes.py::test_after_leaks - leakguard: this test left 1*"])
        result.stdout.no_fnmatch_line("*test_fails_and_leaks - leakguard*")
        result.stdout.no_fnmatch_line("ERROR*")

    def test_close_wait_says_the_peer_closed_it(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_cw=CLOSE_WAIT)
        line = line_of(CLOSE_WAIT, "# CONNECT")
        result = run(pytester)
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                f"leakguard: this test left 1 socket open, created at test_cw.py:{line} (CLOSE_WAIT, peer 127.0.0.1:*)",
                f"Leaked tcp socket created at test_cw.py:{line}, in CLOSE_WAIT (the peer closed it, your code never did)",
                "  origin socket, peer 127.0.0.1:*, local 127.0.0.1:*, age *s, fd *",
                "  why: peer 127.0.0.1:* closed the connection; this process never closed its end*",
            ]
        )

    def test_function_fixture_leak_is_the_tests(self, pytester: pytest.Pytester) -> None:
        source = """\
import socket
import pytest

KEEP = []

@pytest.fixture
def conn():
    s = socket.socket()  # FIXTURE LINE
    KEEP.append(s)
    yield s

def test_uses_it(conn):
    pass
"""
        pytester.makepyfile(test_fn=source)
        result = run(pytester)
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [f"leakguard: this test left 1 socket open, created at test_fn.py:{line_of(source, '# FIXTURE LINE')} (*"]
        )

    def test_a_leak_never_fails_another_test(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(
            test_order="""
            import socket
            KEEP = []

            def test_a_leaks():
                KEEP.append(socket.socket())

            def test_b_opens_and_closes():
                s = socket.socket()
                s.close()

            def test_c_uses_the_leaked_one():
                assert KEEP[0].fileno() >= 0
            """
        )
        result = run(pytester, "-v")
        result.stdout.fnmatch_lines(
            [
                "*test_a_leaks FAILED*",
                "*test_b_opens_and_closes PASSED*",
                "*test_c_uses_the_leaked_one PASSED*",
            ]
        )
        result.assert_outcomes(passed=2, failed=1)

    def test_clean_tests_pass(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(
            test_clean="""
            import asyncio, socket, threading

            def test_context_managers():
                with socket.create_server(("127.0.0.1", 0)) as srv:
                    with socket.create_connection(srv.getsockname()) as c:
                        conn, _ = srv.accept()
                        with conn:
                            c.sendall(b"x")
                            assert conn.recv(1) == b"x"

            def test_socketpair_and_udp():
                a, b = socket.socketpair()
                a.close(); b.close()
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                u.close()

            def test_closed_by_a_thread_a_moment_later():
                s = socket.socket()
                threading.Timer(0.05, s.close).start()  # closing: the grace period covers it

            def test_asyncio_run():
                async def main():
                    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
                    port = server.sockets[0].getsockname()[1]
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    await reader.read()
                    writer.close()
                    await writer.wait_closed()
                    server.close()
                    await server.wait_closed()
                asyncio.run(main())

            def test_fork():
                import os
                s = socket.socket()
                pid = os.fork()
                if pid == 0:
                    s.close()
                    socket.socket().close()
                    os._exit(0)
                assert os.waitpid(pid, 0)[1] == 0
                s.close()
            """
        )
        result = run(pytester, "-W", "error")
        result.assert_outcomes(passed=5)
        result.stdout.fnmatch_lines(["*leakguard (fail mode): 5 tests checked, 0 leaked sockets in 0 tests*"])


FIXTURE_SCOPES = """\
import socket
import pytest

@pytest.fixture(scope="session")
def session_sock():
    s = socket.socket()
    yield s
    s.close()

@pytest.fixture(scope="package")
def package_sock():
    s = socket.socket()
    yield s
    s.close()

@pytest.fixture(scope="module")
def module_pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()

@pytest.fixture(scope="class")
def class_sock(request):
    s = socket.socket()
    request.addfinalizer(s.close)
    return s

@pytest.fixture
def function_sock():
    with socket.socket() as s:
        yield s
"""


class TestFixtures:
    """Sockets of class-, module-, package- and session-scoped fixtures belong to the fixture, judged at its teardown."""

    def test_fixture_sockets_of_every_scope_pass(self, pytester: pytest.Pytester) -> None:
        pytester.makeconftest(FIXTURE_SCOPES)
        pkg = pytester.mkpydir("pkg")
        (pkg / "test_in_pkg.py").write_text(
            "class TestA:\n"
            "    def test_one(self, session_sock, package_sock, module_pair, class_sock, function_sock):\n"
            "        pass\n"
            "    def test_two(self, class_sock, module_pair):\n"
            "        pass\n"
            "class TestB:\n"
            "    def test_three(self, class_sock, package_sock):\n"
            "        pass\n"
        )
        pytester.makepyfile(test_top="def test_four(session_sock, module_pair):\n    pass\n")
        result = run(pytester, "-W", "error")
        result.assert_outcomes(passed=4)

    def test_wider_fixture_leak_is_an_error_at_its_teardown(self, pytester: pytest.Pytester) -> None:
        source = """\
import socket
import pytest

KEEP = []

@pytest.fixture(scope="module")
def leaky_server():
    srv = socket.create_server(("127.0.0.1", 0))  # FIXTURE LINE
    KEEP.append(srv)
    yield srv.getsockname()

def test_one(leaky_server):
    pass

def test_two(leaky_server):
    pass

def test_three():
    pass
"""
        pytester.makepyfile(test_fx=source)
        line = line_of(source, "# FIXTURE LINE")
        result = run(pytester, "-v")
        result.assert_outcomes(passed=3, errors=1)
        result.stdout.fnmatch_lines(
            [
                "*ERROR at teardown of test_three*",
                "leakguard: fixture 'leaky_server' (module scope), set up for test_fx.py::test_one, left 1 socket "
                f"open, created at test_fx.py:{line} (LISTEN)",
                f"Leaked tcp socket created at test_fx.py:{line}, in LISTEN",
                "  origin socket, local 127.0.0.1:*, age *s, fd *",
                f'    File "test_fx.py", line {line}, in leaky_server',
            ]
        )

    def test_server_fixture_owns_the_connections_it_accepts(self, pytester: pytest.Pytester) -> None:
        pytester.makeconftest(SERVER_CONFTEST)
        source = """\
import socket

KEEP = []

def test_client_closes(echo):
    c = socket.create_connection(echo.address)
    c.sendall(b"x")
    c.close()

def test_client_leaks(echo):
    c = socket.create_connection(echo.address)  # CLIENT LINE
    c.sendall(b"x")
    KEEP.append(c)

def test_after(echo):
    with socket.create_connection(echo.address) as c:
        c.sendall(b"x")
"""
        pytester.makepyfile(test_echo=source)
        line = line_of(source, "# CLIENT LINE")
        result = run(pytester, "-v")
        # The accepted ends stay open in the server until its teardown: never the tests' leaks.
        result.stdout.fnmatch_lines(
            [
                "*test_client_closes PASSED*",
                "*test_client_leaks FAILED*",
                "*test_after PASSED*",
                f"leakguard: this test left 1 socket open, created at test_echo.py:{line} (ESTABLISHED, peer *)",
            ]
        )
        result.assert_outcomes(passed=2, failed=1)
        assert "in accept" not in result.stdout.str()

    def test_session_wide_pool_passes(self, pytester: pytest.Pytester) -> None:
        pytester.makeconftest(
            SERVER_CONFTEST
            + """

import requests

@pytest.fixture(scope="session")
def http_session(http_url):
    with requests.Session() as s:
        yield s
"""
        )
        pytester.makepyfile(
            test_pool="""
            def test_first(http_session, http_url):
                assert http_session.get(http_url).text == "ok"

            def test_second(http_session, http_url):
                assert http_session.get(http_url + "/again").text == "ok"
            """
        )
        result = run(pytester, "-W", "error")
        result.assert_outcomes(passed=2)

    def test_aiohttp_session_closed_properly_passes(self, pytester: pytest.Pytester) -> None:
        pytester.makeconftest(SERVER_CONFTEST)
        pytester.makepyfile(
            test_aio="""
            import asyncio
            import aiohttp

            def test_get(http_url):
                async def main():
                    async with aiohttp.ClientSession() as session:
                        async with session.get(http_url) as resp:
                            assert await resp.text() == "ok"
                asyncio.run(main())
            """
        )
        result = run(pytester, "-W", "error")
        result.assert_outcomes(passed=1)


class TestEscapeHatches:
    """Markers, the leakguard_ignore ini list and warn mode silence or soften known-harmless sockets."""

    def test_markers(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(
            test_marks="""
            import socket
            import pytest

            KEEP = []

            @pytest.mark.no_leakguard
            def test_not_checked():
                KEEP.append(socket.socket())

            @pytest.mark.leakguard(allow=1)
            def test_one_allowed():
                KEEP.append(socket.socket())

            @pytest.mark.leakguard(allow=1)
            def test_two_is_too_many():
                KEEP.append(socket.socket())
                KEEP.append(socket.socket())

            @pytest.mark.leakguard(allow=["test_marks.py:*"])
            def test_allowed_by_site():
                KEEP.append(socket.socket())
            """
        )
        result = run(pytester, "--strict-markers", "-v")
        result.stdout.fnmatch_lines(
            [
                "*test_not_checked PASSED*",
                "*test_one_allowed PASSED*",
                "*test_two_is_too_many FAILED*",
                "*test_allowed_by_site PASSED*",
            ]
        )
        result.assert_outcomes(passed=3, failed=1)

    def test_ini_ignore_matches_sites_and_peers(self, pytester: pytest.Pytester) -> None:
        pytester.makeini(
            """
            [pytest]
            leakguard_ignore =
                helpers.py:*
                127.0.0.1:9
            """
        )
        pytester.makepyfile(
            helpers="import socket\nKEEP = []\ndef open_one():\n    KEEP.append(socket.socket())\n",
            test_ignore="""
            import socket
            import helpers

            KEEP = []

            def test_ignored_site():
                helpers.open_one()

            def test_ignored_peer():
                srv = socket.create_server(("127.0.0.1", 0))
                KEEP.append(srv)
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                u.connect(("127.0.0.1", 9))
                KEEP.append(u)
                srv.close()

            def test_not_ignored():
                KEEP.append(socket.socket())
            """,
        )
        result = run(pytester, "-v", "--strict-config")
        result.stdout.fnmatch_lines(
            ["*test_ignored_site PASSED*", "*test_ignored_peer PASSED*", "*test_not_ignored FAILED*"]
        )
        result.assert_outcomes(passed=2, failed=1)

    def test_warn_mode_lists_leaks_without_failing(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_leaky=LEAKY)
        line = line_of(LEAKY, "# LEAK")
        result = run(pytester, "--leakguard-mode=warn", "-W", "error")
        result.assert_outcomes(passed=2)
        result.stdout.fnmatch_lines(
            [
                "*= leakguard warnings =*",
                "test_leaky.py::test_leaks:",
                f"  leakguard: this test left 1 socket open, created at test_leaky.py:{line} (*",
                "leakguard (warn mode): 2 tests checked, 1 leaked socket in 1 test*",
            ]
        )


GC_SOURCE = """\
import socket

def test_dropped():
    s = socket.socket()  # DROPPED
    s.bind(("127.0.0.1", 0))
    del s
"""


class TestGarbageCollected:
    """A socket never closed but freed by the garbage collector is reported with its creation line."""

    def test_warning_by_default(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_gc=GC_SOURCE)
        line = line_of(GC_SOURCE, "# DROPPED")
        result = run(pytester, "-W", "ignore::pytest.PytestUnraisableExceptionWarning")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(
            [
                "*= leakguard warnings =*",
                "  leakguard: 1 socket opened by this test never closed; the garbage collector freed it: "
                f"test_gc.py:{line}",
                f"  Unclosed tcp socket fd=* freed by the garbage collector: origin=socket * created at test_gc.py:{line}",
                "*1 socket closed by the garbage collector",
            ]
        )

    def test_failure_with_gc_fail(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_gc=GC_SOURCE)
        line = line_of(GC_SOURCE, "# DROPPED")
        result = run(pytester, "--leakguard-gc=fail", "-W", "ignore::pytest.PytestUnraisableExceptionWarning")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                f"Unclosed tcp socket fd=* freed by the garbage collector: origin=socket * created at test_gc.py:{line}",
                "FAILED test_gc.py::test_dropped - leakguard: 1 socket*",
            ]
        )

    def test_pool_left_to_the_garbage_collector_passes(self, pytester: pytest.Pytester) -> None:
        pytester.makeconftest(SERVER_CONFTEST)
        pytester.makepyfile(
            test_gcpool="""
            import urllib3

            def test_pool_never_cleared(http_url):
                pool = urllib3.PoolManager()
                pool.cycle = pool  # only the collector frees it
                assert pool.request("GET", http_url).data == b"ok"
            """
        )
        result = run(pytester, "-W", "ignore::pytest.PytestUnraisableExceptionWarning")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["*1 test checked, 0 leaked sockets in 0 tests*"])


MIXED = {
    "test_leaky": LEAKY,
    "test_cw": CLOSE_WAIT,
    "test_pool": """
import asyncio
import aiohttp
import socket

def test_session_pool(http_session, http_url):
    assert http_session.get(http_url).text == "ok"

def test_aiohttp(http_url):
    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.get(http_url) as resp:
                assert await resp.text() == "ok"
    asyncio.run(main())

def test_echo(echo):
    with socket.create_connection(echo.address) as c:
        c.sendall(b"x")
""",
}


class TestXdist:
    """Under pytest-xdist (-n 2) every outcome is the same as in one process."""

    def _suite(self, pytester: pytest.Pytester) -> None:
        pytester.makeconftest(
            SERVER_CONFTEST
            + FIXTURE_SCOPES.replace("import socket\nimport pytest\n", "")
            + """

import requests

@pytest.fixture(scope="session")
def http_session(http_url):
    with requests.Session() as s:
        yield s
"""
        )
        pytester.makepyfile(**MIXED)
        pytester.makepyfile(
            test_scopes="""
            class TestScopes:
                def test_one(self, session_sock, module_pair, class_sock, function_sock):
                    pass
                def test_two(self, class_sock, module_pair):
                    pass
            """
        )

    @staticmethod
    def _outcomes(result: pytest.RunResult) -> dict[str, str]:
        out = {}
        for m in re.finditer(r"^(PASSED|FAILED|ERROR) (test_\w+\.py::[\w:]+)", result.stdout.str(), re.M):
            out.setdefault(m.group(2), m.group(1))
        return out

    def test_same_outcomes_with_two_workers(self, pytester: pytest.Pytester) -> None:
        self._suite(pytester)
        single = run(pytester, "-rA")
        single.assert_outcomes(passed=6, failed=2)
        multi = run(pytester, "-n", "2", "-rA")
        multi.assert_outcomes(passed=6, failed=2)
        assert self._outcomes(multi) == self._outcomes(single)
        assert self._outcomes(single)["test_leaky.py::test_leaks"] == "FAILED"
        assert self._outcomes(single)["test_cw.py::test_close_wait"] == "FAILED"
        multi.stdout.fnmatch_lines(
            [
                f"leakguard: this test left 1 socket open, created at test_leaky.py:{line_of(LEAKY, '# LEAK')} (*",
                "*leakguard (fail mode): 8 tests checked, 2 leaked sockets in 2 tests*",
            ]
        )


AFTER_CLEAN_TESTS = """\
import gc
import socket
import pytest

KEEP = []

@pytest.fixture
def fixture_leak():
    s = socket.socket()  # FIXTURE LINE
    KEEP.append(s)
    yield s

@pytest.fixture(scope="module")
def module_leak():
    s = socket.socket()  # MODULE LINE
    KEEP.append(s)
    yield s

def test_00_nothing():
    pass

def test_01_opens_and_closes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))

def test_02_nothing_again():
    assert 1 + 1 == 2

def test_03_leaks_in_its_body():
    KEEP.append(socket.socket())  # BODY LINE

def test_04_nothing_between():
    pass

def test_05_leaks_through_its_fixture(fixture_leak):
    pass

def test_06_freed_by_the_collector():
    s = socket.socket()  # DROPPED LINE
    s.bind(("127.0.0.1", 0))
    del s
    gc.collect()

def test_07_uses_the_module_fixture(module_leak):
    pass

def test_08_last_clean_one():
    pass
"""


class TestOnlyWhenSomethingHappened:
    """Tests that open nothing take the cheap path; whatever a test does open is still judged in full."""

    def test_leaks_between_clean_tests_are_all_caught(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_mixed=AFTER_CLEAN_TESTS)
        result = run(pytester, "-v", "--leakguard-gc=fail", "-W", "ignore::pytest.PytestUnraisableExceptionWarning")
        result.stdout.fnmatch_lines(
            [
                "*test_00_nothing PASSED*",
                "*test_01_opens_and_closes PASSED*",
                "*test_02_nothing_again PASSED*",
                "*test_03_leaks_in_its_body FAILED*",
                "*test_04_nothing_between PASSED*",
                "*test_05_leaks_through_its_fixture FAILED*",
                "*test_06_freed_by_the_collector FAILED*",
                "*test_07_uses_the_module_fixture PASSED*",
                "*test_08_last_clean_one PASSED*",
                "*test_08_last_clean_one ERROR*",  # the module's last test tears the module fixture down
            ]
        )
        out = result.stdout.str()
        for marker in ("# BODY LINE", "# FIXTURE LINE"):
            assert f"this test left 1 socket open, created at test_mixed.py:{line_of(AFTER_CLEAN_TESTS, marker)} " in out
        result.stdout.fnmatch_lines(
            [
                "leakguard: 1 socket opened by this test never closed; the garbage collector freed it: "
                f"test_mixed.py:{line_of(AFTER_CLEAN_TESTS, '# DROPPED LINE')}"
            ]
        )
        result.stdout.fnmatch_lines(
            [
                "leakguard: fixture 'module_leak' (module scope), set up for test_mixed.py::test_07_uses_the_module_fixture,"
                f" left 1 socket open, created at test_mixed.py:{line_of(AFTER_CLEAN_TESTS, '# MODULE LINE')} (*"
            ]
        )
        result.assert_outcomes(passed=6, failed=3, errors=1)
        result.stdout.fnmatch_lines(
            ["*leakguard (fail mode): 9 tests checked, 2 leaked sockets in 2 tests, 1 leaked socket in fixtures, "
             "1 socket closed by the garbage collector"]
        )

    def test_a_clean_run_registers_no_report_hooks(self, pytester: pytest.Pytester) -> None:
        # pytest calls pytest_runtest_logreport and pytest_report_teststatus three times per
        # test: leakguard implements them only from its first finding on, so a suite
        # without leaks pays nothing for them, and the counts and statuses stay the same.
        pytester.makeconftest(
            """
            def pytest_terminal_summary(terminalreporter, config):
                findings = config.pluginmanager.get_plugin("leakguard-findings")
                terminalreporter.write_line(f"report hooks registered: {findings is not None}")
            """
        )
        pytester.makepyfile(
            test_clean="""
            import socket

            def test_one():
                with socket.socket():
                    pass

            def test_two():
                pass
            """
        )
        clean = run(pytester)
        clean.assert_outcomes(passed=2)
        clean.stdout.fnmatch_lines(
            [
                "leakguard (fail mode): 2 tests checked, 0 leaked sockets in 0 tests, "
                "0 sockets closed by the garbage collector",
                "report hooks registered: False",
            ]
        )
        pytester.makepyfile(test_leaky=LEAKY)
        leaky = run(pytester, "-rA")
        leaky.assert_outcomes(passed=3, failed=1)  # the leaking test once, as failed
        leaky.stdout.fnmatch_lines(
            [
                "leakguard (fail mode): 4 tests checked, 1 leaked socket in 1 test, "
                "0 sockets closed by the garbage collector",
                "report hooks registered: True",
            ]
        )
        leaky.stdout.fnmatch_lines(["FAILED test_leaky.py::test_leaks - leakguard: this test left 1*"])
        leaky.stdout.no_fnmatch_line("ERROR test_leaky.py::test_leaks*")
        leaky.stdout.no_fnmatch_line("PASSED test_leaky.py::test_leaks*")


IGNORE_SUITE = {
    "site_a": "import socket\nKEEP = []\ndef open_one():\n    KEEP.append(socket.socket())\n",
    "site_b": "import socket\nKEEP = []\ndef open_one():\n    KEEP.append(socket.socket())\n",
    "test_ignored": """\
import socket
import site_a
import site_b

KEEP = []

def test_a():
    site_a.open_one()

def test_b():
    site_b.open_one()

def test_not_ignored():
    KEEP.append(socket.socket())
""",
}


class TestIgnoreLists:
    """One parsing for every source: comma- or space-separated globs from the flag, the
    environment and the ini option; a glob that never matched is named in the summary."""

    @pytest.mark.parametrize("source", ["flag", "flag twice", "environment", "ini", "ini one line"])
    def test_every_source_splits_the_same(
        self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str
    ) -> None:
        pytester.makepyfile(**IGNORE_SUITE)
        args: list[str] = []
        if source == "flag":
            args = ["--leakguard-ignore", "site_a.py:*,site_b.py:* nowhere.py:*"]
        elif source == "flag twice":
            args = ["--leakguard-ignore=site_a.py:*,nowhere.py:*", "--leakguard-ignore", "site_b.py:*"]
        elif source == "environment":
            monkeypatch.setenv("LEAKGUARD_PYTEST_IGNORE", "site_a.py:*, site_b.py:*,nowhere.py:*")
        elif source == "ini":
            pytester.makeini("[pytest]\nleakguard_ignore =\n    site_a.py:*\n    site_b.py:*,nowhere.py:*\n")
        else:
            pytester.makeini("[pytest]\nleakguard_ignore = site_a.py:*,site_b.py:* nowhere.py:*\n")
        result = run(pytester, "-v", "--strict-config", *args)
        result.stdout.fnmatch_lines(["*test_a PASSED*", "*test_b PASSED*", "*test_not_ignored FAILED*"])
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(["leakguard: 1 ignore pattern matched no socket: nowhere.py:*"])

    def test_settings_split_commas_and_spaces(
        self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from leakguard.pytest_plugin import load_settings, parse_globs

        assert parse_globs(["a.py:*,b.py:1", " c:* ,, d ", ""]) == ["a.py:*", "b.py:1", "c:*", "d"]
        pytester.makeini("[pytest]\nleakguard_ignore = i1,i2\n")
        monkeypatch.setenv("LEAKGUARD_PYTEST_IGNORE", "e1 e2")
        settings = load_settings(pytester.parseconfig("--leakguard-ignore=f1,f2", "--leakguard-ignore=i1"))
        assert settings.ignore == ("i1", "i2", "e1", "e2", "f1", "f2")

    def test_unmatched_under_xdist_counts_every_worker(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(**IGNORE_SUITE)
        result = run(pytester, "-n", "2", "--leakguard-ignore", "site_a.py:*,site_b.py:*,nowhere.py:*,nor:*")
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(["leakguard: 2 ignore patterns matched no socket: nowhere.py:*, nor:*"])

    def test_all_matched_prints_nothing_extra(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(**IGNORE_SUITE)
        result = run(pytester, "--leakguard-ignore", "site_a.py:*,site_b.py:*")
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.no_fnmatch_line("*matched no socket*")


PROCESS_WIDE_TESTS = """\
import requests
import urllib3

SESSION = requests.Session()  # a module-level Session: its pools live as long as the process


class Clients:
    def __init__(self):
        self.http = urllib3.PoolManager()


CLIENTS = Clients()


def test_session_never_closed(http_url):
    s = requests.Session()  # LEAK
    assert s.get(http_url).status_code == 200
    KEEP.append(s)


def test_top_level_request(http_url):
    assert urllib3.request("GET", http_url).status == 200  # kept in urllib3._DEFAULT_POOL


def test_again(http_url):
    assert urllib3.request("GET", http_url + "/x").status == 200


def test_module_session(http_url):
    assert SESSION.get(http_url).status_code == 200


def test_attribute_of_a_module_global(http_url):
    assert CLIENTS.http.request("GET", http_url).status == 200


def test_cleanup():
    KEEP.pop().close()  # the leak above was reported; the server may now close its end


KEEP = []
"""


class TestProcessWidePools:
    """A socket idle in a pool a module global keeps (urllib3.request()'s default
    PoolManager, a module-level Session) fails no test: the summary names the pool
    once.  A Session the test made and never closed still fails it, naming the Session."""

    def test_named_once_and_nothing_fails(self, pytester: pytest.Pytester) -> None:
        pytester.makeconftest(SERVER_CONFTEST)
        pytester.makepyfile(test_pw=PROCESS_WIDE_TESTS)
        line = line_of(PROCESS_WIDE_TESTS, "# LEAK")
        for args in ((), ("-n", "2", "--dist=loadfile")):  # loadfile: test_cleanup runs after the leak
            result = run(pytester, "-rA", "-W", "error", *args)
            result.assert_outcomes(passed=5, failed=1)
            out = result.stdout.str()
            assert "FAILED test_pw.py::test_session_never_closed" in out
            for where in ("urllib3._DEFAULT_POOL", "test_pw.SESSION", "test_pw.CLIENTS.http"):
                assert out.count(f"kept by process-wide pool `{where}`") == 1, (where, out)
            result.stdout.fnmatch_lines(
                [
                    f"Leaked tcp socket created at test_pw.py:{line + 1}, in *",
                    "  origin requests, *",
                    "  pool: idle in urllib3 HTTPConnectionPool(http://127.0.0.1:*, maxsize=10) for *"
                    f", owned by requests.Session 0x* created at test_pw.py:{line}",
                ]
            )
            result.stdout.fnmatch_lines(["*leakguard (fail mode): 6 tests checked, 1 leaked socket in 1 test, 0 *"])

    def test_without_leakguard_the_same_outcomes(self, pytester: pytest.Pytester) -> None:
        pytester.makeconftest(SERVER_CONFTEST)
        pytester.makepyfile(test_pw=PROCESS_WIDE_TESTS)
        run(pytester, "-W", "error", on=False).assert_outcomes(passed=6)


TIMEOUT_TESTS = """\
import socket, threading, time
import pytest


@pytest.fixture(scope="module")
def server():
    lst = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            try:
                accepted.append(lst.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    yield lst.getsockname()
    lst.close()
    for c in accepted:
        c.close()


def test_quick(server):
    with socket.create_connection(server):
        pass


@pytest.mark.parametrize("i", range(3))
def test_closed_after_the_test(server, i):
    s = socket.create_connection(server)
    # Closed by another thread after the test's budget: leakguard's grace waits for it on its own time.
    threading.Timer(1.0, s.close).start()


def test_times_out():
    time.sleep(60)
"""


class TestPytestTimeout:
    """pytest-timeout measures the test, not leakguard: its timer is paused while the plugin
    judges a test (gc, grace, diagnosis) and resumes with the time that was left, so a suite
    has the same outcomes with and without --leakguard, a test that really times out included,
    and no timeout fires inside the plugin (no INTERNALERROR)."""

    def test_signal_method(self, pytester: pytest.Pytester) -> None:
        pytest.importorskip("pytest_timeout")
        pytester.makepyfile(test_to=TIMEOUT_TESTS)
        for on in (False, True):
            result = run(pytester, "-W", "error", "--timeout=0.5", "--leakguard-grace=30", on=on)
            assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
            result.assert_outcomes(passed=4, failed=1)
            result.stdout.fnmatch_lines(["FAILED test_to.py::test_times_out - Failed: Timeout*"])

    def test_thread_method(self, pytester: pytest.Pytester) -> None:
        """The thread method ends the whole run at a timeout: leakguard's grace must not be counted."""
        pytest.importorskip("pytest_timeout")
        pytester.makepyfile(test_to=TIMEOUT_TESTS)
        args = ("-W", "error", "--timeout=0.5", "--timeout-method=thread", "--leakguard-grace=30")
        for on in (False, True):
            result = run(pytester, *args, "-k", "not times_out", on=on)
            assert "Timeout" not in result.stdout.str() + result.stderr.str()
            result.assert_outcomes(passed=4, deselected=1)
        for on in (False, True):  # a test that really times out still ends the run, as without leakguard
            result = run(pytester, *args, "-k", "times_out", on=on)
            assert result.ret == 1 and "Timeout" in result.stderr.str() + result.stdout.str()
