"""The registry of live socket records: records vanish with their sockets, a reused descriptor's entry is
rewritten in place."""

from __future__ import annotations

import gc
import os
import socket

import pytest

import leakguard
from leakguard import registry

from .helpers import this_line

HERE = os.path.abspath(__file__)


class TestRegistry:
    """Records vanish with their sockets: the registry never grows with churn."""

    @pytest.mark.usefixtures("installed")
    def test_churn_is_bounded(self) -> None:
        for _ in range(5000):
            socket.socket().close()
        socks = [socket.socket() for _ in range(10)]
        try:
            assert registry.stats()["records"] < 200
            assert registry.prune() >= 10
        finally:
            for s in socks:
                s.close()

    @pytest.mark.usefixtures("installed")
    def test_garbage_collected_socket_drops_record(self) -> None:
        s = socket.socket()
        fd = s.fileno()
        assert registry.get(fd) is not None
        s.close()
        del s
        gc.collect()
        assert registry.get(fd) is None

    @pytest.mark.usefixtures("installed")
    def test_detached_socket_drops_record(self) -> None:
        s = socket.socket()
        fd = s.detach()
        try:
            assert registry.get(fd) is None
        finally:
            os.close(fd)

    @pytest.mark.usefixtures("installed")
    def test_failure_inside_hook_is_contained(self, hot_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
        from leakguard import stacks

        class Broken:
            def __call__(self, *a: object, **k: object) -> None:
                raise RuntimeError("leakguard bug")

        if hot_path == "compiled":
            # No file is known yet and asking about one fails: the walk, inside the record, fails.
            sp = registry._speedups
            sp.configure(registry._records, {}, Broken(), registry.mark(), registry._scope, 48, 3)
            sp.clear_app_cache()

            def restore() -> None:
                sp.configure(
                    registry._records, stacks._app_files, stacks.is_app_file, registry.mark(), registry._scope, 48, 3
                )
                sp.clear_app_cache()

        else:
            monkeypatch.setattr(stacks, "capture", Broken())
            restore = lambda: None  # noqa: E731
        errors = registry.stats()["hook_errors"]
        try:
            with socket.socket() as s:
                assert s.fileno() >= 0 and registry.get(s.fileno()) is None
                s.bind(("127.0.0.1", 0))  # the socket itself works normally
        finally:
            restore()
        assert registry.stats()["hook_errors"] == errors + 1

    @pytest.mark.usefixtures("installed")
    def test_socket_errors_unchanged(self) -> None:
        with pytest.raises(OSError) as installed_exc:
            socket.socket(12345, socket.SOCK_STREAM)
        leakguard.uninstall()
        with pytest.raises(OSError) as plain_exc:
            socket.socket(12345, socket.SOCK_STREAM)
        leakguard.install()
        assert type(installed_exc.value) is type(plain_exc.value)
        assert installed_exc.value.args == plain_exc.value.args
        with pytest.raises(TypeError):
            socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, None, "extra")  # type: ignore[call-arg]


@pytest.mark.usefixtures("installed", "hot_path")
class TestEntryReuse:
    """The compiled hook rewrites a reused descriptor's old entry in place when the table
    alone holds it: what anyone else holds never changes, and the new record is whole."""

    def make(self) -> socket.socket:
        return socket.socket()

    def test_reused_descriptor_describes_the_new_socket(self) -> None:
        a = self.make()
        fd = a.fileno()
        first = registry.entry(fd)
        assert first is not None
        a_seq, a_created = first[2], first[1]
        del first  # the table alone holds the entry now: it is rewritten in place
        a.close()
        b = socket.socket()
        line = this_line() - 1
        try:
            assert b.fileno() == fd
            e = registry.entry(fd)
            assert e is not None and e[0]() is b
            assert e[2] > a_seq and e[1] >= a_created
            rec = registry.get(fd)
            assert rec is not None and rec.seq == e[2] and rec.alive()
            assert (HERE, line, "test_reused_descriptor_describes_the_new_socket") in [
                (os.path.abspath(f.file), f.line, f.function) for f in rec.stack()
            ]
            assert "make" not in [f.function for f in rec.stack()]  # nothing left of the old stack
        finally:
            b.close()

    def test_held_entry_and_values_never_change(self) -> None:
        a = self.make()
        fd = a.fileno()
        held = registry.entry(fd)
        assert held is not None
        before = tuple(held)
        seq, created = held[2], held[1]
        seq_value, created_value = int(seq), float(created)
        a.close()
        for _ in range(3):  # the same descriptor again and again
            s = socket.socket()
            assert s.fileno() == fd
            assert registry.entry(fd) is not held
            s.close()
        assert tuple(held) == before and held[2] is seq and held[1] is created
        assert int(seq) == seq_value and float(created) == created_value

    def test_held_values_alone_never_change(self) -> None:
        """Holding only the seq or the time (as marks and reports do) keeps those objects as they were."""
        a = self.make()
        fd = a.fileno()
        e = registry.entry(fd)
        assert e is not None
        seq, created = e[2], e[1]
        seq_value, created_value = int(seq), float(created)
        del e
        a.close()
        b = self.make()
        try:
            assert b.fileno() == fd
            assert int(seq) == seq_value and float(created) == created_value
            new = registry.entry(fd)
            assert new is not None and new[2] == seq_value + 1 and new[2] is not seq and new[1] is not created
        finally:
            b.close()

    @pytest.mark.parametrize("start", [2**30 - 3, 2**60 - 3, 2**62])
    def test_sequence_numbers_across_digit_boundaries(self, start: int) -> None:
        """An int gains a digit at 2**30 and 2**60: one rewritten in place keeps its size, the others are new."""
        from leakguard import stacks

        sp = registry._speedups
        if sp is None:
            pytest.skip("the compiled hot path is not built here (pure-Python install)")
        before = registry.mark()
        sp.configure(registry._records, stacks._app_files, stacks.is_app_file, start, registry._scope, 48, 3)
        try:
            seen = []
            for _ in range(6):
                s = self.make()
                e = registry.entry(s.fileno())
                assert e is not None
                seen.append(e[2])
                del e
                s.close()
            assert seen == list(range(start + 1, start + 7))  # both hooks share the counter
            assert registry.mark() == start + 7
        finally:
            sp.configure(registry._records, stacks._app_files, stacks.is_app_file, before, registry._scope, 48, 3)
