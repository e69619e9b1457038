"""Terminal output: the failure text of a leak, and the run's summary.

:func:`leak_text` and :func:`gc_text` write the paragraph a failing test's report carries.
:class:`Summary` (registered when the plugin is on) adds up the findings each teardown
report carries (``report.leakguard``, which travels through xdist) and writes the
"leakguard warnings" section and the closing count in ``pytest_terminal_summary``;
:class:`Findings` gives a test that leaked the status "failed".
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from leakguard import report, stacks
from leakguard.snapshot import SocketInfo

from ._gcwatch import GcEvent
from ._settings import Settings, matched_globs

__all__ = ["FINDINGS", "SUMMARY", "Findings", "Summary", "gc_text", "leak_text", "plural", "register_findings"]

_MAX_SUMMARY_BLOCKS = 30


def _short(g: report.LeakGroup) -> str:
    """``test_x.py:12 (CLOSE_WAIT, peer 127.0.0.1:5000)``; a group: ``(15 sockets: CLOSE_WAIT, ...)``."""
    o = g.oldest
    bits = [", ".join(g.states()) if o.state else o.type]
    peers = g.peers()
    if peers and peers[0][0] != "?":
        bits.append(f"peer {peers[0][0]}" + (f" and {len(peers) - 1} more" if len(peers) > 1 else ""))
    count = f"{g.count} sockets: " if g.count > 1 else ""
    return f"{g.site if o.stack else '<unknown site>'} ({count}{', '.join(bits)})"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _test_marks(infos: list[SocketInfo], item: Any) -> dict[stacks.Frame, str]:
    """The test function's own frames in the creation stacks: marked, so the test's line stands out."""
    path = getattr(item, "path", None)
    name = getattr(item, "originalname", None) or getattr(item, "name", None)
    if path is None or not name:
        return {}
    where = str(path)
    marks: dict[stacks.Frame, str] = {}
    for info in infos:
        for fr in info.stack:
            if fr.function == name and fr not in marks and os.path.abspath(fr.file) == where:
                marks[fr] = "<- the test"
    return marks


def leak_text(head: str, infos: list[SocketInfo], item: Any = None) -> str:
    """The failure: one line naming each creation site, state and peer, then one block per group of
    sockets (creation site and verdict: what holds them, the fix, the stack with the test's line marked)."""
    with stacks.rendering():
        groups = report.group(infos)
        first = f"{head} {plural(len(infos), 'socket')} open, created at " + ", ".join(_short(g) for g in groups)
        marks = _test_marks(infos, item) if item is not None else None
        blocks = [report.format_group(g, marks=marks, trim_outer=True) for g in groups]
    return "\n\n".join([first] + blocks)


def gc_text(events: list[GcEvent], whose: str) -> str:
    now = time.monotonic()
    blocks = []
    for ev in events:
        rec = ev.rec
        stack = rec.stack()
        line = f"Unclosed {ev.kind} socket fd={rec.fd} freed by the garbage collector: origin={rec.origin}"
        if rec.target:
            line += f" target={rec.target}"
        if ev.peer:
            line += f" peer={ev.peer}"
        line += f" age={max(ev.at - rec.created, 0.0):.1f}s freed {now - ev.at:.1f}s ago"
        line += f" created at {stacks.format_site(stacks.creation_site(stack))}" if stack else " creation stack unknown"
        block = [line]
        if stack:
            block += ["  created by:", report.format_stack(stacks.from_application(stack))]
        blocks.append("\n".join(block))
    sites = ", ".join(stacks.format_site(stacks.creation_site(e.rec.stack())) for e in events)
    head = f"leakguard: {plural(len(events), 'socket')} {whose} never closed; the garbage collector freed {'it' if len(events) == 1 else 'them'}: {sites}"
    return "\n\n".join([head] + blocks)


class Findings:
    """What leakguard's own teardown reports add to the run: their status and their counts.

    The xdist controller registers it with the summary (the workers' reports arrive
    there).  A process that runs tests registers it with its first verdict, before that
    report is logged: until then there is nothing for it to do, and pytest would call
    both hooks for every report, three per test (a suite that leaks nothing should not
    pay for that).
    """

    def __init__(self, summary: Summary) -> None:
        self.summary = summary

    def pytest_report_teststatus(self, report: pytest.TestReport) -> tuple[str, str, str] | None:
        info = getattr(report, "leakguard", None)
        if info and report.when == "teardown" and report.failed and info.get("kind") == "test":
            return "failed", "F", "FAILED"  # the test's own leak: a failure, not a fixture error
        return None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "teardown":
            info = getattr(report, "leakguard", None)
            if info:
                self.summary.add(report, info)


FINDINGS = "leakguard-findings"
SUMMARY = "leakguard-summary"


def register_findings(config: pytest.Config) -> None:
    """Make sure :class:`Findings` sees the reports from now on (idempotent)."""
    pm = config.pluginmanager
    if pm.get_plugin(FINDINGS) is None:
        summary = pm.get_plugin(SUMMARY)
        if isinstance(summary, Summary):
            pm.register(Findings(summary), FINDINGS)


def _teardown_reports(terminalreporter: Any) -> int:
    """How many teardown reports were logged: the terminal keeps every report in ``stats``."""
    stats = getattr(terminalreporter, "stats", None) or {}
    return sum(1 for reports in stats.values() for rep in reports if getattr(rep, "when", None) == "teardown")


class Summary:
    """Counts and texts from the teardown reports (also those an xdist worker sends).

    Tests count as checked by their teardown reports, read from the terminal's
    ``stats`` once at the end; :class:`Findings` adds what leakguard found.
    """

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.leaky_tests = 0
        self.test_leaks = 0
        self.fixture_leaks = 0
        self.gc_closed = 0
        self.warnings: list[tuple[str, str]] = []
        self.matched: set[str] = set()  # ignore globs the xdist workers saw match
        self.kept: dict[str, str] = {}  # process-wide pool -> the first test whose socket it kept

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """An xdist worker finished: the ignore globs that matched there."""
        self.matched.update(getattr(node, "workeroutput", {}).get("leakguard_matched", ()))

    def unmatched(self) -> list[str]:
        """The ignore globs that matched no socket in any process of this run."""
        seen = self.matched | matched_globs
        return [g for g in self.settings.ignore if g not in seen]

    def add(self, report: pytest.TestReport, info: dict[str, Any]) -> None:
        """A teardown report that carries leakguard's findings (``report.leakguard``)."""
        if info.get("kind") == "test" and report.failed:
            self._uncount_call(report)
        if info.get("test_leaks"):
            self.leaky_tests += 1
            self.test_leaks += info["test_leaks"]
        self.fixture_leaks += info.get("fixture_leaks", 0)
        self.gc_closed += info.get("gc_closed", 0)
        for text in info.get("warnings") or ():
            self.warnings.append((report.nodeid, text))
        for where in info.get("kept") or ():
            self.kept.setdefault(where, report.nodeid)

    def _uncount_call(self, report: pytest.TestReport) -> None:
        """A leaking test counts once, as failed: not also as passed for its call phase.

        The terminal files each report under its status in ``stats`` as it is logged, and
        the call phase is logged before the teardown that finds the leak; pytest offers no
        hook to re-file a logged report (``count_towards_summary`` is read-only), so the
        call's report is taken out of ``passed`` here, the one place leakguard touches
        the terminal's state."""
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        passed = getattr(tr, "stats", {}).get("passed") if tr is not None else None
        if not passed:
            return
        for rep in passed:
            if getattr(rep, "when", None) == "call" and rep.nodeid == report.nodeid:
                passed.remove(rep)
                break

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        checker = self.config.pluginmanager.get_plugin("leakguard-checker")
        notes = list(getattr(checker, "session_notes", []) or [])
        if self.warnings or notes:
            tr.write_sep("=", "leakguard warnings", yellow=True)
            shown = self.warnings[:_MAX_SUMMARY_BLOCKS]
            for nodeid, text in shown:
                tr.write_line(f"{nodeid}:")
                for line in text.splitlines():
                    tr.write_line("  " + line if line else "")
                tr.write_line("")
            if len(self.warnings) > len(shown):
                tr.write_line(f"... and {len(self.warnings) - len(shown)} more")
            for text in notes:
                tr.write_line(text)
                tr.write_line("")
        for where, nodeid in self.kept.items():
            tr.write_line(
                f"leakguard: kept by process-wide pool `{where}` (first in {nodeid}):"
                " sockets idle in it are not counted as leaks"
            )
        unmatched = self.unmatched()
        if unmatched:
            tr.write_line(
                f"leakguard: {plural(len(unmatched), 'ignore pattern')} matched no socket: {', '.join(unmatched)}",
                yellow=True,
            )
        parts = [f"{plural(_teardown_reports(tr), 'test')} checked"]
        parts.append(f"{plural(self.test_leaks, 'leaked socket')} in {plural(self.leaky_tests, 'test')}")
        if self.fixture_leaks:
            parts.append(f"{plural(self.fixture_leaks, 'leaked socket')} in fixtures")
        parts.append(f"{plural(self.gc_closed, 'socket')} closed by the garbage collector")
        line = f"leakguard ({self.settings.mode} mode): " + ", ".join(parts)
        bad = self.test_leaks or self.fixture_leaks
        tr.write_line(line, red=bool(bad) and self.settings.mode == "fail", yellow=bool(bad or self.gc_closed))
