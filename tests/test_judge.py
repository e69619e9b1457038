"""leakguard.judge: the one place that decides what leaked (CLOSE_WAIT, and CLOSE after a peer's reset)."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest

import leakguard
from leakguard import judge

from .helpers import HangUpServer, leaks_for_fd, wait_close_wait, wait_for


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        yield srv
    finally:
        srv.close()


def reset_by_peer(listener: socket.socket) -> socket.socket:
    """A client socket whose peer reset the connection (SO_LINGER 0 then close: an RST, not a FIN)."""
    client = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    return client


def state_of(fd: int) -> str | None:
    return next((s.state for s in leakguard.snapshot().sockets if s.fd == fd), None)


class TestLeakReasonWords:
    """A renderer's memo of leak reasons gives each socket exactly the words it would get alone."""

    def test_memo_keeps_each_age_as_written(self) -> None:
        # ages on and beside the rounding boundaries of "{:.1f}", and past 120 s (minutes)
        ages = [0.0, 0.04999999999999999, 0.05, 0.05000000000000001, 0.15, 0.25, 0.35, 1.45, 2.675, 9.95, 99.95,
                119.94999999999999, 119.95, 119.96, 120.0, 3599.0, 7300.0, None]  # fmt: skip
        ages += [k / 100 + d for k in range(0, 300) for d in (-1e-12, 0.0, 1e-12) if k / 100 + d >= 0]
        memo: dict[object, str] = {}
        for state in ("CLOSE_WAIT", "CLOSE"):
            for age in ages:
                info = leakguard.SocketInfo(7, "AF_INET", "tcp", state, "127.0.0.1:1", "127.0.0.1:2", age, "socket", None)
                assert judge.leak_reason(info, memo) == judge.leak_reason(info), (state, age)
        assert len(memo) < len(ages)  # ages written alike share one text


class TestDiagnosisFields:
    """Every SocketInfo has verdict / held_by / in_use: None / [] / None unless it is a leak."""

    def test_non_leaks_carry_empty_fields(self, installed: None, listener: socket.socket) -> None:
        snap = leakguard.snapshot()
        info = next(s for s in snap.sockets if s.fd == listener.fileno())
        assert (info.verdict, info.held_by, info.in_use, info.leaked) == (None, [], None, False)
        d = info.to_dict()
        assert (d["verdict"], d["held_by"], d["in_use"]) == (None, [], None)

    def test_a_leak_has_a_verdict(self, installed: None) -> None:
        with HangUpServer() as srv:
            s = socket.create_connection(srv.address)
            try:
                info = wait_close_wait(s.fileno())
                assert info.leaked and info.verdict in ("forgotten", "in_use", "idle_in_pool", "unreachable")
                d = info.to_dict()
                assert d["verdict"] == info.verdict and isinstance(d["held_by"], list)
                assert d["in_use"] is None or {"thread", "task", "file", "line", "function"} <= set(d["in_use"])
            finally:
                s.close()


class TestCloseAfterReset:
    """A peer's reset leaves our end in CLOSE: a leak once held past the grace period; a socket never
    connected (also in CLOSE) or one whose connect was refused is not."""

    def test_reset_socket_is_a_leak_after_grace(self, installed: None, listener: socket.socket) -> None:
        client = reset_by_peer(listener)
        try:
            assert wait_for(lambda: state_of(client.fileno()) == "CLOSE")
            time.sleep(judge.CLOSE_GRACE + 0.05)
            found = leaks_for_fd(client.fileno())
            assert len(found) == 1
            leak = found[0]
            assert leak.state == "CLOSE" and leak.type == "tcp"
            assert leak.reason is not None and "reset the connection; this process never closed its end" in leak.reason
            assert leak.verdict is not None
        finally:
            client.close()
        assert not leaks_for_fd(client.fileno())

    def test_untracked_reset_socket_needs_the_grace_seen(self, listener: socket.socket) -> None:
        """Without a creation time (not installed), the judge counts from the first snapshot that saw it in CLOSE."""
        client = reset_by_peer(listener)
        try:
            assert wait_for(lambda: state_of(client.fileno()) == "CLOSE")
            assert not leaks_for_fd(client.fileno())  # first seen now: in its grace period
            time.sleep(judge.CLOSE_GRACE + 0.05)
            assert [s.state for s in leaks_for_fd(client.fileno())] == ["CLOSE"]
        finally:
            client.close()

    def test_never_connected_and_refused_are_not_leaks(self, installed: None, listener: socket.socket) -> None:
        fresh = socket.socket()
        bound = socket.socket()
        bound.bind(("127.0.0.1", 0))
        refused = socket.socket()
        with pytest.raises(ConnectionRefusedError):
            refused.connect(bound.getsockname())
        try:
            time.sleep(judge.CLOSE_GRACE + 0.05)
            snap = leakguard.snapshot()
            fds = {fresh.fileno(), bound.fileno(), refused.fileno()}
            assert {s.state for s in snap.sockets if s.fd in fds} == {"CLOSE"}
            assert not [s for s in snap.leaks if s.fd in fds]
        finally:
            for s in (fresh, bound, refused):
                s.close()

    def test_was_connected_reads_the_kernel(self, listener: socket.socket) -> None:
        client = reset_by_peer(listener)
        fresh = socket.socket()
        try:
            assert wait_for(lambda: judge.was_connected(client.fileno()))
            assert not judge.was_connected(fresh.fileno())
            assert not judge.was_connected(10_000)  # no such descriptor: False, no error
        finally:
            client.close()
            fresh.close()
