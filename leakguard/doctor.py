"""``leakguard doctor``: what is active and why, and the limits and kernel settings that decide leaks.

Everything is read, nothing is changed: the version, whether the compiled
speedups are in use (and why not), each integration applied / skipped /
failed with the reason (found by installing leakguard into this process with
every available library imported, then uninstalling), the process's
``RLIMIT_NOFILE`` and the TCP settings from ``/proc/sys`` judged with advice.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

__all__ = ["check", "format_report", "speedups_status", "version_line"]

#: (level, setting, value, advice); level is "ok", "note" or "warning"
Finding = dict[str, Any]


def speedups_status() -> tuple[bool, str]:
    """(compiled hot path active, why or why not)."""
    from . import registry

    if registry._speedups is not None:
        return True, f"compiled speedups active ({getattr(registry._speedups, '__file__', '?')})"
    if os.environ.get("LEAKGUARD_PURE_PYTHON", "") not in ("", "0"):
        return False, "pure Python: LEAKGUARD_PURE_PYTHON is set"
    try:
        mod = importlib.import_module("leakguard._speedups")
    except ImportError as exc:
        tag = sys.implementation.cache_tag
        return False, (
            f"pure Python: no compiled module for this interpreter ({tag}): {exc}; "
            "reinstall with a C compiler and Python headers (pip install --force-reinstall --no-binary leakguard leakguard)"
        )
    return False, f"pure Python: the compiled module {getattr(mod, '__file__', '?')} is stale or mismatched (configure failed)"


def version_line() -> str:
    import leakguard

    active, _ = speedups_status()
    return (
        f"leakguard {leakguard.__version__} (Python {sys.version.split()[0]}, "
        f"{'compiled speedups' if active else 'pure Python'})"
    )


def _integrations() -> list[dict[str, str]]:
    """Each integration's status in this interpreter: its library imported, leakguard installed, then undone."""
    import leakguard
    from leakguard.integrations import INTEGRATIONS

    from . import _state

    out: list[dict[str, str]] = []
    missing: dict[str, str] = {}
    for name, triggers in INTEGRATIONS.items():
        for mod in triggers:
            try:
                found = importlib.util.find_spec(mod) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing[name] = f"skipped: {mod} is not installed"
                break
            try:
                importlib.import_module(mod)
            except Exception as exc:  # a broken library: say so, go on
                missing[name] = f"skipped: import {mod} failed: {type(exc).__name__}: {exc}"
                break
    was = leakguard.installed()
    if not was:
        leakguard.install(report_interval=None, dump_signal=None, metrics_port=None)
    try:
        applied = set(_state._state.applied)
        reasons = dict(_state._state.not_applied)
    finally:
        if not was:
            leakguard.uninstall()
    for name in INTEGRATIONS:
        if name in applied:
            out.append({"name": name, "status": "applied", "reason": ""})
        else:
            why = missing.get(name) or reasons.get(name) or "skipped: its library is not imported"
            out.append({"name": name, "status": why.split(":")[0], "reason": why.partition(": ")[2]})
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _limits() -> list[Finding]:
    out: list[Finding] = []
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return [{"level": "note", "setting": "RLIMIT_NOFILE", "value": None, "advice": "not available here"}]
    inf = resource.RLIM_INFINITY
    shown = f"soft {'unlimited' if soft == inf else soft}, hard {'unlimited' if hard == inf else hard}"
    if soft != inf and soft <= 1024:
        out.append(
            {
                "level": "warning",
                "setting": "RLIMIT_NOFILE",
                "value": shown,
                "advice": (
                    f"{soft} descriptors is little for a server: every connection, leaked or not, is one, and at the "
                    "limit accept()/connect()/open() fail with 'Too many open files'; raise it (ulimit -n, systemd "
                    "LimitNOFILE=, docker --ulimit nofile=) to 65536 or more"
                    + (f"; the hard limit {hard} allows raising the soft one without root" if hard == inf or hard > soft else "")
                ),
            }
        )
    else:
        out.append({"level": "ok", "setting": "RLIMIT_NOFILE", "value": shown, "advice": ""})
    return out


def _kernel() -> list[Finding]:
    out: list[Finding] = []
    sysnet = "/proc/sys/net/ipv4/"
    rng = _read(sysnet + "ip_local_port_range")
    if rng is not None:
        lo, hi = (int(x) for x in rng.split()[:2])
        n = hi - lo + 1
        out.append(
            {
                "level": "warning" if n < 16384 else "ok",
                "setting": "net.ipv4.ip_local_port_range",
                "value": f"{lo} {hi}",
                "advice": (
                    f"{n:,} local ports per (source address, peer address:port): a client closing connections first "
                    f"keeps each port 60 s in TIME_WAIT, so it can open at most ~{n // 60:,} new connections per "
                    "second to one peer; reuse connections (pool, keep-alive)"
                    + ("; widen the range (e.g. 1024 65535)" if n < 16384 else "")
                ),
            }
        )
    reuse = _int(_read(sysnet + "tcp_tw_reuse"))
    if reuse is not None:
        words = {0: "off", 1: "on for outbound connections", 2: "on for loopback only (the default since Linux 4.20)"}
        out.append(
            {
                "level": "note" if reuse != 1 else "ok",
                "setting": "net.ipv4.tcp_tw_reuse",
                "value": f"{reuse} ({words.get(reuse, '?')})",
                "advice": (
                    ""
                    if reuse == 1
                    else "a client that churns connections to a remote peer can set 1: new outbound connections may "
                    "then reuse a port in TIME_WAIT (safe with TCP timestamps; it never affects inbound connections)"
                ),
            }
        )
    recycle = _read(sysnet + "tcp_tw_recycle")
    out.append(
        {
            "level": "warning" if recycle not in (None, "0") else "ok",
            "setting": "net.ipv4.tcp_tw_recycle",
            "value": recycle if recycle is not None else "absent",
            "advice": (
                "removed in Linux 4.12: it dropped connections from clients behind NAT (it trusted per-host "
                "timestamps that NAT mixes up); do not look for it, use tcp_tw_reuse"
                + ("; it is ON here: turn it off" if recycle not in (None, "0") else "")
            ),
        }
    )
    fin = _int(_read(sysnet + "tcp_fin_timeout"))
    if fin is not None:
        out.append(
            {
                "level": "ok",
                "setting": "net.ipv4.tcp_fin_timeout",
                "value": str(fin),
                "advice": (
                    f"how long an orphaned socket waits in FIN_WAIT2 ({fin} s); it does not shorten TIME_WAIT (always "
                    "60 s on Linux) and does nothing for CLOSE_WAIT, which only the owning process's close() ends"
                ),
            }
        )
    ka = [_int(_read(sysnet + f"tcp_keepalive_{k}")) for k in ("time", "intvl", "probes")]
    t, i, p = (v if v is not None else -1 for v in ka)
    if min(t, i, p) >= 0:
        dead = t + i * p
        out.append(
            {
                "level": "note" if t > 600 else "ok",
                "setting": "net.ipv4.tcp_keepalive_time/intvl/probes",
                "value": f"{t} {i} {p}",
                "advice": (
                    f"a dead peer on an idle connection with SO_KEEPALIVE is noticed after {dead} s "
                    f"(~{dead / 60:.0f} min), and only if the socket asked for keep-alive; NAT gateways, firewalls and "
                    "load balancers drop idle connections much sooner (often 350 s or less): enable keep-alive with "
                    "TCP_KEEPIDLE below that timeout, or recycle pooled connections before it (pool_recycle, pre-ping)"
                    if t > 600
                    else f"a dead idle peer is noticed after {dead} s when the socket enables SO_KEEPALIVE"
                ),
            }
        )
    somax = _int(_read("/proc/sys/net/core/somaxconn"))
    if somax is not None:
        out.append(
            {
                "level": "warning" if somax < 1024 else "ok",
                "setting": "net.core.somaxconn",
                "value": str(somax),
                "advice": (
                    f"listen() backlogs are capped at {somax}: when the server's threads are busy (connections "
                    "waiting in CLOSE_WAIT for a handler), new connections queue here and then get refused or time out"
                    + ("; raise it to 4096 (the default since Linux 5.4)" if somax < 1024 else "")
                ),
            }
        )
    return out


def check() -> dict[str, Any]:
    """Everything doctor reports, as a JSON-serialisable dict."""
    import leakguard

    active, why = speedups_status()
    return {
        "version": leakguard.__version__,
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "speedups": {"active": active, "reason": why},
        "integrations": _integrations(),
        "settings": _limits() + _kernel(),
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"leakguard {report['version']} on Python {report['python']} ({report['executable']})",
        f"speedups: {report['speedups']['reason']}",
        "integrations:",
    ]
    for it in report["integrations"]:
        lines.append(f"  {it['name']:<14} {it['status']}" + (f": {it['reason']}" if it["reason"] else ""))
    lines.append("limits and kernel settings:")
    marks = {"ok": "ok  ", "note": "note", "warning": "WARN"}
    for f in report["settings"]:
        lines.append(f"  [{marks[f['level']]}] {f['setting']} = {f['value']}")
        if f["advice"]:
            lines.append(f"         {f['advice']}")
    return "\n".join(lines)
