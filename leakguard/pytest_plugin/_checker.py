"""The checker: attributes each socket to a test or a fixture, and judges it at the test's teardown.

Sequence numbers (:func:`registry.mark`) say which sockets were created during a test's
setup, call or teardown.  A wider-scoped fixture's sockets are claimed for it
(:mod:`._ownership`); those left are the test's.  At the end of the teardown every
candidate still open gets the grace period (one ``gc.collect()`` and
:func:`judge.settle`'s back-off), the ignore globs of the settings and the test's
``leakguard`` marker (:func:`judge.matching`), then the judge's diagnosis
(:func:`judge.diagnosed`); the verdict goes on the test's teardown report.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import pytest

from leakguard import _state, judge, kernel, registry, stacks
from leakguard.snapshot import SocketInfo
from leakguard.snapshot import take as _take_snapshot

from . import _gcwatch
from ._gcwatch import GcEvent
from ._gcwatch import events as gc_events
from ._ownership import Fixture, adopt_accepted, adopt_reachable, drop_process_wide, sock_of
from ._settings import Settings, matched_globs
from ._terminal import gc_text, leak_text, register_findings

__all__ = ["Checker"]

_result_key = pytest.StashKey["_Verdict"]()
_failed_key = pytest.StashKey[bool]()
_VERDICTS = "leakguard-verdicts"
#: pytest-timeout's thread-method timer of a test: (when it was set, its settings)
_timer_key = pytest.StashKey[tuple[float, Any]]()


def _peer(rec: registry.Record) -> str | None:
    sock = sock_of(rec)
    if sock is None:
        return None
    try:
        return kernel.format_address(sock.family, sock.getpeername())
    except OSError:
        return None


def _matches(rec: registry.Record, globs: Iterable[str], peer: str | None = None) -> bool:
    """Does one of *globs* match *rec*'s creation site (as shown, or ``file:LINE``), peer or target?
    (The globs are the plugin's settings and markers; :func:`judge.matching` matches.)"""
    globs = tuple(globs)
    if not globs:
        return False
    site = stacks.creation_site(rec.stack())
    names = []
    if site is not None:
        names += [stacks.format_site(site), f"{site.file}:{site.line}"]
    peer = peer if peer is not None else _peer(rec)
    if peer:
        names.append(peer)
    if rec.target:
        names.append(rec.target)
    hit = judge.matching(names, globs)
    matched_globs.update(hit)  # every glob that matched, for the summary's "matched nothing"
    return bool(hit)


@contextlib.contextmanager
def _own_time(item: pytest.Item | None = None) -> Iterator[None]:
    """The plugin's own work (gc, grace, diagnosis) with the test's timeout paused.

    pytest-timeout measures the test (setup, call and teardown): the time leakguard
    spends judging it is not the test's, and its timeout must not fire inside leakguard
    (an exception raised there, or the whole run ended by the thread method).  The
    signal method's real-time interval timer (or any ``setitimer(ITIMER_REAL)``) is
    stopped and its remaining time and interval restored exactly afterwards; the thread
    method's timer is cancelled and set again for what was left, through
    pytest-timeout's own hooks.  No timer: nothing is touched.
    """
    try:
        remaining, interval = signal.getitimer(signal.ITIMER_REAL)
        if remaining > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except (AttributeError, OSError, ValueError):  # no setitimer here (Windows)
        remaining = interval = 0.0
    timer = item.stash.get(_timer_key, None) if item is not None else None
    if timer is not None:
        start, settings = timer
        left = settings.timeout - (time.monotonic() - start)
        try:
            item.config.hook.pytest_timeout_cancel_timer(item=item)  # type: ignore[union-attr]
        except Exception:  # another pytest-timeout than we know: its timer runs on
            registry.count_error()
            timer = None
    try:
        yield
    finally:
        if timer is not None:
            try:
                # Never 0: pytest-timeout reads that as "no timeout"; an overdue test times out at once.
                again = settings._replace(timeout=max(left, 1e-3))
                item.config.hook.pytest_timeout_set_timer(item=item, settings=again)  # type: ignore[union-attr]
            except Exception:
                registry.count_error()
        if remaining > 0:
            signal.setitimer(signal.ITIMER_REAL, remaining, interval)


def _timer_thread(t: threading.Thread) -> bool:
    """pytest-timeout's ``--timeout-method=thread`` timer: a thread that closes no socket."""
    return isinstance(t, threading.Timer) and t.name.startswith("pytest_timeout ")


def _loop_internal(rec: registry.Record) -> bool:
    """An asyncio event loop's self-pipe (a socketpair the loop makes for itself).

    It belongs to the loop object, not to a connection: a loop left unclosed (some
    plugins keep one per session) is not a socket leak of the test that ran last.
    """
    return any(f.function == "_make_self_pipe" and "asyncio" in f.file for f in rec.stack()[-3:])


def _settle(recs: list[registry.Record], grace: float, quiet: frozenset[int] = frozenset()) -> list[registry.Record]:
    """Those of *recs* still open after a gc.collect() and a bounded back-off (goleak's retry).

    The back-off is skipped when no thread but those in *quiet* (there before the
    tests began: the main thread, xdist's) is running: then nothing can close a
    socket while we wait.
    """
    alive = [r for r in recs if r.alive()]
    if not alive:
        return alive
    gc.collect()
    alive = [r for r in alive if r.alive()]
    if alive and all(t.ident in quiet or _timer_thread(t) for t in threading.enumerate()):
        return alive
    alive = judge.settle(alive, registry.Record.alive, grace)
    if alive:
        gc.collect()  # finalizers run by the first collection may have freed more
        alive = [r for r in alive if r.alive()]
    return alive


def _infos(recs: list[registry.Record], fixtures: Iterable[Fixture] = ()) -> list[SocketInfo]:
    """Kernel state joined with each record (read only for sockets judged leaked), with the judge's diagnosis.

    The values of *fixtures* still set up are roots of the diagnosis's paths ("fixture `client`").
    """
    try:
        snap = _take_snapshot()
        by_rec = {id(s.record): s for s in snap.sockets if s.record is not None}
    except Exception:
        by_rec = {}
    now = time.monotonic()
    out = []
    for rec in recs:
        info = by_rec.get(id(rec))
        if info is None:
            info = SocketInfo(
                rec.fd, "?", "socket", None, None, _peer(rec), round(now - rec.created, 3), rec.origin, rec.target, rec
            )
        out.append(info)
    roots = [(f"fixture `{fx.name}`", obj) for fx in fixtures for obj in fx.roots()]
    return judge.diagnosed(out, roots=roots)


class _Verdict:
    """What the teardown check found, for the teardown report."""

    def __init__(self) -> None:
        self.fail_text: list[str] = []
        self.warn_text: list[str] = []
        self.test_leaks = 0
        self.fixture_leaks = 0
        self.gc_closed = 0
        self.kind: str | None = None  # "test" when the test itself fails, "fixture" for a fixture error
        self.kept: list[str] = []  # process-wide pools holding this test's idle sockets, first sight

    def summary(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "kind": self.kind,
            "test_leaks": self.test_leaks,
            "fixture_leaks": self.fixture_leaks,
            "gc_closed": self.gc_closed,
            "warnings": self.warn_text,
        }


def _marker_allow(item: pytest.Item) -> tuple[int, tuple[str, ...]]:
    count = 0
    globs: tuple[str, ...] = ()
    for mark in item.iter_markers("leakguard"):
        allow = mark.kwargs.get("allow", mark.args[0] if mark.args else 0)
        unknown = set(mark.kwargs) - {"allow"}
        if unknown:
            raise pytest.UsageError(f"leakguard marker: unknown argument(s) {', '.join(sorted(unknown))}; use allow=")
        if isinstance(allow, bool) or not isinstance(allow, (int, str, list, tuple)):
            raise pytest.UsageError(f"leakguard marker: allow= takes a count or globs, not {allow!r}")
        if isinstance(allow, int):
            count = max(count, allow)
        elif isinstance(allow, str):
            globs += (allow,)
        else:
            globs += tuple(str(g) for g in allow)
    return count, globs


class Checker:
    """The per-process part: attributes sockets to tests and fixtures and judges them."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.we_installed = False
        self.mark = 0  # seq taken at the start of the current test's setup
        self.taken = 0  # seq numbers this plugin consumed since then (not sockets)
        self.fixtures: dict[Any, Fixture] = {}  # active wider-scoped fixtures by FixtureDef
        self.claimed: dict[int, Fixture] = {}  # record seq -> owning fixture
        self.pending: list[Fixture] = []  # torn down, to be judged at the end of this teardown
        self.item: pytest.Item | None = None
        self.session_notes: list[str] = []
        self.quiet: frozenset[int] = frozenset()  # threads running before any test
        self.verdicts = 0  # verdicts stashed on items, not yet put on their teardown report
        self.kept: set[str] = set()  # process-wide pools already named (module globals)

    # -- lifecycle

    def pytest_configure(self, config: pytest.Config) -> None:
        # Called on registration (pytest_configure is historic).
        if not _state.installed():
            try:
                _state.install()
            except ValueError as exc:  # a bad LEAKGUARD_<OPTION> in the environment
                raise pytest.UsageError(f"leakguard: {exc}") from None
            self.we_installed = True
        if self.settings.gc != "off":
            _gcwatch.watch()
        self.mark = self._take()
        self.quiet = frozenset(t.ident for t in threading.enumerate() if t.ident is not None)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.settings.gc != "off":
            _gcwatch.unwatch()
        if self.we_installed:
            _state.uninstall()
            self.we_installed = False

    def _take(self) -> int:
        self.taken += 1
        return registry.mark()

    # -- attribution

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.item = item
        self.taken = 0
        self.mark = registry.mark()

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: Any, request: Any) -> Iterator[Any]:
        if fixturedef.scope == "function":
            return (yield)
        begin = self._take()
        try:
            return (yield)
        finally:
            end = self._take()
            try:
                self._claim(fixturedef, request, begin, end)
            except Exception:  # bookkeeping only; never break a fixture
                registry.count_error()

    def _claim(self, fixturedef: Any, request: Any, begin: int, end: int) -> None:
        node = self.item if self.item is not None else getattr(request, "node", None)
        fx = Fixture(fixturedef, fixturedef.argname, fixturedef.scope, getattr(node, "nodeid", "?"))
        if end - begin > 1:  # sockets were created meanwhile (or nested fixtures took numbers)
            for rec in registry.live_between(begin, end, self.claimed):
                fx.owned.append(rec)
                self.claimed[rec.seq] = fx
        self.fixtures[fixturedef] = fx

    def pytest_fixture_post_finalizer(self, fixturedef: Any, request: Any) -> None:
        fx = self.fixtures.pop(fixturedef, None)
        if fx is None:
            return
        try:
            # The fixture's value is still cached: the current test's open sockets reachable
            # from it are the fixture's (its teardown should have closed them).
            cands = self._candidates()
            if cands:
                with _own_time(self.item):
                    adopt_reachable(cands, [fx], self.claimed)
        except Exception:
            registry.count_error()
        self.pending.append(fx)

    def _created(self) -> bool:
        """Were sequence numbers taken since the current test began, beyond the plugin's own?
        (If not, no socket was created: none of this test's can be open.)  A few operations."""
        if self.item is None:
            return False
        self.taken += 1
        return registry.mark() - self.mark - self.taken > 0

    def _candidates(self, created: bool | None = None) -> list[registry.Record]:
        """The current test's sockets that are still open and not owned by a fixture."""
        if not (self._created() if created is None else created):
            return []
        return registry.live_between(self.mark, None, self.claimed)

    # -- pytest-timeout (see _own_time)

    @pytest.hookimpl(optionalhook=True, tryfirst=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings: Any) -> None:
        if getattr(settings, "method", None) == "thread":
            item.stash[_timer_key] = (time.monotonic(), settings)
        # None: pytest-timeout's own implementation sets the timer

    @pytest.hookimpl(optionalhook=True, tryfirst=True)
    def pytest_timeout_cancel_timer(self, item: pytest.Item) -> None:
        if _timer_key in item.stash:
            del item.stash[_timer_key]

    # -- judging

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        # trylast: after the fixtures' teardown, before pytest collects unraisable
        # exceptions (a ResourceWarning from our gc.collect() belongs to this test).
        # The common case first, in a few operations: no sequence number was taken since
        # the test began but the plugin's own (no socket was created, none can be open
        # from this test), no fixture finished and no socket was freed by the GC.
        created = self._created()
        if not (created or self.pending or gc_events):
            self.item = None
            return
        try:
            with _own_time(item):
                verdict = self._judge(item, created)
        except pytest.UsageError:
            raise
        except Exception as exc:  # never break the run over our own bug
            registry.count_error()
            verdict = _Verdict()
            verdict.warn_text.append(f"leakguard: internal error while checking this test: {exc!r}")
        finally:
            self.item = None
        if verdict is not None:
            item.stash[_result_key] = verdict
            self.verdicts += 1
            pm = self.config.pluginmanager
            if pm.get_plugin(_VERDICTS) is None:  # registered now: the teardown report is made next
                pm.register(_OnTeardownReport(self), _VERDICTS)

    def _judge(self, item: pytest.Item, created: bool) -> _Verdict | None:
        """*created*: sequence numbers were taken during the test (sockets may be open)."""
        settings = self.settings
        pending, self.pending = self.pending, []
        cands = self._candidates(created)
        if not (cands or pending or gc_events):
            return None  # this test opened no socket that is still open
        verdict = _Verdict()
        skip = None
        if item.get_closest_marker("no_leakguard") is not None:
            skip = "no_leakguard"
        elif item.stash.get(_failed_key, False):
            skip = "the test failed"
        elif item.get_closest_marker("xfail") is not None:
            skip = "the test is expected to fail"
        if skip:
            cands = []
        allow_n, allow_globs = _marker_allow(item) if cands else (0, ())
        globs = settings.ignore + allow_globs
        if cands and globs:
            cands = [r for r in cands if not _matches(r, globs)]
        cands = [r for r in cands if not _loop_internal(r)]
        if cands:
            cands = drop_process_wide(cands, self.kept, verdict.kept)
        if cands:
            cands = adopt_accepted(cands, self.mark, self.claimed)
        if cands and self.fixtures:
            cands = adopt_reachable(cands, list(self.fixtures.values()), self.claimed)
        fixture_recs = [(fx, r) for fx in pending for r in fx.owned if r.alive()]
        for fx in pending:
            for r in fx.owned:
                self.claimed.pop(r.seq, None)
        fixture_recs = [
            (fx, r) for fx, r in fixture_recs if not _matches(r, settings.ignore) and not _loop_internal(r)
        ]
        if fixture_recs:
            fixture_recs = drop_process_wide(fixture_recs, self.kept, verdict.kept)
        if cands or fixture_recs:
            # Every fixture of this test is torn down, but pytest drops the values it
            # handed the test only after this hook: let go of them now, so that an
            # object nothing else holds is freed here as it would be a moment later.
            funcargs = getattr(item, "funcargs", None)
            if isinstance(funcargs, dict):
                funcargs.clear()
            still = {id(r) for r in _settle(cands + [r for _, r in fixture_recs], settings.grace, self.quiet)}
            cands = [r for r in cands if id(r) in still]
            fixture_recs = [(fx, r) for fx, r in fixture_recs if id(r) in still]
        if len(cands) <= allow_n:
            cands = []
        fail = settings.mode == "fail"
        if cands:
            infos = _infos(cands, self.fixtures.values())
            text = leak_text("leakguard: this test left", infos, item)
            verdict.test_leaks = len(infos)
            (verdict.fail_text if fail else verdict.warn_text).append(text)
            if fail:
                verdict.kind = "test"
        by_fixture: dict[int, tuple[Fixture, list[registry.Record]]] = {}
        for fx, r in fixture_recs:
            by_fixture.setdefault(id(fx), (fx, []))[1].append(r)
        for fx, recs in by_fixture.values():
            infos = _infos(recs, self.fixtures.values())
            text = leak_text(f"leakguard: {fx.label()}, set up for {fx.where}, left", infos, item)
            verdict.fixture_leaks += len(infos)
            (verdict.fail_text if fail else verdict.warn_text).append(text)
            if fail and verdict.kind is None:
                verdict.kind = "fixture"
        self._judge_gc(verdict, skip, pending)
        if not (verdict.fail_text or verdict.warn_text or verdict.kept):
            return None
        return verdict

    def _judge_gc(self, verdict: _Verdict, skip: str | None, pending: list[Fixture]) -> None:
        if not gc_events:
            return
        events = _gcwatch.take_events()
        finished = {r.seq: fx for fx in pending for r in fx.owned}
        mine: list[GcEvent] = []
        others: list[GcEvent] = []
        by_fixture: dict[int, tuple[Fixture, list[GcEvent]]] = {}
        for ev in events:
            if _matches(ev.rec, self.settings.ignore, ev.peer):
                continue
            fx = self.claimed.get(ev.seq) or finished.get(ev.seq)
            if fx is not None:
                by_fixture.setdefault(id(fx), (fx, []))[1].append(ev)
            elif ev.seq > self.mark:
                mine.append(ev)
            else:
                others.append(ev)
        fail = self.settings.gc == "fail"
        if mine and not skip:
            verdict.gc_closed += len(mine)
            text = gc_text(mine, "opened by this test")
            if fail:
                verdict.fail_text.append(text)
                verdict.kind = "test"
            else:
                verdict.warn_text.append(text)
        for fx, evs in by_fixture.values():
            verdict.gc_closed += len(evs)
            text = gc_text(evs, f"opened by {fx.label()}, set up for {fx.where},")
            if fail and fx in pending:
                verdict.fail_text.append(text)
                verdict.kind = verdict.kind or "fixture"
            else:
                verdict.warn_text.append(text)
        if others:
            verdict.gc_closed += len(others)
            verdict.warn_text.append(gc_text(others, "opened before this test (at import or by an earlier test)"))

    def pytest_exception_interact(self, node: Any, call: pytest.CallInfo[Any], report: Any) -> None:
        # Called for a failing setup, call or teardown only (not for a passing test, nor a
        # skip or xfail): a failed test is not judged, and no hook runs for the others.
        if call.when != "teardown" and isinstance(node, pytest.Item):
            node.stash[_failed_key] = True

    def attach(self, item: pytest.Item, rep: pytest.TestReport) -> None:
        """Put the verdict stashed on *item* by its teardown on its teardown report."""
        verdict = item.stash.get(_result_key, None)
        if verdict is None:
            return
        del item.stash[_result_key]
        self.verdicts -= 1
        if verdict.fail_text:
            text = "\n\n".join(verdict.fail_text)
            if rep.passed:
                rep.outcome = "failed"
                rep.longrepr = text
            else:  # the teardown failed for its own reasons: keep them, add ours
                rep.sections.append(("leakguard", text))
        if verdict.warn_text:
            rep.sections.append(("leakguard warnings", "\n\n".join(verdict.warn_text)))
        rep.leakguard = verdict.summary()  # type: ignore[attr-defined]  # travels through xdist
        register_findings(self.config)  # before this report is logged

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Iterator[None]:
        workeroutput = getattr(self.config, "workeroutput", None)
        if isinstance(workeroutput, dict):  # an xdist worker: sent to the controller, which prints the summary
            workeroutput["leakguard_matched"] = sorted(matched_globs)
        result = yield
        # Fixtures finalized outside any test's teardown (an interrupted run).
        pending = [fx for fx in self.pending if any(r.alive() for r in fx.owned)]
        self.pending = []
        for fx in pending:
            recs = _settle([r for r in fx.owned if r.alive()], self.settings.grace, self.quiet)
            if recs:
                self.session_notes.append(leak_text(f"leakguard: {fx.label()}, set up for {fx.where}, left", _infos(recs)))
        events = _gcwatch.take_events() if gc_events else []
        if events:
            self.session_notes.append(gc_text(events, "opened during the session"))
        return result


class _OnTeardownReport:
    """Puts each verdict on its test's teardown report.  Registered with the first verdict:
    pytest makes three reports per test and a suite without leaks should not pay for a
    hook wrapper around each of them."""

    def __init__(self, checker: Checker) -> None:
        self.checker = checker

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        rep = yield
        if call.when == "teardown" and self.checker.verdicts:
            try:
                self.checker.attach(item, rep)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                # A signal handler's exception (pytest-timeout's alarm) raised in these few
                # lines: raised here it would be an INTERNALERROR; it is the test's failure.
                rep.outcome = "failed"
                rep.longrepr = f"{type(exc).__name__}: {exc}"
        return rep
