"""Reports a person reads at a glance, rendered once: groups, folded stacks, fix hints, caches, to_dict's shape."""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import leakguard
from leakguard import _config, registry, report, stacks

from .helpers import HangUpServer, compiled_and_python, this_line, wait_for

HERE = f"tests/{os.path.basename(__file__)}"
CONTRACT_SOCKET_KEYS = {
    "fd", "family", "type", "state", "local", "remote", "age_s", "origin", "target", "pool", "stack", "reason",
    "verdict", "held_by", "in_use",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _from_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Paths are shown relative to the working directory: these tests expect ``tests/test_report.py``."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def leaked(fds: set[int], n: int) -> list[leakguard.SocketInfo]:
    """Wait until *n* of *fds* are leaks (CLOSE_WAIT); return them."""
    found = wait_for(lambda: len(mine := [s for s in leakguard.snapshot().leaks if s.fd in fds]) >= n and mine)
    assert found, f"{n} sockets never reached CLOSE_WAIT"
    return found


@pytest.fixture
def fifteen(installed_quiet: None, hangup_server: HangUpServer) -> Iterator[tuple[list[leakguard.SocketInfo], int]]:
    """15 real sockets in CLOSE_WAIT created by one line (the peer hung up on each)."""
    socks = [socket.create_connection(hangup_server.address) for _ in range(15)]; line = this_line()  # noqa: E702
    try:
        yield leaked({s.fileno() for s in socks}, 15), line
    finally:
        for s in socks:
            s.close()


class _Events:
    """A structlog logger that keeps each event's fields."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def _log(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})

    info = warning = error = _log


class TestGrouping:
    """Leaks from one creation site (and verdict) are one group: one block, one event, one failure paragraph."""

    def test_fifteen_leaks_from_one_line_are_one_group(self, fifteen: tuple[list[leakguard.SocketInfo], int]) -> None:
        infos, line = fifteen
        groups = report.group(infos)
        assert len(groups) == 1
        g = groups[0]
        assert g.count == 15 and g.site == f"{HERE}:{line}" and g.states() == {"CLOSE_WAIT": 15}
        assert g.oldest.age_s == max(i.age_s or 0.0 for i in infos)
        text = report.format_group(g)
        port = infos[0].remote.rsplit(":", 1)[1]  # type: ignore[union-attr]
        first, facts = text.splitlines()[:2]
        assert first == (
            f"Leaked 15 tcp sockets created at {HERE}:{line}, in CLOSE_WAIT (the peer closed them, your code never did)"
        )
        assert facts.startswith(f"  origin socket, peer 127.0.0.1:{port} (15), oldest ") and ", fds " in facts
        assert "(15)" in facts.split("fds ")[1]  # eight descriptors shown, then how many
        assert len(text.splitlines()) < 15  # one block, not one per socket

    def test_snapshot_text_has_one_block_per_group(self, fifteen: tuple[list[leakguard.SocketInfo], int]) -> None:
        _, line = fifteen
        text = str(leakguard.snapshot())
        assert text.count(f"created at {HERE}:{line},") == 1
        assert " by creation site and verdict); fds " in text.splitlines()[0]

    def test_sites_are_groups_largest_first(self, installed_quiet: None, hangup_server: HangUpServer) -> None:
        def few() -> socket.socket:
            return socket.create_connection(hangup_server.address)

        few_line = this_line() - 2
        socks = [few() for _ in range(2)] + [socket.create_connection(hangup_server.address) for _ in range(3)]
        many = this_line() - 1
        try:
            infos = leaked({s.fileno() for s in socks}, 5)
            groups = report.group(infos)
            assert [(g.site, g.count) for g in groups] == [(f"{HERE}:{many}", 3), (f"{HERE}:{few_line}", 2)]
        finally:
            for s in socks:
                s.close()

    def test_periodic_report_emits_one_event_per_group(self, fifteen: tuple[list[leakguard.SocketInfo], int]) -> None:
        infos, line = fifteen
        log = _Events()
        fds = {i.fd for i in infos}
        snap = leakguard.snapshot()
        snap.leaks[:] = [s for s in snap.leaks if s.fd in fds]
        for dump in (False, True):  # a periodic report, then the dump signal's
            log.events.clear()
            report.Reporter(_config.Config(), logger=log).report(snap, dump=dump)
            leaks = [e for e in log.events if e["event"] == "leakguard.leak"]
            assert len(leaks) == 1, leaks
            e = leaks[0]
            assert e["site"] == f"{HERE}:{line}" and e["count"] == 15 and e["state"] == "CLOSE_WAIT"
            assert {"verdict", "held_by", "in_use", "hint", "oldest_age_s", "peers", "origin"} <= set(e)
            assert f"{HERE}:{line} in {sys._getframe().f_code.co_name}" not in e["sample_stack"]  # the fixture's
            assert any(f"{HERE}:{line} in fifteen" == s for s in e["sample_stack"]), e["sample_stack"]
            assert "with socket.create_connection(...)" in e["hint"]
            json.dumps(e)  # a JSON log line

    def test_pytest_failure_groups_and_marks_the_test_line(self, pytester: pytest.Pytester) -> None:
        source = """\
import socket
import threading

KEEP = []

def serve(listener):
    for _ in range(15):
        conn, _ = listener.accept()
        conn.close()

def open_one(addr):
    return socket.create_connection(addr)  # SITE

def test_many():
    listener = socket.create_server(("127.0.0.1", 0))
    server = threading.Thread(target=serve, args=(listener,), daemon=True)
    server.start()
    for _ in range(15):
        KEEP.append(open_one(listener.getsockname()))  # TEST LINE
    server.join()
    listener.close()
"""
        pytester.makepyfile(test_many=source)
        site = source.splitlines().index("    return socket.create_connection(addr)  # SITE") + 1
        test_line = source.splitlines().index("        KEEP.append(open_one(listener.getsockname()))  # TEST LINE") + 1
        result = pytester.runpytest_subprocess("--leakguard", "-p", "no:cacheprovider", "-p", "no:randomly")
        result.assert_outcomes(failed=1)
        out = result.stdout.str()
        result.stdout.fnmatch_lines(
            [
                f"leakguard: this test left 1* open, created at test_many.py:{site} (15 sockets: CLOSE_WAIT, peer 127.0.0.1:*)*",
                f"Leaked 15 tcp sockets created at test_many.py:{site}, in CLOSE_WAIT (the peer closed them, your code never did)",
                "  fix: close it: `with socket.create_connection(...) as s:`*",
                "  created by:",
                f'    File "test_many.py", line {test_line}, in test_many  <- the test',
                f'    File "test_many.py", line {site}, in open_one',
                "    [+1 frame in socket]",
            ]
        )
        # one group, one block: the FAILURES section names the site once (pytest's short summary, untruncated
        # when CI is set, may repeat the message after it)
        failures = out.split("short test summary info")[0]
        assert failures.count(f"created at test_many.py:{site},") == 1


class TestFolding:
    """Stacks show the application's frames; consecutive library frames fold into one line naming the libraries."""

    APP = os.path.abspath(__file__)

    def frames(self, *spec: tuple[str, int, str]) -> list[stacks.Frame]:
        return [stacks.Frame(f, line, fn) for f, line, fn in spec]

    def test_library_runs_fold_and_the_application_frames_stay(self) -> None:
        import json.decoder
        import threading as th

        stack = self.frames(
            (th.__file__, 1, "_bootstrap"), (th.__file__, 2, "run"), (self.APP, 10, "worker"),
            (json.__file__, 3, "loads"), (json.decoder.__file__, 4, "decode"), (self.APP, 20, "hook"),
            (socket.__file__, 5, "create_connection"),
        )  # fmt: skip
        folded = stacks.fold(stack)
        assert folded == [(2, ("threading",)), stack[2], (2, ("json",)), stack[5], (1, ("socket",))]
        text = report.format_stack(stack)
        assert text.splitlines() == [
            "    [+2 frames in threading]",
            f'    File "{HERE}", line 10, in worker',
            "    [+2 frames in json]",
            f'    File "{HERE}", line 20, in hook',
            "    [+1 frame in socket]",
        ]

    def test_site_packages_name_their_package(self) -> None:
        import urllib3.connectionpool

        import requests.adapters

        stack = self.frames(
            (self.APP, 1, "fetch"), (requests.adapters.__file__, 2, "send"), (urllib3.connectionpool.__file__, 3, "urlopen"),
            (urllib3.connectionpool.__file__, 4, "_make_request"), (socket.__file__, 5, "create_connection"),
        )  # fmt: skip
        assert stacks.fold(stack)[1] == (4, ("requests", "urllib3", "socket"))
        assert report.format_stack(stack).splitlines()[1] == "    [+4 frames in requests, urllib3, socket]"

    def test_the_creation_line_shows_without_application_frames(self) -> None:
        import asyncio.base_events

        stack = self.frames((asyncio.base_events.__file__, 1, "run_forever"), (socket.__file__, 2, "create_connection"))
        assert stacks.fold(stack) == [(1, ("asyncio",)), stack[1]]

    def test_only_the_innermost_application_frames_are_kept(self) -> None:
        stack = self.frames(*[(self.APP, i, f"f{i}") for i in range(12)])
        folded = stacks.fold(stack, limit=8)
        assert folded[0] == (4, ("application code",)) and folded[1:] == stack[4:]
        assert report.format_stack(stack, 0).count("File ") == 12  # 0: every frame, nothing folded

    def test_real_stack_folds_the_standard_library(self, installed_quiet: None, hangup_server: HangUpServer) -> None:
        out: list[socket.socket] = []

        def worker() -> None:
            out.append(socket.create_connection(hangup_server.address))  # WORKER

        line = this_line() - 2
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        try:
            (info,) = leaked({out[0].fileno()}, 1)
            text = report.format_group(report.group([info])[0])
            lines = text.split("  created by:\n")[1].splitlines()
            assert lines[0].startswith("    [+") and "threading" in lines[0]
            assert f'File "{HERE}", line {line}, in worker' in lines[-2] and lines[-1] == "    [+1 frame in socket]"
        finally:
            out[0].close()


class TestHints:
    """One concrete fix per verdict and origin."""

    @pytest.mark.parametrize(
        ("verdict", "origin", "pooled", "words"),
        [
            ("forgotten", "requests", False, ["with requests.get(...)", "r.close()"]),
            ("forgotten", "socket", False, ["with socket.create_connection(...)"]),
            ("forgotten", "psycopg2", False, ["contextlib.closing", "does not close"]),
            ("forgotten", "unknown", False, ["`with` block", "finally"]),
            ("forgotten", "sqlalchemy", True, ["return it to its pool"]),
            ("idle_in_pool", "sqlalchemy", True, ["pool_pre_ping=True", "idle timeout"]),
            ("idle_in_pool", "redis", True, ["health_check_interval"]),
            ("idle_in_pool", "unknown", True, ["pre-ping", "recycle"]),
            ("in_use", "socket", False, ["timeout", "capacity"]),
            ("unreachable", "socket", False, ["close it explicitly", "garbage collector"]),
            (None, "socket", False, ["with socket.create_connection(...)"]),
        ],
    )
    def test_hint(self, verdict: str | None, origin: str, pooled: bool, words: list[str]) -> None:
        hint = report.fix_hint(verdict, origin, pooled)
        assert all(w in hint for w in words), hint

    def test_every_verdict_has_its_own_hint(self) -> None:
        hints = {report.fix_hint(v, "socket") for v in ("forgotten", "in_use", "idle_in_pool", "unreachable")}
        assert len(hints) == 4

    def test_a_real_forgotten_socket_gets_the_socket_hint(self, fifteen: tuple[list[leakguard.SocketInfo], int]) -> None:
        infos, _ = fifteen
        text = report.format_group(report.group(infos)[0])
        assert "  fix: close it: `with socket.create_connection(...) as s:`" in text


class TestCaches:
    """Resolved once, never stale: a recompiled module's new lines show; the working directory is read per render."""

    def test_equal_stacks_are_resolved_once(self, fifteen: tuple[list[leakguard.SocketInfo], int]) -> None:
        infos, _ = fifteen
        resolved = {id(i.record.resolved()) for i in infos if i.record is not None}
        assert len(resolved) == 1  # fifteen records, one stack tuple: rendered once per snapshot

    def test_a_reloaded_module_shows_its_new_lines(
        self, installed_quiet: None, hangup_server: HangUpServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr(sys, "dont_write_bytecode", True)
        src = "import socket\n\ndef opener(addr):\n    return socket.create_connection(addr)\n"
        (tmp_path / "reloaded_site.py").write_text(src)
        importlib.invalidate_caches()
        mod = importlib.import_module("reloaded_site")
        socks = []
        try:
            socks.append(mod.opener(hangup_server.address))
            (old,) = leaked({socks[0].fileno()}, 1)
            assert old.site_str.endswith("reloaded_site.py:4")
            str(leakguard.snapshot())  # every cache warm with the old code
            (tmp_path / "reloaded_site.py").write_text("# moved\n# down\n# three lines\n" + src)
            importlib.reload(mod)
            socks.append(mod.opener(hangup_server.address))
            infos = leaked({s.fileno() for s in socks}, 2)
            sites = sorted(i.site_str.rsplit(":", 1)[1] for i in infos)
            assert sites == ["4", "7"]  # the old socket's line and the new one's, neither stale
            text = str(leakguard.snapshot())
            assert "reloaded_site.py:4," in text and "reloaded_site.py:7," in text
            assert {d["site"].rsplit(":", 1)[1] for d in leakguard.snapshot().to_dict()["leaks"] if "reloaded" in d["site"]} == {"4", "7"}
        finally:
            for s in socks:
                s.close()
            sys.modules.pop("reloaded_site", None)

    def test_paths_follow_the_working_directory(
        self, fifteen: tuple[list[leakguard.SocketInfo], int], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _, line = fifteen
        absolute = f"{os.path.abspath(__file__)}:{line}"
        assert f"created at {HERE}:{line}," in str(leakguard.snapshot())
        monkeypatch.chdir(tmp_path)
        assert f"created at {absolute}," in str(leakguard.snapshot())
        assert any(d["site"] == absolute for d in leakguard.snapshot().to_dict()["leaks"])
        monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert f"created at {HERE}:{line}," in str(leakguard.snapshot())

    def test_one_render_pass_reads_the_directory_once(self, monkeypatch: pytest.MonkeyPatch) -> None:
        calls = []
        real = os.getcwd

        def counting() -> str:
            calls.append(1)
            return real()

        monkeypatch.setattr(os, "getcwd", counting)
        with stacks.rendering():
            for _ in range(100):
                stacks.relpath(__file__)
        assert len(calls) == 1
        stacks.relpath(__file__)  # outside a pass: looked at every time (a chdir shows at once)
        assert len(calls) == 2


class TestToDict:
    """to_dict keeps the CONTRACT's shape and values, JSON-ready; each socket is rendered once."""

    def reference(self, info: leakguard.SocketInfo) -> dict[str, Any]:
        """The socket's dict from its properties, one by one: what the shared renderer must equal."""
        leak = info.leaked
        return {
            "fd": info.fd, "family": info.family, "type": info.type, "state": info.state, "local": info.local,
            "remote": info.remote, "age_s": (info.age_s * 1000.0 + 0.5) // 1.0 / 1000.0 if info.age_s is not None else None,
            "origin": info.origin, "target": info.target, "pool": info.pool, "stack": [f.to_dict() for f in info.stack],
            "reason": info.reason, "site": info.site_str if info.stack else None,
            "verdict": getattr(info, "verdict", None) if leak else None,
            "verdict_reason": getattr(info, "verdict_reason", None) if leak else None,
            "held_by": list(getattr(info, "held_by", []) or []) if leak else [],
            "in_use": getattr(info, "in_use", None) if leak else None,
        }  # fmt: skip

    def test_shape_values_and_json(self, fifteen: tuple[list[leakguard.SocketInfo], int]) -> None:
        early = socket.socket()  # an untracked-looking one too: a UDP socket has no state
        try:
            snap = leakguard.snapshot()
            d = snap.to_dict()
            assert set(d) == {"pid", "taken_at", "counts", "fds", "sockets", "leaks"}
            assert set(d["fds"]) == {"open", "limit"}
            assert json.loads(json.dumps(d)) == d
            assert len(d["sockets"]) == len(snap.sockets) and len(d["leaks"]) == len(snap.leaks) >= 15
            for info, entry in zip(snap.sockets, d["sockets"]):
                assert CONTRACT_SOCKET_KEYS <= set(entry) and set(entry) - CONTRACT_SOCKET_KEYS <= {"site", "verdict_reason"}
                assert entry == self.reference(info), info
                assert entry == info.to_dict()
            by_fd = {e["fd"]: e for e in d["sockets"]}
            for entry in d["leaks"]:
                assert entry is by_fd[entry["fd"]]  # rendered once, listed twice
                assert entry["state"] == "CLOSE_WAIT" and entry["reason"] and entry["stack"]
                assert entry["site"].startswith(f"{HERE}:")
            for frame in d["leaks"][0]["stack"]:
                assert set(frame) == {"file", "line", "function"}
        finally:
            early.close()

    def test_results_share_nothing_across_calls(self, fifteen: tuple[list[leakguard.SocketInfo], int]) -> None:
        """Within one result lists are shared (documented); a caller's edit never reaches another call's result."""
        snap = leakguard.snapshot()
        first = snap.to_dict()
        before = json.loads(json.dumps(first))
        for entry in first["sockets"]:  # every list and dict in it, changed in place
            for frame in entry["stack"]:
                frame["line"] = -1
            entry["stack"].append({"file": "x", "line": 0, "function": "f"})
            entry["held_by"].append("edited")
            entry["state"] = "EDITED"
        second = snap.to_dict()
        assert second == before
        assert json.loads(json.dumps(leakguard.snapshot().to_dict()["leaks"][0]["stack"])) == before["leaks"][0]["stack"]
        assert [info.to_dict() for info in snap.sockets] == before["sockets"]

    def test_compiled_and_python_loops_agree(
        self, fifteen: tuple[list[leakguard.SocketInfo], int], hangup_server: HangUpServer
    ) -> None:
        """The compiled loop (``_speedups.render``) renders exactly what the Python one does: pooled, untracked
        (a UDP socket's None state), leaked and other sockets, ages and all."""
        if report._render is None:
            pytest.skip("the compiled loop is not built here (pure-Python install)")
        idle, out = socket.create_connection(hangup_server.address), socket.create_connection(hangup_server.address)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            leaked({idle.fileno(), out.fileno()}, 2)
            for s, pool in ((idle, registry.PoolInfo("idle-pool")), (out, registry.PoolInfo("busy-pool"))):
                rec = registry.get(s.fileno())
                assert rec is not None
                rec.pool = pool
            pool.check_out(())
            compiled, python = compiled_and_python(report, "_render", leakguard.snapshot().to_dict)
            for d in (compiled, python):  # a checked-out pool's age is read at each render
                for e in d["sockets"]:
                    if e["pool"] is not None:
                        e["pool"]["checkout_age_s"] = None
            assert json.dumps(compiled) == json.dumps(python)  # key order too
            assert {e["fd"] for e in compiled["sockets"]} >= {idle.fileno(), out.fileno(), udp.fileno()}
        finally:
            for s in (idle, out, udp):
                s.close()

    def test_reasons_made_once_per_group_read_as_each_sockets_own(
        self, installed_quiet: None, hangup_server: HangUpServer
    ) -> None:
        """to_dict writes a group's reason once: each socket's still equals its own (sites, ages, a pool)."""

        def first() -> socket.socket:
            return socket.create_connection(hangup_server.address)

        def second() -> socket.socket:
            return socket.create_connection(hangup_server.address)

        socks = [first() for _ in range(3)] + [second() for _ in range(3)]
        time.sleep(0.3)
        socks += [first() for _ in range(2)]  # the same site, another age
        try:
            mine = {s.fileno() for s in socks}
            leaked(mine, len(socks))
            rec = registry.get(socks[0].fileno())
            assert rec is not None
            rec.pool = registry.PoolInfo("test-pool")  # idle in a pool: its words are its own
            snap = leakguard.snapshot()
            entries = {e["fd"]: e for e in snap.to_dict()["leaks"] if e["fd"] in mine}
            infos = [i for i in snap.leaks if i.fd in mine]
            assert len(entries) == len(infos) == len(socks)
            for info in infos:
                assert entries[info.fd]["reason"] == info.reason, info
            assert len({e["reason"] for e in entries.values()}) >= 4  # two sites, two ages, the pool
        finally:
            for s in socks:
                s.close()

    def test_a_socket_opened_before_install_has_an_empty_stack(self, hangup_server: HangUpServer) -> None:
        early = socket.create_connection(hangup_server.address)
        leakguard.install(integrations="none")
        try:
            (info,) = leaked({early.fileno()}, 1)
            entry = next(e for e in leakguard.snapshot().to_dict()["leaks"] if e["fd"] == early.fileno())
            assert entry["origin"] == "unknown" and entry["stack"] == [] and entry["site"] is None
            # in_use says where the holder is *now*: two snapshots taken on different lines differ there only
            now = ("in_use", "verdict_reason")
            ref = self.reference(info)
            assert {k: v for k, v in entry.items() if k not in now} == {k: v for k, v in ref.items() if k not in now}
            assert entry["in_use"]["function"] == "test_a_socket_opened_before_install_has_an_empty_stack"
            text = report.format_group(report.group([info])[0])
            assert "<unknown: origin=unknown>" in text and "opened before leakguard was installed" in text
        finally:
            leakguard.uninstall()
            early.close()
