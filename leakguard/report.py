"""Render snapshots and leaked sockets for people: one block per leak, goleak-style."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import stacks

if TYPE_CHECKING:
    from .snapshot import Snapshot, SocketInfo

__all__ = ["Reporter", "describe", "format_leak", "format_snapshot", "format_stack", "get_logger", "summary_line"]

_STATE_WORDS = {
    "CLOSE_WAIT": "CLOSE_WAIT (the peer closed it, your code never did)",
}


def format_stack(stack: list[stacks.Frame], limit: int = 8, indent: str = "    ") -> str:
    """Innermost *limit* frames, traceback style (outermost first)."""
    shown = stack[-limit:] if limit else stack
    lines = []
    if len(shown) < len(stack):
        lines.append(f"{indent}... {len(stack) - len(shown)} outer frames")
    for fr in shown:
        lines.append(f'{indent}File "{stacks.relpath(fr.file)}", line {fr.line}, in {fr.function}')
    return "\n".join(lines)


def describe(info: SocketInfo) -> str:
    """One self-describing line: state, origin, peer, age, creation site."""
    state = _STATE_WORDS.get(info.state or "", info.state or "no state")
    parts = [f"{info.type} socket fd={info.fd} in {state}"]
    parts.append(f"origin={info.origin}")
    if info.target:
        parts.append(f"target={info.target}")
    if info.remote:
        parts.append(f"peer={info.remote}")
    if info.local:
        parts.append(f"local={info.local}")
    if info.age_s is not None:
        parts.append(f"age={info.age_s:.1f}s")
    parts.append(f"created at {info.site_str}" if info.stack else "creation stack unknown")
    return " ".join(parts)


def format_leak(info: SocketInfo, stack_limit: int = 8) -> str:
    head = f"Leaked {describe(info)}"
    body = [head]
    if info.reason:
        body.append(f"  why: {info.reason}")
    if info.stack:
        body.append("  created by:")
        body.append(format_stack(info.stack, stack_limit))
    return "\n".join(body)


def summary_line(snap: Snapshot) -> str:
    counts = ", ".join(f"{k}={v}" for k, v in sorted(snap.counts.items())) or "no TCP sockets"
    tracked = sum(1 for s in snap.sockets if s.record is not None)
    limit = snap.fds_limit if snap.fds_limit >= 0 else "unlimited"
    return (
        f"leakguard: pid {snap.pid}: {len(snap.sockets)} sockets ({tracked} tracked), TCP {counts}; "
        f"{len(snap.leaks)} leaked; fds {snap.fds_open}/{limit}"
    )


def format_snapshot(snap: Snapshot, stack_limit: int = 8) -> str:
    out = [summary_line(snap)]
    for info in snap.leaks:
        out.append("")
        out.append(format_leak(info, stack_limit))
    return "\n".join(out)


# --- periodic reports as structlog events (Reporter) ----------------------------------------------

#: A group still leaking is reported again when its count changes, or after this many seconds.
REPEAT_S = 60.0
#: Share of RLIMIT_NOFILE in use above which a warning event is emitted.
FD_WARN_RATIO = 0.8


def get_logger(log_format: str = "auto") -> Any:
    """The host's structlog logger when it configured structlog, else readable stderr lines.

    ``log_format="json"`` forces JSON lines; ``"console"`` forces readable lines.
    """
    import structlog

    if log_format == "auto" and structlog.is_configured():
        return structlog.get_logger("leakguard")
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=True)
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
        if _console_has_pad_event_to()
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.wrap_logger(
        _StderrLogger(),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        context_class=dict,
        cache_logger_on_first_use=False,
    )


_PAD: list[bool] = []


def _console_has_pad_event_to() -> bool:
    if not _PAD:
        import inspect

        import structlog.dev

        try:
            _PAD.append("pad_event_to" in inspect.signature(structlog.dev.ConsoleRenderer).parameters)
        except (TypeError, ValueError):  # pragma: no cover
            _PAD.append(False)
    return _PAD[0]


def _preload() -> None:
    """Import now, in the installing thread, what reports need later in the watcher thread.

    A module half-imported by the watcher thread at the moment another thread
    forks stays half-imported in the child forever (its import lock is never
    released there): nothing may be imported lazily on the watcher's path.
    """
    import structlog.dev  # noqa: F401
    import structlog.processors  # noqa: F401
    import structlog.testing  # noqa: F401

    _console_has_pad_event_to()


class _StderrLogger:
    """Writes to whatever ``sys.stderr`` is at the moment (pytest swaps it).

    The process's own stderr is written with ``os.write`` on its descriptor, not
    through the stream's buffer: a write blocked on a full pipe then holds no
    lock of the host's, so a process forked meanwhile (the fork does not wait
    for the watcher) finds ``sys.stderr`` usable rather than locked forever.
    """

    def msg(self, message: str) -> None:
        import sys

        stream = sys.stderr
        text = message + "\n"
        try:
            if stream is not None and stream is sys.__stderr__ and _write_fd(stream, text):
                return
            stream.write(text)
            stream.flush()
        except (OSError, ValueError, AttributeError, RuntimeError, UnicodeError):
            pass

    log = debug = info = warning = warn = error = critical = exception = fatal = failure = err = msg


def _write_fd(stream: Any, text: str) -> bool:
    """*text* written to *stream*'s descriptor, encoded as the stream would; False if it has none."""
    import os

    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return False
    data = memoryview(text.encode(stream.encoding or "utf-8", stream.errors or "backslashreplace"))
    while data:
        data = data[os.write(fd, data) :]
    return True


class _Group:
    """Leaked sockets sharing one creation site in one report."""

    __slots__ = ("infos", "site")

    def __init__(self, site: str) -> None:
        self.site = site
        self.infos: list[SocketInfo] = []

    def fields(self) -> dict[str, Any]:
        infos = self.infos
        oldest = max(infos, key=lambda i: i.age_s or 0.0)
        peers: dict[str, int] = {}
        states: dict[str, int] = {}
        for i in infos:
            peers[i.remote or "?"] = peers.get(i.remote or "?", 0) + 1
            states[i.state or "?"] = states.get(i.state or "?", 0) + 1
        ranked = sorted(peers, key=lambda p: -peers[p])
        state = max(states, key=lambda s: states[s])
        out: dict[str, Any] = {
            "site": self.site,
            "state": state,
            "peer": ranked[0],
            "count": len(infos),
            "oldest_age_s": round(oldest.age_s, 1) if oldest.age_s is not None else None,
            "peers": ranked[:5],
            "origin": oldest.origin,
            "target": oldest.target,
            "reason": oldest.reason,
            "sample_stack": [f"{stacks.relpath(f.file)}:{f.line} in {f.function}" for f in oldest.stack[-8:]],
        }
        if len(states) > 1:
            out["states"] = states
        if oldest.pool is not None:
            out["pool"] = oldest.pool
        return out


class _Seen:
    __slots__ = ("count", "first", "last_emit", "last_count")

    def __init__(self, now: float) -> None:
        self.count = 0
        self.first = now
        self.last_emit: float | None = None
        self.last_count = 0


class Reporter:
    """Turns snapshots into structlog events; keeps state between reports.

    Each :meth:`report` emits one ``leakguard.summary`` event, then, bounded in
    number, ``leakguard.fd_limit`` (descriptors near RLIMIT_NOFILE),
    ``leakguard.churn`` (see :mod:`leakguard.churn`), ``leakguard.leak`` per
    creation site (``status`` ``new`` or ``still_leaking``; a group still
    leaking is repeated when its count changes or every :data:`REPEAT_S`) and
    ``leakguard.leak_resolved``.  Volume: at most ``top_sites`` leak groups and
    ``max_events_per_report`` events per report, and a token bucket of
    ``max_events_per_minute`` across reports; what is dropped is counted in the
    summary's ``suppressed`` field.  Sockets inherited across ``fork()`` are
    counted in the summary (``inherited``, ``inherited_leaks``), never reported
    as this process's leaks: the parent reports them with their creation site.
    """

    def __init__(self, config: Any, logger: Any = None) -> None:
        _preload()
        self.config = config
        self._fixed_logger = logger
        self._logger: Any = None
        self._logger_kind: str | None = None
        self._groups: dict[str, _Seen] = {}
        self._sites: dict[int, str] = {}  # record seq -> its creation site, for leaks still open
        self._tokens = float(config.max_events_per_minute)
        self._refilled = time.monotonic()
        self.reports = 0

    # -- logger ---------------------------------------------------------------

    @property
    def logger(self) -> Any:
        """The host's structlog logger if it is configured *now*, else leakguard's own.

        Re-checked at every report: under ``leakguard run`` the host configures
        structlog after leakguard was installed.
        """
        if self._fixed_logger is not None:
            return self._fixed_logger
        import structlog

        fmt = self.config.log_format
        kind = "host" if fmt == "auto" and structlog.is_configured() else fmt
        if kind != self._logger_kind:
            self._logger = get_logger(fmt)
            self._logger_kind = kind
        return self._logger

    # -- budget ---------------------------------------------------------------

    def _refill(self, now: float) -> None:
        rate = self.config.max_events_per_minute / 60.0
        self._tokens = min(float(self.config.max_events_per_minute), self._tokens + (now - self._refilled) * rate)
        self._refilled = now

    # -- reports --------------------------------------------------------------

    def report(
        self,
        snap: Snapshot,
        inherited: set[int] | frozenset[int] = frozenset(),
        churn: list[Any] | None = None,
        dump: bool = False,
    ) -> int:
        """Emit the events for *snap*; returns how many events were emitted (summary included).

        With *dump* (on-demand, e.g. a signal) the rate limit does not apply and the
        state between periodic reports is left untouched.
        """
        now = time.monotonic()
        cfg = self.config
        groups: dict[str, _Group] = {}
        inherited_leaks = 0
        known, sites = self._sites, {}
        for info in snap.leaks:
            rec = info.record
            if rec is None:
                if info.fd is not None and info.fd in inherited:
                    inherited_leaks += 1
                    continue
                key = f"<unknown: origin={info.origin}>"
            else:
                cached = known.get(rec.seq)  # formatting a site is the costly part: once per record
                if cached is not None:
                    key = cached
                else:
                    key = info.site_str if rec.frames else f"<unknown: origin={info.origin}>"
                sites[rec.seq] = key
            g = groups.get(key)
            if g is None:
                g = groups[key] = _Group(key)
            g.infos.append(info)
        ranked = sorted(groups.values(), key=lambda g: (-len(g.infos), g.site))

        events: list[tuple[str, str, dict[str, Any]]] = []  # (level, event, fields)
        if snap.fds_limit > 0 and snap.fds_open >= FD_WARN_RATIO * snap.fds_limit:
            events.append(
                (
                    "warning",
                    "leakguard.fd_limit",
                    {
                        "fds_open": snap.fds_open,
                        "fds_limit": snap.fds_limit,
                        "used_pct": round(100.0 * snap.fds_open / snap.fds_limit, 1),
                        "message": "open file descriptors are close to RLIMIT_NOFILE; "
                        "new sockets and files will fail with 'Too many open files'",
                    },
                )
            )
        for w in churn or ():
            events.append(("warning", "leakguard.churn", {**w.to_dict(), "message": w.message}))

        new: list[tuple[str, str, dict[str, Any]]] = []
        grown: list[tuple[str, str, dict[str, Any]]] = []
        repeat: list[tuple[str, str, dict[str, Any]]] = []
        for g in ranked[: cfg.top_sites]:
            seen = self._groups.get(g.site)
            if seen is None or seen.last_emit is None:  # a new group suppressed last time is still new
                fields = g.fields()
                fields["status"] = "new"
                new.append(("warning", "leakguard.leak", fields))
                continue
            if dump or len(g.infos) != seen.last_count:
                into = grown
            elif now - seen.last_emit >= REPEAT_S:
                into = repeat
            else:
                continue
            fields = g.fields()
            fields["status"] = "still_leaking"
            fields["leaking_for_s"] = round(now - seen.first, 1)
            into.append(("warning", "leakguard.leak", fields))
        resolved: list[tuple[str, str, dict[str, Any]]] = []
        if not dump:
            for site, seen in self._groups.items():
                if site not in groups:
                    resolved.append(
                        (
                            "info",
                            "leakguard.leak_resolved",
                            {"site": site, "count_was": seen.count, "leaked_for_s": round(now - seen.first, 1)},
                        )
                    )
        events += new + grown + resolved[: cfg.top_sites] + repeat
        suppressed = max(0, len(ranked) - cfg.top_sites) + max(0, len(resolved) - cfg.top_sites)

        budget = cfg.max_events_per_report
        if not dump:
            self._refill(now)
            budget = min(budget, int(self._tokens))
        kept, dropped = events[:budget], events[budget:]
        suppressed += len(dropped)
        if not dump:
            self._tokens -= len(kept)

        tracked = n_inherited = 0
        for s in snap.sockets:  # s[9]: the record, s[0]: the fd (SocketInfo by index, once per socket)
            if s[9] is not None:
                tracked += 1
            elif inherited and s[0] in inherited:
                n_inherited += 1
        summary: dict[str, Any] = {
            "pid": snap.pid,
            "sockets": len(snap.sockets),
            "tracked": tracked,
            "unknown": len(snap.sockets) - tracked - n_inherited,
            "inherited": n_inherited,
            "counts": dict(sorted(snap.counts.items())),
            "leaks": len(snap.leaks) - inherited_leaks,
            "inherited_leaks": inherited_leaks,
            "leak_sites": len(groups),
            "fds_open": snap.fds_open,
            "fds_limit": snap.fds_limit,
            "suppressed": suppressed,
        }
        if dump:
            summary["trigger"] = "dump"
        log = self.logger
        log.info("leakguard.summary", **summary)
        emitted_leaks = set()
        for level, event, fields in kept:
            getattr(log, level)(event, pid=snap.pid, **fields)
            if event == "leakguard.leak":
                emitted_leaks.add(fields["site"])

        if not dump:
            for g in ranked:
                seen = self._groups.get(g.site)
                if seen is None:
                    seen = self._groups[g.site] = _Seen(now)
                seen.count = len(g.infos)
                if g.site in emitted_leaks:
                    seen.last_emit = now
                    seen.last_count = len(g.infos)
            for site in [s for s in self._groups if s not in groups]:
                del self._groups[site]
            self._sites = sites
            self.reports += 1
        return 1 + len(kept)

    def emit(self, snap: Snapshot) -> None:
        """Periodic report of *snap* (no fork or churn information)."""
        self.report(snap)
