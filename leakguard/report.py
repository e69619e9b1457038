"""Render snapshots and leaked sockets for people: one block per leak, goleak-style."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import stacks

if TYPE_CHECKING:
    from .snapshot import Snapshot, SocketInfo

__all__ = ["describe", "format_leak", "format_snapshot", "format_stack", "summary_line"]

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


def get_logger(log_format: str = "auto") -> Any:
    """The host's structlog logger when it configured structlog, else readable stderr lines.

    ``log_format="json"`` forces JSON lines; ``"console"`` forces readable lines.
    """
    import structlog

    if log_format == "auto" and structlog.is_configured():
        return structlog.get_logger("leakguard")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
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


class _StderrLogger:
    """Writes to whatever ``sys.stderr`` is at the moment (pytest swaps it)."""

    def msg(self, message: str) -> None:
        import sys

        try:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass

    log = debug = info = warning = warn = error = critical = exception = fatal = failure = err = msg


class Reporter:
    """Turns snapshots into structlog events: a summary, then one event per leak site."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.logger = get_logger(config.log_format)

    def emit(self, snap: Snapshot) -> None:
        tracked = sum(1 for s in snap.sockets if s.record is not None)
        self.logger.info(
            "leakguard.summary",
            pid=snap.pid,
            sockets=len(snap.sockets),
            tracked=tracked,
            unknown=len(snap.sockets) - tracked,
            counts=snap.counts,
            leaks=len(snap.leaks),
            fds_open=snap.fds_open,
            fds_limit=snap.fds_limit,
        )
        groups: dict[str, list[SocketInfo]] = {}
        for info in snap.leaks:
            groups.setdefault(info.site_str if info.stack else "<unknown>", []).append(info)
        ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
        for site, infos in ordered[: self.config.top_sites]:
            oldest = max((i.age_s or 0.0) for i in infos)
            sample = infos[0]
            self.logger.warning(
                "leakguard.leak",
                site=site,
                state=sample.state,
                count=len(infos),
                oldest_age_s=round(oldest, 1),
                origin=sample.origin,
                target=sample.target,
                peers=sorted({i.remote or "?" for i in infos})[:5],
                reason=sample.reason,
                stack=[str(f) for f in sample.stack[-8:]],
            )
