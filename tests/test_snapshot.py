"""snapshot(): the kernel's view joined with the records; only CLOSE_WAIT is a leak; to_dict()'s shape."""

from __future__ import annotations

import importlib
import json
import os
import socket

import pytest

import leakguard
from leakguard import registry

from .helpers import HangUpServer, compiled_and_python, wait_close_wait


class TestJudgement:
    """Only CLOSE_WAIT is a leak; clean programs report nothing."""

    @pytest.mark.usefixtures("installed")
    def test_clean_program_has_no_leaks(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
        try:
            # TIME_WAIT churn: the client closes first, many times over
            for _ in range(50):
                c = socket.create_connection(listener.getsockname())
                a, _ = listener.accept()
                c.close()
                a.close()
            with socket.create_connection(listener.getsockname()):
                a2, _ = listener.accept()
                a2.close()
            snap = leakguard.snapshot()
            assert snap.leaks == []
            states = {s.fd: s.state for s in snap.sockets}
            assert states[listener.fileno()] == "LISTEN"
            assert states[client.fileno()] == "ESTABLISHED"
            assert states[server_side.fileno()] == "ESTABLISHED"
            assert states[udp.fileno()] is None
            assert snap.counts["ESTABLISHED"] >= 2 and "TIME_WAIT" not in snap.counts
        finally:
            for s in (client, server_side, udp, listener):
                s.close()

    @pytest.mark.usefixtures("installed")
    def test_closed_socket_disappears(self, hangup_server: HangUpServer) -> None:
        s = socket.create_connection(hangup_server.address)
        fd = s.fileno()
        wait_close_wait(fd)
        s.close()
        assert not [x for x in leakguard.snapshot().sockets if x.fd == fd and x.origin == "socket"]
        assert registry.get(fd) is None

    @pytest.mark.usefixtures("installed")
    def test_reason_in_words(self, hangup_server: HangUpServer) -> None:
        with socket.create_connection(hangup_server.address) as s:
            info = wait_close_wait(s.fileno())
            reason = info.reason or ""
            assert reason.startswith(f"peer 127.0.0.1:{hangup_server.port} closed the connection; ")
            assert "this process never closed its end, opened " in reason and " ago at " in reason
            text = leakguard.snapshot().format()
            assert "CLOSE_WAIT (the peer closed it" in text  # the test still holds s: in_use words
            assert "test_snapshot.py:" in text

    def test_socket_opened_before_install_still_shows(self, hangup_server: HangUpServer) -> None:
        early = socket.create_connection(hangup_server.address)
        leakguard.install()
        try:
            info = wait_close_wait(early.fileno())
            assert info.origin == "unknown" and info.stack == [] and info.age_s is None
            assert "no creation stack" in (info.reason or "")
        finally:
            leakguard.uninstall()
            early.close()

    def test_snapshot_without_install(self, hangup_server: HangUpServer) -> None:
        assert not leakguard.installed()
        with socket.create_connection(hangup_server.address) as s:
            info = wait_close_wait(s.fileno())
            assert info.origin == "unknown" and info.stack == []

    def test_c_level_socket_is_not_dropped(self, hangup_server: HangUpServer) -> None:
        """A descriptor made without socket.socket (here _socket, the C module) appears as unknown."""
        import _socket

        leakguard.install()
        raw = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            raw.connect(hangup_server.address)
            info = wait_close_wait(raw.fileno())
            assert info.origin == "unknown" and info.stack == []
        finally:
            raw.close()
            leakguard.uninstall()


class TestSnapshotShape:
    """snapshot().to_dict() has the documented, JSON-serialisable shape."""

    @pytest.mark.usefixtures("installed")
    def test_shape(self, hangup_server: HangUpServer) -> None:
        with socket.create_connection(hangup_server.address) as s:
            wait_close_wait(s.fileno())
            d = json.loads(json.dumps(leakguard.snapshot().to_dict()))
        assert set(d) >= {"pid", "taken_at", "counts", "fds", "sockets", "leaks"}
        assert d["pid"] == os.getpid() and isinstance(d["taken_at"], float)
        assert set(d["fds"]) == {"open", "limit"} and d["fds"]["open"] > 0
        keys = {"fd", "family", "type", "state", "local", "remote", "age_s", "origin", "target", "pool", "stack", "reason"}
        for sock in d["sockets"] + d["leaks"]:
            assert set(sock) >= keys
            for fr in sock["stack"]:
                assert set(fr) == {"file", "line", "function"}
        assert d["counts"]["CLOSE_WAIT"] >= 1
        assert len(d["leaks"]) >= 1 and all(x["state"] == "CLOSE_WAIT" for x in d["leaks"])
        # outermost first: the innermost frame is last
        leak = d["leaks"][0]
        assert leak["stack"][-1]["function"] == "create_connection"


class TestJoin:
    """snapshot's join of the kernel's view with the records: the compiled loop (``_speedups.join``) and
    the Python one give the same sockets, leaks and counts, on every kind of socket a process holds."""

    def test_compiled_and_python_join_agree(self, hangup_server: HangUpServer) -> None:
        import struct
        import time

        from leakguard import judge

        take = importlib.import_module("leakguard.snapshot")
        if take._join is None:
            pytest.skip("the compiled join is not built here (pure-Python install)")
        early = socket.create_connection(hangup_server.address)  # untracked: opened before install
        leakguard.install(integrations="none")
        listener = socket.create_server(("127.0.0.1", 0))
        held = [early, listener, socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket()]
        try:
            held += [socket.socket(socket.AF_UNIX), socket.create_connection(hangup_server.address)]
            reset = socket.create_connection(listener.getsockname())
            peer, _ = listener.accept()
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # an RST: `reset` stays in CLOSE, a leak after the grace period
            established = socket.create_connection(listener.getsockname())
            held += [reset, established, listener.accept()[0]]
            for s in (early, held[5]):
                wait_close_wait(s.fileno())
            time.sleep(judge.CLOSE_GRACE + 0.05)

            def fields(snap: leakguard.Snapshot) -> tuple[object, ...]:
                socks = [(*s[:6], *s[7:10], s.leaked) for s in snap.sockets]  # not the age: taken twice
                return socks, [s.fd for s in snap.leaks], snap.counts

            compiled, python = compiled_and_python(take, "_join", leakguard.snapshot)
            assert fields(compiled) == fields(python)
            leaks = {s.fd: s.state for s in compiled.leaks}
            assert leaks[early.fileno()] == leaks[held[5].fileno()] == "CLOSE_WAIT" and leaks[reset.fileno()] == "CLOSE"
            assert held[3].fileno() not in leaks  # never connected: CLOSE, not a leak
            assert {s.diagnosis.verdict for s in compiled.leaks} == {s.diagnosis.verdict for s in python.leaks}
            assert compiled.leaks[0].diagnosis is not None and [s.fd for s in compiled.leaks] == sorted(leaks)
        finally:
            leakguard.uninstall()
            for s in held:
                s.close()
