"""``leakguard run -- CMD``: real programs run under leakguard, reports read from their stderr."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

BIN = os.path.dirname(sys.executable)
LEAKGUARD = os.path.join(BIN, "leakguard")
PY = sys.executable

#: A program that leaks one connection into CLOSE_WAIT at the line marked LEAK, then
#: waits for two watcher ticks (or, with --forever, until it is killed).
LEAKY = textwrap.dedent(
    """\
    import socket, sys, threading, time

    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()

    def serve():
        c, _ = lst.accept()
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    conn = socket.create_connection(lst.getsockname())  # LEAK
    assert conn.recv(1) == b""  # the server hung up: CLOSE_WAIT
    print("leaked", flush=True)
    if "--forever" in sys.argv:
        while True:
            time.sleep(0.05)
    from leakguard import watcher
    w = watcher.current()
    start = w.ticks
    while w.ticks < start + 2:
        time.sleep(0.01)
    """
)


def line_of(source: str, marker: str) -> int:
    return next(i for i, text in enumerate(source.splitlines(), 1) if marker in text)


def leakguard_cmd(*args: str, module: bool = False) -> list[str]:
    return [PY, "-m", "leakguard", *args] if module else [LEAKGUARD, *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKGUARD_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def json_events(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


class Running:
    """A subprocess whose stderr lines are collected as they come."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.out: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        return json_events("\n".join(self.lines))

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the readers drain
                return predicate()
            time.sleep(0.02)
        return predicate()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(20)
        for t in self._readers:
            t.join(5)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def leaky(tmp_path: Path) -> Iterator[Path]:
    prog = tmp_path / "leaky.py"
    prog.write_text(LEAKY)
    yield prog


class TestReportsUnderRun:
    """A program leaking into CLOSE_WAIT under `leakguard run` reports the line within two ticks."""

    @pytest.mark.parametrize("module", [False, True], ids=["console-script", "python-m"])
    def test_json_report_names_line_state_peer(self, leaky: Path, module: bool) -> None:
        r = subprocess.run(
            leakguard_cmd("run", "--report-interval", "0.2", "--log-format", "json", "--", PY, str(leaky), module=module),
            cwd=leaky.parent, env=clean_env(), capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "leaked"
        events = json_events(r.stderr)
        leaks = [e for e in events if e["event"] == "leakguard.leak"]
        assert leaks, r.stderr
        leak = leaks[0]
        assert leak["site"] == f"leaky.py:{line_of(LEAKY, '# LEAK')}"
        assert leak["state"] == "CLOSE_WAIT" and leak["status"] == "new" and leak["count"] == 1
        assert leak["peer"].startswith("127.0.0.1:") and leak["origin"] == "socket"
        assert leak["level"] == "warning"
        summary = next(e for e in events if e["event"] == "leakguard.summary")
        assert summary["counts"]["CLOSE_WAIT"] == 1 and summary["leaks"] == 1
        assert summary["fds_limit"] != 0 and summary["fds_open"] > 0

    def test_console_lines_without_structlog_config(self, leaky: Path) -> None:
        r = subprocess.run(
            [LEAKGUARD, "run", "--report-interval", "0.2", "--", PY, str(leaky)],
            cwd=leaky.parent, env=clean_env(), capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if "leakguard.leak" in ln]
        assert lines, r.stderr
        line = lines[0]
        assert not line.startswith("{")  # readable, not JSON
        assert f"site=leaky.py:{line_of(LEAKY, '# LEAK')}" in line
        assert "state=CLOSE_WAIT" in line and "peer=127.0.0.1:" in line

    def test_env_variables_configure_the_program(self, leaky: Path) -> None:
        r = subprocess.run(
            [LEAKGUARD, "run", "--", PY, str(leaky)],
            cwd=leaky.parent, env=clean_env(LEAKGUARD_REPORT_INTERVAL="0.2", LEAKGUARD_LOG_FORMAT="json"),
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert any(e["event"] == "leakguard.leak" for e in json_events(r.stderr)), r.stderr

    def test_option_wins_over_environment(self, tmp_path: Path) -> None:
        code = "import leakguard; c = leakguard.get_config(); print(c.top_sites, c.report_interval, c.log_format)"
        r = subprocess.run(
            [LEAKGUARD, "run", "--top-sites", "3", "--", PY, "-c", code],
            cwd=tmp_path, env=clean_env(LEAKGUARD_TOP_SITES="7", LEAKGUARD_LOG_FORMAT="json"),
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["3", "60.0", "json"]  # run defaults to a report every 60 s

    def test_report_interval_none_turns_the_watcher_off(self, tmp_path: Path) -> None:
        code = "import leakguard; from leakguard import watcher; print(leakguard.installed(), watcher.current())"
        r = subprocess.run(
            [LEAKGUARD, "run", "--report-interval", "none", "--", PY, "-c", code],
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["True", "None"]

    def test_existing_sitecustomize_still_runs(self, tmp_path: Path) -> None:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIRS_RAN'] = '1'\n")
        code = "import os, leakguard; print(leakguard.installed(), os.environ.get('THEIRS_RAN'))"
        proc = subprocess.run(
            [PY, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
             LEAKGUARD, "run", "--", PY, "-c", code],
            cwd=tmp_path, env=clean_env(PYTHONPATH=str(theirs)), capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["True", "1"]
        assert "Error in sitecustomize" not in proc.stderr


class TestPassThrough:
    """The program replaces `leakguard run`: exit codes and signals are the program's own."""

    @pytest.mark.parametrize("module", [False, True], ids=["console-script", "python-m"])
    def test_exit_code(self, tmp_path: Path, module: bool) -> None:
        r = subprocess.run(
            leakguard_cmd("run", "--", PY, "-c", "import sys; sys.exit(7)", module=module),
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 7, r.stderr

    def test_killed_by_signal(self, tmp_path: Path) -> None:
        r = subprocess.run(
            [LEAKGUARD, "run", "--", PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"],
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == -signal.SIGTERM

    def test_signal_sent_to_run_reaches_the_program(self, tmp_path: Path) -> None:
        code = textwrap.dedent(
            """\
            import signal, sys, time
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))
            print("ready", flush=True)
            while True:
                time.sleep(0.05)
            """
        )
        with Running([LEAKGUARD, "run", "--", PY, "-c", code], tmp_path, clean_env()) as run:
            assert run.wait_for(lambda: "ready" in run.out), run.lines
            run.proc.send_signal(signal.SIGTERM)
            assert run.proc.wait(30) == 42

    def test_command_not_found(self, tmp_path: Path) -> None:
        r = subprocess.run(
            [LEAKGUARD, "run", "--", "no-such-command-leakguard"], cwd=tmp_path, env=clean_env(),
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 127 and "no-such-command-leakguard: not found" in r.stderr

    def test_nothing_to_run(self, tmp_path: Path) -> None:
        r = subprocess.run([LEAKGUARD, "run", "--"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "usage: leakguard run" in r.stderr


def _shell_like(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A directory of commands that cannot run (and one the shell runs as a script), and a PATH with them."""
    bin_dir = tmp_path / "bin"
    (bin_dir / "adir").mkdir(parents=True)
    (bin_dir / "plain").write_text("echo plain\n")  # in PATH, not executable
    (tmp_path / "noexec").write_text("echo noexec\n")
    noshebang = tmp_path / "noshebang"
    noshebang.write_text('echo "no shebang: $0 $1"\n')
    noshebang.chmod(0o755)
    badshebang = tmp_path / "badshebang"
    badshebang.write_text("#!/no/such/interpreter\n")
    badshebang.chmod(0o755)
    return tmp_path, clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}")


_SH_PREFIX = re.compile(r"^sh: (?:\d+: )?", re.M)


class TestCommandErrorsLikeTheShell:
    """`leakguard run -- CMD` fails as `sh -c CMD` does: the same exit code (127 not found, 126 cannot
    execute) and the same reason; a file without #! runs under /bin/sh."""

    @pytest.mark.parametrize(
        "command",
        ["/tmp", "./noexec", "./nosuch", "nosuch-leakguard", "./noshebang", "./badshebang", "plain", "adir", "./"],
    )
    def test_same_as_sh(self, tmp_path: Path, command: str) -> None:
        if command in ("plain", "adir") and not os.path.realpath("/bin/sh").endswith("dash"):
            pytest.skip("a PATH entry that cannot run: dash (and POSIX) say 127, bash 126; leakguard follows dash")
        cwd, env = _shell_like(tmp_path)
        sh = subprocess.run(["sh", "-c", f"{command} arg"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        run = subprocess.run(
            [LEAKGUARD, "run", "--", command, "arg"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == sh.returncode, (run, sh)
        assert run.stdout == sh.stdout
        assert run.stderr.replace("leakguard run: ", "", 1) == _SH_PREFIX.sub("", sh.stderr, count=1), (run, sh)


class TestBadValues:
    """A bad option or LEAKGUARD_* value is a clear message and exit code 2; nothing runs."""

    @pytest.mark.parametrize("module", [False, True], ids=["console-script", "python-m"])
    def test_bad_option(self, tmp_path: Path, module: bool) -> None:
        r = subprocess.run(
            leakguard_cmd("run", "--report-interval", "soon", "--", PY, "-c", "print('ran')", module=module),
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 2
        assert "ran" not in r.stdout
        assert "--report-interval" in r.stderr and "report_interval must be a positive number" in r.stderr
        assert "'soon'" in r.stderr

    def test_bad_environment_variable(self, tmp_path: Path) -> None:
        r = subprocess.run(
            [LEAKGUARD, "run", "--", PY, "-c", "print('ran')"],
            cwd=tmp_path, env=clean_env(LEAKGUARD_DUMP_SIGNAL="SIGNOPE"), capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 2 and "ran" not in r.stdout
        assert "LEAKGUARD_DUMP_SIGNAL='SIGNOPE'" in r.stderr and "dump_signal must be a signal name" in r.stderr

    def test_bad_variable_set_by_the_program_for_a_child(self, tmp_path: Path) -> None:
        """The bootstrap refuses too (exit 2, message), when a program breaks the variable for its child."""
        code = (
            "import os, subprocess, sys; os.environ['LEAKGUARD_TOP_SITES'] = 'many'; "
            "r = subprocess.run([sys.executable, '-c', 'print(1)'], capture_output=True, text=True); "
            "print(r.returncode, r.stdout.strip() or '-', r.stderr.strip())"
        )
        r = subprocess.run(
            [LEAKGUARD, "run", "--", PY, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("2 - leakguard: environment variable LEAKGUARD_TOP_SITES='many'")


class TestDumpSignal:
    """LEAKGUARD_DUMP_SIGNAL=SIGUSR1 writes the current report at once, without a periodic watcher."""

    def test_sigusr1_dumps_the_report(self, leaky: Path) -> None:
        cmd = [LEAKGUARD, "run", "--report-interval", "none", "--dump-signal", "SIGUSR1", "--log-format", "json",
               "--", PY, str(leaky), "--forever"]
        with Running(cmd, leaky.parent, clean_env()) as run:
            assert run.wait_for(lambda: "leaked" in run.out), run.lines
            assert not run.events()  # no periodic report
            run.proc.send_signal(signal.SIGUSR1)
            leaks = run.wait_for(lambda: [e for e in run.events() if e["event"] == "leakguard.leak"])
            assert leaks, run.lines
            assert leaks[0]["site"] == f"leaky.py:{line_of(LEAKY, '# LEAK')}"
            summary = next(e for e in run.events() if e["event"] == "leakguard.summary")
            assert summary["trigger"] == "dump"
            assert run.proc.poll() is None  # SIGUSR1's default action (terminate) did not happen
