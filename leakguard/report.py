"""Render snapshots for people and programs.

Text (``str(snapshot)``, pytest failures, the dump signal) and periodic structlog
events show leaks grouped by creation site and verdict: 15 sockets leaked by one
line are one group, with their count, states, origin, peers, oldest age, what
holds them, where the code using them is, one fix hint, and one stack with the
application's frames shown and library frames folded (``[+8 frames in urllib3]``).

Rendering shares work: each ``(code, offset)`` is resolved once per process and
each stack once per record (:func:`stacks.resolve`), each path made relative once
per working directory, and a snapshot renders each distinct stack once and each
socket once, however many lists it appears in (:func:`snapshot_dict`).
"""

from __future__ import annotations

import collections
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import judge, stacks
from .judge import format_age as _age

if TYPE_CHECKING:
    from . import diagnose, registry
    from .fdlimit import Projection
    from .snapshot import Snapshot, SocketInfo

__all__ = [
    "LeakGroup",
    "Reporter",
    "describe",
    "event_sink",
    "fd_outlook_line",
    "fix_hint",
    "format_group",
    "format_leak",
    "format_snapshot",
    "format_stack",
    "get_logger",
    "group",
    "pool_line",
    "snapshot_dict",
    "socket_dict",
    "summary_line",
]

STACK_LIMIT = 8  # application frames shown per stack (library frames fold)

_STATE_WORDS = {
    ("CLOSE_WAIT", False): "CLOSE_WAIT (the peer closed it, your code never did)",
    ("CLOSE_WAIT", True): "CLOSE_WAIT (the peer closed them, your code never did)",
    ("CLOSE", False): "CLOSE (the peer reset it, your code never closed it)",
    ("CLOSE", True): "CLOSE (the peer reset them, your code never closed them)",
}
# in_use: the code that would close it is still running: "never did" would send the reader looking for a missing close()
_STATE_WORDS_IN_USE = {
    "CLOSE_WAIT": "CLOSE_WAIT (the peer closed {it}; the code holding {it} is still running)",
    "CLOSE": "CLOSE (the peer reset {it}; the code holding {it} is still running)",
}


def _state_words(state: str | None, leaked: bool, verdict: str | None = None, many: bool = False) -> str:
    """*state* as netstat names it, with what it means when the socket is judged leaked (a socket
    never connected is in CLOSE too: no words for that one)."""
    if not leaked:
        return state or "no state"
    if verdict == "in_use" and state in _STATE_WORDS_IN_USE:
        return _STATE_WORDS_IN_USE[state].format(it="them" if many else "it")
    return _STATE_WORDS.get((state or "", many), state or "no state")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --- stacks -----------------------------------------------------------------------------------------


def format_stack(
    stack: Sequence[stacks.Frame],
    limit: int = STACK_LIMIT,
    indent: str = "    ",
    marks: dict[stacks.Frame, str] | None = None,
) -> str:
    """Traceback style (outermost first): the application's frames, consecutive library frames
    folded into one line (``[+8 frames in requests, urllib3]``), the creation line always shown.

    *limit*: application frames shown (the innermost ones); ``0``: every frame, nothing folded.
    *marks*: a note put after a frame's line (``<- the test``).
    """
    items: list[Any] = list(stack) if not limit else stacks.fold(stack, limit)
    rel = stacks.relpath
    lines = []
    for it in items:
        if isinstance(it, stacks.Frame):
            line = f'{indent}File "{rel(it.file)}", line {it.line}, in {it.function}'
            if marks and it in marks:
                line += f"  {marks[it]}"
            lines.append(line)
        else:
            lines.append(indent + stacks.format_folded(it))
    return "\n".join(lines)


def _stack_lines(stack: Sequence[stacks.Frame], limit: int = STACK_LIMIT) -> list[str]:
    """The folded stack as short strings (``path.py:LINE in function``, ``[+3 frames in socket]``), for events."""
    rel = stacks.relpath
    return [
        f"{rel(it.file)}:{it.line} in {it.function}" if isinstance(it, stacks.Frame) else stacks.format_folded(it)
        for it in stacks.fold(stack, limit)
    ]


# --- fix hints --------------------------------------------------------------------------------------

_FORGOTTEN = {
    "requests": "release the response: `with requests.get(...) as r:` or `r.close()` (a streamed or unread "
    "response keeps its connection); `with requests.Session() as s:` for a session",
    "urllib3": "release the response: `r.release_conn()` or `with http.request(..., preload_content=False) as r:`; "
    "`pool.clear()` when done with the pool",
    "http_client": "close it: `conn.close()` (or `with contextlib.closing(HTTPConnection(...)) as conn:`); "
    "`with urllib.request.urlopen(...) as r:`",
    "httpx": "`with httpx.Client() as client:` (or `client.close()`); a streamed response: `with client.stream(...) as r:`",
    "aiohttp": "`async with aiohttp.ClientSession() as session:` and `async with session.get(...) as r:`",
    "psycopg2": "close it: `conn.close()`, or `with contextlib.closing(psycopg2.connect(...)) as conn:` "
    "(psycopg2's `with conn:` ends a transaction, it does not close)",
    "psycopg": "`with psycopg.connect(...) as conn:` (or `conn.close()`)",
    "asyncpg": "`await conn.close()` in a `finally:`, or use a pool: `async with pool.acquire() as conn:`",
    "pymysql": "`with pymysql.connect(...) as conn:` (or `conn.close()` in a `finally:`)",
    "redis": "`with redis.Redis(...) as r:` (or `r.close()`); one client per process, not one per call",
    "sqlalchemy": "`with engine.connect() as conn:` / `with Session(engine) as session:`; `engine.dispose()` when done",
    "socket": "close it: `with socket.create_connection(...) as s:`, or `s.close()` in a `finally:`",
}
_IDLE = {
    "sqlalchemy": "`create_engine(..., pool_pre_ping=True)`, or `pool_recycle=` below the server's idle timeout",
    "redis": "`redis.Redis(..., health_check_interval=30)` (below the server's `timeout`)",
    "psycopg": "`ConnectionPool(..., check=ConnectionPool.check_connection, max_idle=...)` below the server's idle timeout",
    "psycopg2": "check connections at `getconn()` (a `SELECT 1`), or close and reopen them below the server's idle timeout",
    "asyncpg": "`create_pool(..., max_inactive_connection_lifetime=...)` below the server's idle timeout",
    "requests": "harmless until reused (urllib3 drops it at its next checkout); `session.close()` when done with the session",
    "urllib3": "harmless until reused (urllib3 drops it at its next checkout); `pool.clear()` when done with the pool",
}


def fix_hint(verdict: str | None, origin: str = "unknown", pool: bool = False, idle: bool = False) -> str:
    """One concrete fix for leaks of this *verdict* and *origin* (pooled or not; *idle* in its pool)."""
    if verdict == "in_use":
        return (
            "the code holding it has not finished (see 'in use at'): give the call it waits on a timeout, or "
            "add capacity (workers, pool size) if requests queue behind busy handlers"
        )
    if verdict == "idle_in_pool":
        how = _IDLE.get(origin, "a pre-ping at checkout, or recycle connections below the server's idle timeout")
        return f"the pool keeps a connection the server dropped: {how}"
    if verdict == "unreachable":
        return (
            "nothing refers to it any more, only a reference cycle keeps it until the garbage collector runs: "
            "close it explicitly (`with ...:` or `close()`) instead of relying on the collector"
        )
    if pool and idle:
        return (
            "it is idle in its pool, which stays open: close the pool or its owner when done with it "
            "(`session.close()`, `pool.clear()`, `engine.dispose()`, `pool.close()`)"
        )
    if pool:
        return "return it to its pool (or close it) when done: `with pool.connection() as conn:`-style use does both"
    return _FORGOTTEN.get(origin, "close it where it is opened: a `with` block, or `close()` in a `finally:`")


# --- groups -----------------------------------------------------------------------------------------


def _diagnosis(info: SocketInfo) -> tuple[str | None, str | None, list[str], dict[str, Any] | None]:
    """(verdict, why, held_by, in_use) of a leak (see leakguard.diagnose), copies the caller may keep;
    Nones for other sockets."""
    batch = info[10]
    if batch is None:
        return None, None, [], None
    d = batch.of(info)
    return d.verdict, d.why, list(d.held_by), (dict(d.in_use) if d.in_use is not None else None)


_fd_of = operator.itemgetter(0)  # SocketInfo fields by index: the loops below run once per member
_type_of = operator.itemgetter(2)
_state_of = operator.itemgetter(3)
_remote_of = operator.itemgetter(5)


def _ranked_counts(values: Iterable[str | None]) -> list[tuple[str, int]]:
    """(value, how many), the most frequent first (ties: first seen first), None written "?"."""
    seq = list(values)
    firsts = dict.fromkeys(seq)  # in first-seen order
    if len(firsts) <= 4:  # a group's states, its peers mostly: counted in C
        counted: Iterable[tuple[str | None, int]] = [(k, seq.count(k)) for k in firsts]
    else:
        tally: dict[str | None, int] = {}
        for v in seq:
            tally[v] = tally.get(v, 0) + 1
        counted = tally.items()
    return sorted((("?" if k is None else k, n) for k, n in counted), key=lambda kv: -kv[1])


class LeakGroup:
    """Sockets of one creation site and verdict, rendered once for all of them."""

    __slots__ = ("_diag", "_oldest", "_rows", "infos", "site", "verdict", "why")

    def __init__(self, site: str, verdict: str | None, why: str | None = None) -> None:
        self.site = site
        self.verdict = verdict
        self.why = why
        self.infos: list[SocketInfo] = []
        self._diag: list[diagnose.Diagnosis | None] = []  # each member's diagnosis (shared, never changed here)
        self._oldest: SocketInfo | None = None  # set by group(), which orders the members
        self._rows: list[tuple[Any, ...]] = []  # each member's fields as a plain tuple (indexed in C, unlike SocketInfo)

    @property
    def count(self) -> int:
        return len(self.infos)

    @property
    def oldest(self) -> SocketInfo:
        o = self._oldest
        if o is None:
            o = max(self.infos, key=lambda i: i.age_s if i.age_s is not None else -1.0)
        return o

    def rows(self) -> list[tuple[Any, ...]]:
        """Each member's fields (``SocketInfo``'s, as a plain tuple), in member order."""
        if len(self._rows) != len(self.infos):
            self._rows = [i[:11] for i in self.infos]
        return self._rows

    def states(self) -> dict[str, int]:
        return dict(_ranked_counts(map(_state_of, self.rows())))

    def peers(self) -> list[tuple[str, int]]:
        return _ranked_counts(map(_remote_of, self.rows()))

    def held_by(self, most: int = 3) -> list[str]:
        """Up to *most* distinct reference paths that hold members (the oldest member's first)."""
        out: list[str] = []
        for d in self._diag:
            if d is None:
                continue
            for path in d.held_by:
                if path not in out:
                    out.append(path)
                    if len(out) >= most:
                        return out
        return out

    def in_use(self) -> dict[str, Any] | None:
        u = next((d.in_use for d in self._diag if d is not None and d.in_use is not None), None)
        return dict(u) if u is not None else None

    def in_uses(self, most: int = 3) -> list[dict[str, Any]]:
        """Up to *most* distinct places (thread, task, line) where code holding members is now."""
        out: list[dict[str, Any]] = []
        seen = set()
        for d in self._diag:
            u = d.in_use if d is not None else None
            if u is None:
                continue
            k = (u.get("thread"), u.get("task"), u.get("file"), u.get("line"))
            if k not in seen:
                seen.add(k)
                out.append(dict(u))
                if len(out) >= most:
                    break
        return out

    def hint(self) -> str:
        o = self.oldest
        pool = o.record.pool if o.record is not None else None
        return fix_hint(self.verdict, o.origin, pool is not None, pool is not None and not pool.checked_out)

    def stack(self) -> tuple[stacks.Frame, ...]:
        rec = self.oldest.record
        return rec.resolved() if rec is not None else ()

    def fields(self) -> dict[str, Any]:
        """The group as structlog event fields."""
        oldest = self.oldest
        states = self.states()
        peers = self.peers()
        out: dict[str, Any] = {
            "site": self.site,
            "verdict": self.verdict,
            "state": next(iter(states)),
            "peer": peers[0][0],
            "count": len(self.infos),
            "oldest_age_s": round(oldest.age_s, 1) if oldest.age_s is not None else None,
            "peers": [p for p, _ in peers[:5]],
            "origin": oldest.origin,
            "target": oldest.target,
            "held_by": self.held_by(),
            "in_use": self.in_use(),
            "reason": oldest.reason,
            "hint": self.hint(),
            "sample_stack": _stack_lines(self.stack()),
        }
        if self.why:
            out["why"] = self.why
        if len(states) > 1:
            out["states"] = states
        if oldest.pool is not None:
            out["pool"] = oldest.pool
        return out


def group(infos: Iterable[SocketInfo]) -> list[LeakGroup]:
    """*infos* grouped by creation site and verdict, the largest group first, each group's oldest member first."""
    groups: dict[tuple[str, str | None], LeakGroup] = {}
    sites: dict[int, str] = {}  # id(resolved stack) -> site: each distinct stack formatted once
    with stacks.rendering():
        for info in infos:
            row = info[:11]
            rec, batch = row[9], row[10]
            st = (rec._resolved or rec.resolved()) if rec is not None else None
            if st:
                site = sites.get(id(st))
                if site is None:
                    site = sites[id(st)] = stacks.format_site(stacks.creation_site(st))
            else:
                site = f"<unknown: origin={row[7]}>"
            d = batch.of(info) if batch is not None else None
            verdict = d.verdict if d is not None else None
            g = groups.get((site, verdict))
            if g is None:
                g = groups[(site, verdict)] = LeakGroup(site, verdict, d.why if d is not None else None)
            g.infos.append(info)
            g._rows.append(row)
            g._diag.append(d)
    ranked = sorted(groups.values(), key=lambda g: (-len(g.infos), g.site, g.verdict or ""))
    for g in ranked:  # the oldest member first: its holders and stack represent the group
        rows = g._rows
        if len(rows) > 1:
            ages = [r[6] or 0.0 for r in rows]
            if ages != sorted(ages, reverse=True):  # descriptors in creation order are the oldest first already
                order = sorted(range(len(rows)), key=ages.__getitem__, reverse=True)  # stable: ties keep their order
                g.infos = [g.infos[k] for k in order]
                g._rows = rows = [rows[k] for k in order]
                g._diag = [g._diag[k] for k in order]
        g._oldest = g.infos[0] if rows[0][6] is not None else g.oldest
    return ranked


def _in_use_text(u: dict[str, Any]) -> str:
    who = f"thread {u.get('thread')!r}" if u.get("thread") else "a thread"
    if u.get("task"):
        who += f", task {u['task']!r}"
    where = f"{stacks.relpath(str(u.get('file')))}:{u.get('line')} in {u.get('function')}()" if u.get("file") else "?"
    text = f"{who} at {where}"
    if u.get("waiting_on"):
        text += f", waiting on {u['waiting_on']}"
    return text


def _fds(rows: Sequence[tuple[Any, ...]], most: int = 8) -> str:
    fds = sorted(fd for fd in map(_fd_of, rows) if fd is not None)
    shown = ", ".join(str(f) for f in fds[:most])
    return shown + (f", ... ({len(fds)})" if len(fds) > most else "")


def format_group(
    g: LeakGroup,
    stack_limit: int = STACK_LIMIT,
    marks: dict[stacks.Frame, str] | None = None,
    trim_outer: bool = False,
) -> str:
    """One block for a group: what, where created, why, what holds it, the fix, then one stack.

    *marks*: notes after frames (the pytest plugin marks the test's line); *trim_outer*: leave out
    the library frames outside the application's outermost one (a test runner's).
    """
    o = g.oldest
    many = g.count > 1
    states = g.states()
    state = next(iter(states))
    kind = o.type if len(set(map(_type_of, g.rows()))) == 1 else "socket"
    head = f"Leaked {_plural(g.count, f'{kind} socket') if many else f'{kind} socket'} created at {g.site}"
    if len(states) == 1:
        head += f", in {_state_words(state, o.leaked, g.verdict, many)}"
    else:
        head += ", in " + ", ".join(f"{s} ({n})" for s, n in states.items())
    lines = [head]
    facts = [f"origin {o.origin}"]
    if o.target:
        facts.append(f"target {o.target}")
    peers = g.peers()
    if peers and peers[0][0] != "?":
        shown = [f"{p} ({n})" if many else p for p, n in peers[:3]]
        facts.append(("peers " if len(peers) > 1 else "peer ") + ", ".join(shown) + (", ..." if len(peers) > 3 else ""))
    if not many and o.local:
        facts.append(f"local {o.local}")
    if o.age_s is not None:
        facts.append(f"{'oldest ' if many else 'age '}{_age(o.age_s)}")
    if g.infos[0].fd is not None:
        facts.append(f"fd{'s' if many else ''} {_fds(g.rows())}")
    lines.append("  " + ", ".join(facts))
    reason = o.reason  # its words are made once, not per line that shows them
    if g.verdict:
        lines.append(f"  verdict: {g.verdict}" + (f" ({g.why})" if g.why else ""))
    elif reason:
        lines.append(f"  why: {reason}")
    if g.verdict and reason:
        lines.append(f"  why: {reason}")
    elif not reason and o.record is not None and o.record.pool is not None:
        lines.append(f"  pool: {pool_line(o.record.pool)}")
    held = g.held_by()
    if held:
        lines.append("  held by: " + "; ".join(held))
    used = g.in_uses()
    if used:
        lines.append("  in use at: " + "; ".join(_in_use_text(u) for u in used))
    lines.append("  fix: " + g.hint())
    stack: Sequence[stacks.Frame] = g.stack()
    if trim_outer:
        stack = stacks.from_application(stack)
    if stack:
        lines.append("  created by:")
        lines.append(format_stack(stack, stack_limit, marks=marks))
    elif o.record is None:
        lines.append("  created by: unknown (opened before leakguard was installed, or by C code no integration covers)")
    return "\n".join(lines)


def pool_line(pool: registry.PoolInfo) -> str:
    """Where a pooled socket is: checked out (since when, where) or idle, and whose pool it is."""
    now = time.monotonic()
    if pool.checked_out:
        site = stacks.creation_site(stacks.resolve(pool.checkout_frames))
        text = f"checked out of {pool.name}"
        if pool.checkout_time is not None:
            text += f" for {now - pool.checkout_time:.1f} s"
        if site is not None:
            text += f" at {stacks.format_site(site)}"
    else:
        text = f"idle in {pool.name}"
        if pool.idle_since is not None:
            text += f" for {now - pool.idle_since:.1f} s"
    return text + (f", owned by {pool.owner}" if pool.owner else "")


def describe(info: SocketInfo) -> str:
    """One self-describing line: state, origin, peer, age, creation site."""
    state = _state_words(info.state, info.leaked)
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


def format_leak(info: SocketInfo, stack_limit: int = STACK_LIMIT) -> str:
    """One socket as a block (a group of one)."""
    return format_group(group([info])[0], stack_limit)


def summary_line(snap: Snapshot, groups: int | None = None) -> str:
    counts = ", ".join(f"{k}={v}" for k, v in sorted(snap.counts.items())) or "no TCP sockets"
    tracked = judge.tally(snap).tracked
    limit = snap.fds_limit if snap.fds_limit >= 0 else "unlimited"
    leaked = f"{len(snap.leaks)} leaked"
    if groups is not None and snap.leaks:
        leaked += f" ({_plural(groups, 'group')} by creation site and verdict)"
    return (
        f"leakguard: pid {snap.pid}: {len(snap.sockets)} sockets ({tracked} tracked), TCP {counts}; "
        f"{leaked}; fds {snap.fds_open}/{limit}"
    )


def _per(rate: float, unit: str) -> str:
    """A growth rate as a person reads it: '+1 socket/s', '+12 sockets/min', '+2.5 descriptors/h'."""
    for size, per in ((1, "s"), (60, "min"), (3600, "h")):
        v = rate * size
        if v >= 0.95 or per == "h":
            break
    text = f"{v:,.0f}" if v >= 9.5 else f"{v:.1f}".rstrip("0").rstrip(".")
    return f"+{text} {unit}{'' if text == '1' else 's'}/{per}"


def fd_outlook_line(p: Projection) -> str:
    """When the descriptors run out (see :mod:`leakguard.fdlimit`):
    ``fd limit reached in ~5 h at +1 socket/s from shop.py:66 (2,000/20,000 open)``."""
    head = f"fd limit reached in {_age(p.seconds, approx=True)}" if p.seconds > 0 else "fd limit reached"
    top = p.sources[:2]
    where = "from" if p.by == "site" else "in"
    if top and sum(r for _, r in top) >= 0.5 * p.fds_per_s:
        rates = " and ".join(f"{_per(r, 'socket')} {where} {name}" for name, r in top)
        text = f"{head} at {rates}"
    else:  # descriptors other than these sockets grow too (files, pipes, sockets of many sites)
        text = f"{head} at {_per(p.fds_per_s, 'descriptor')}"
        if top:
            text += f" ({_per(top[0][1], 'socket')} {where} {top[0][0]})"
    return text + f" ({p.fds_open:,}/{p.limit:,} open)"


def format_snapshot(snap: Snapshot, stack_limit: int = STACK_LIMIT, outlook: Projection | None = None) -> str:
    """The readable report: one summary line, then one block per group of leaks (largest first).

    *outlook*: when the descriptors run out (``Snapshot.format`` gives the running watcher's
    projection, :func:`leakguard.fdlimit.outlook`; none without a watcher).
    """
    with stacks.rendering():
        groups = group(snap.leaks)
        out = [summary_line(snap, len(groups))]
        if outlook is not None:
            out.append(outlook.message)
        for g in groups:
            out.append("")
            out.append(format_group(g, stack_limit))
    return "\n".join(out)


# --- to_dict ----------------------------------------------------------------------------------------


def snapshot_dict(snap: Snapshot) -> dict[str, Any]:
    """``Snapshot.to_dict()``: the CONTRACT's shape, each socket rendered once.

    A leak's entry in ``"leaks"`` is the same dict object as its entry in ``"sockets"``,
    sockets created by equal stacks share one ``"stack"`` list, and sockets that are not
    leaks one empty ``"held_by"`` list: the result is JSON-ready as it is; copy it
    (``copy.deepcopy``) before changing it in place.  Nothing in it is shared with another
    call's result, nor with the snapshot.
    """
    memo: dict[Any, Any] = {}  # what sockets alike share (see _socket_dicts)
    reasons: dict[Any, str] = {}  # one text per group of sockets it reads the same for (judge.leak_reason)
    done: dict[int, dict[str, Any]] = {}  # id(SocketInfo) -> its dict, for the leaks: listed twice, rendered once
    with stacks.rendering():
        sockets = _socket_dicts(snap.sockets, memo, reasons, done)
        leaks = [done.get(id(s)) or _socket_dicts((s,), memo, reasons, done)[0] for s in snap.leaks]
    return {
        "pid": snap.pid,
        "taken_at": snap.taken_at,
        "counts": dict(snap.counts),
        "fds": {"open": snap.fds_open, "limit": snap.fds_limit},
        "sockets": sockets,
        "leaks": leaks,
    }


def socket_dict(info: SocketInfo) -> dict[str, Any]:
    """``SocketInfo.to_dict()``: one socket in the CONTRACT's shape."""
    with stacks.rendering():
        return _socket_dicts((info,), {}, None, {})[0]


def _socket_dicts(
    infos: Iterable[SocketInfo],
    memo: dict[Any, Any],
    reasons: dict[Any, str] | None,
    done: dict[int, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Each of *infos* in the CONTRACT's ``Socket`` shape; each leak's dict also kept in *done* by id.

    A snapshot renders thousands of sockets, most of them alike: *memo* keeps, per creation stack,
    family, type, origin and target, the dict those sockets share (its stack rendered once, see
    :func:`_alike`), and each socket's dict is a copy of it with the socket's own fields set
    (``dict.copy`` copies the table in one step; building 17 keys costs twice that).  A leak's
    fields come from :func:`_leak_fields`, *reasons* making each leak reason once.  The loop is
    compiled (``_speedups.render``) where it is built.
    """
    if _render is not None:
        return _render(infos, memo, _alike, _leak_fields, reasons, done)  # type: ignore[no-any-return]
    out: list[dict[str, Any]] = []
    add = out.append
    for info in infos:
        # a tuple subclass: a slice is an exact tuple, which unpacks without an iterator
        fd, family, kind, state, local, remote, age, origin, target, rec, batch = info[:11]
        if rec is None:
            st = pool = None
        else:
            st = rec._resolved
            if st is None:
                st = rec.resolved()
            pool = rec.pool
        seen = memo.get(id(st))
        if seen is not None and seen[0] == family and seen[1] == kind and seen[2] == origin and seen[3] == target:
            like = seen[4]
        else:
            like = _alike(memo, st, family, kind, origin, target)
        d = like.copy()
        d["fd"] = fd
        d["state"] = state
        d["local"] = local
        d["remote"] = remote
        if age is not None:
            d["age_s"] = (age * 1000.0 + 0.5) // 1.0 / 1000.0  # round(age, 3), 4x cheaper
        if pool is not None:
            d["pool"] = pool.to_dict()
        if batch is not None:
            _leak_fields(d, info, reasons)
            done[id(info)] = d
        add(d)
    return out


_LEAK_STATES, _leak_reason = judge.LEAK_STATES, judge.leak_reason


def _leak_fields(d: dict[str, Any], info: SocketInfo, reasons: dict[Any, str] | None) -> None:
    """A leak's own fields in its dict *d*: its diagnosis, and a reason where the kernel shows one."""
    if info[3] in _LEAK_STATES:
        d["reason"] = _leak_reason(info, reasons)
    diag = info[10].of(info)
    d["verdict"] = diag.verdict
    d["verdict_reason"] = diag.why
    d["held_by"] = [*diag.held_by]
    d["in_use"] = dict(diag.in_use) if diag.in_use is not None else None


def _alike(
    memo: dict[Any, Any], st: tuple[stacks.Frame, ...] | None, family: str, kind: str, origin: str, target: str | None
) -> dict[str, Any]:
    """The dict that sockets of stack *st*, *family*, *kind*, *origin* and *target* share, kept in *memo*:
    under ``id(st)`` (the snapshot, its records, keeps each stack tuple alive) as ``(family, kind, origin,
    target, dict)`` for the first such sockets (one lookup), under the whole key for others of that stack."""
    key = (id(st), family, kind, origin, target)
    like: dict[str, Any] | None = memo.get(key)
    if like is None:
        like = memo[key] = _shared_part(st, family, kind, origin, target)
        if id(st) not in memo:
            memo[id(st)] = (family, kind, origin, target, like)
    return like


def _compiled_render() -> Any:
    from . import registry  # its loader honours LEAKGUARD_PURE_PYTHON

    return getattr(registry._speedups, "render", None)


_render = _compiled_render()


def _shared_part(
    st: tuple[stacks.Frame, ...] | None, family: str, kind: str, origin: str, target: str | None
) -> dict[str, Any]:
    """The fields that sockets of one stack, family, type, origin and target have alike, in the CONTRACT's key order."""
    if st:
        stack = [{"file": f.file, "line": f.line, "function": f.function} for f in st]
        site = stacks.format_site(stacks.creation_site(st))
    else:
        stack, site = [], None
    return {
        "fd": None,
        "family": family,
        "type": kind,
        "state": None,
        "local": None,
        "remote": None,
        "age_s": None,
        "origin": origin,
        "target": target,
        "pool": None,
        "stack": stack,
        "reason": None,
        "site": site,
        "verdict": None,
        "verdict_reason": None,
        "held_by": [],  # every socket's copy shares it (as its stack): a leak has its own
        "in_use": None,
    }


# --- periodic reports as structlog events (Reporter) ----------------------------------------------

#: A group still leaking is reported again when its count changes, or after this many seconds.
REPEAT_S = 60.0
#: Share of RLIMIT_NOFILE in use above which a warning event is emitted.
FD_WARN_RATIO = 0.8
#: A projected fd limit closer than this many seconds is a warning event too (once per REPEAT_S).
FD_OUTLOOK_WARN_S = 3600.0


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


def event_sink(log_format: str = "auto") -> Callable[[dict[str, Any]], None]:
    """A writer of events computed elsewhere (the pools' checkout reports), as structlog events.

    Each event is a dict with its name under ``"event"``; ``leakguard.checkout_returned``
    goes out at info level, the others as warnings.  The logger is looked up at each
    event (see :func:`get_logger`): the host may configure structlog later.
    """

    def sink(event: dict[str, Any]) -> None:
        fields = {k: v for k, v in event.items() if k != "event"}
        level = "info" if event["event"] == "leakguard.checkout_returned" else "warning"
        getattr(get_logger(log_format), level)(event["event"], **fields)

    return sink


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
        self._groups: dict[tuple[str, str | None], _Seen] = {}  # (site, verdict) of each group still leaking
        self._tokens = float(config.max_events_per_minute)
        self._refilled = time.monotonic()
        self._outlook_warned = -REPEAT_S  # time.monotonic() of the last fd_limit warning from the projection

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
        routine: bool = False,
        outlook: Projection | None = None,
        before_output: Callable[[], None] | None = None,
    ) -> int:
        """Emit the events for *snap*; returns how many events were emitted (summary included).

        With *dump* (on-demand, e.g. a signal) the rate limit does not apply and the
        state between periodic reports is left untouched.  With *routine* (the
        watcher saw nothing change, see ``watcher.Watcher.routine``) the summary
        is left out unless another event goes out with it.  *outlook*: when the
        descriptors run out at the rate the watcher measured (:mod:`leakguard.fdlimit`):
        in the summary, in the leak events of the sites it names, and a
        ``leakguard.fd_limit`` warning once it is less than :data:`FD_OUTLOOK_WARN_S` away.
        *before_output* is called once the events are computed, before any is written or
        any state kept between reports changes (the watcher ends a tick there when a fork
        waits for its thread).
        """
        now = time.monotonic()
        cfg = self.config
        ranked = group(judge.own_leaks(snap.leaks, inherited))  # inherited across fork(): the parent reports them
        groups = {(g.site, g.verdict) for g in ranked}

        events: list[tuple[str, str, dict[str, Any]]] = []  # (level, event, fields)
        near = snap.fds_limit > 0 and snap.fds_open >= FD_WARN_RATIO * snap.fds_limit
        soon = (
            outlook is not None
            and outlook.seconds < FD_OUTLOOK_WARN_S
            and (dump or now - self._outlook_warned >= REPEAT_S)
        )
        if near or soon:
            fields: dict[str, Any] = {
                "fds_open": snap.fds_open,
                "fds_limit": snap.fds_limit,
                "used_pct": round(100.0 * snap.fds_open / snap.fds_limit, 1),
                "message": "open file descriptors are close to RLIMIT_NOFILE; "
                "new sockets and files will fail with 'Too many open files'",
            }
            if outlook is not None:
                fields["message"] = (
                    f"{outlook.message}; then new sockets and files fail with 'Too many open files'"
                )
                fields["reached_in_s"] = round(outlook.seconds, 1)
                fields["fd_projection"] = outlook.to_dict()
            events.append(("warning", "leakguard.fd_limit", fields))
        outlook_sites = {name for name, _ in outlook.sources} if outlook is not None and outlook.by == "site" else ()
        for w in churn or ():
            events.append(("warning", "leakguard.churn", {**w.to_dict(), "message": w.message}))

        new: list[tuple[str, str, dict[str, Any]]] = []
        grown: list[tuple[str, str, dict[str, Any]]] = []
        repeat: list[tuple[str, str, dict[str, Any]]] = []
        for g in ranked[: cfg.top_sites]:
            seen = self._groups.get((g.site, g.verdict))
            if seen is None or seen.last_emit is None:  # a new group suppressed last time is still new
                fields = g.fields()
                fields["status"] = "new"
                if g.site in outlook_sites:
                    fields["fd_outlook"] = outlook.message  # type: ignore[union-attr]
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
            if g.site in outlook_sites:
                fields["fd_outlook"] = outlook.message  # type: ignore[union-attr]
            fields["leaking_for_s"] = round(now - seen.first, 1)
            into.append(("warning", "leakguard.leak", fields))
        resolved: list[tuple[str, str, dict[str, Any]]] = []
        if not dump:
            for key, seen in self._groups.items():
                if key not in groups:
                    resolved.append(
                        (
                            "info",
                            "leakguard.leak_resolved",
                            {
                                "site": key[0],
                                "verdict": key[1],
                                "count_was": seen.count,
                                "leaked_for_s": round(now - seen.first, 1),
                            },
                        )
                    )
        events += new + grown + resolved[: cfg.top_sites] + repeat
        suppressed = max(0, len(ranked) - cfg.top_sites) + max(0, len(resolved) - cfg.top_sites)
        if before_output is not None:
            before_output()
        if (near or soon) and outlook is not None and not dump:  # after before_output: state kept between reports
            self._outlook_warned = now

        budget = cfg.max_events_per_report
        if not dump:
            self._refill(now)
            budget = min(budget, int(self._tokens))
        kept, dropped = events[:budget], events[budget:]
        suppressed += len(dropped)
        if not dump:
            self._tokens -= len(kept)

        tally = judge.tally(snap, inherited)
        summary: dict[str, Any] = {
            "pid": snap.pid,
            "sockets": len(snap.sockets),
            "tracked": tally.tracked,
            "unknown": tally.unknown,
            "inherited": tally.inherited,
            "counts": dict(sorted(snap.counts.items())),
            "leaks": len(snap.leaks) - tally.inherited_leaks,
            "inherited_leaks": tally.inherited_leaks,
            "leak_sites": len(groups),
            "fds_open": snap.fds_open,
            "fds_limit": snap.fds_limit,
            "suppressed": suppressed,
        }
        if outlook is not None:
            summary["fd_outlook"] = outlook.message
            summary["fd_limit_in_s"] = round(outlook.seconds, 1)
        if dump:
            summary["trigger"] = "dump"
        log = self.logger
        if not (routine and not kept):
            log.info("leakguard.summary", **summary)
        emitted_leaks = set()
        for level, event, fields in kept:
            getattr(log, level)(event, pid=snap.pid, **fields)
            if event == "leakguard.leak":
                emitted_leaks.add((fields["site"], fields["verdict"]))

        if not dump:
            for g in ranked:
                key = (g.site, g.verdict)
                seen = self._groups.get(key)
                if seen is None:
                    seen = self._groups[key] = _Seen(now)
                seen.count = len(g.infos)
                if key in emitted_leaks:
                    seen.last_emit = now
                    seen.last_count = len(g.infos)
            for key in [k for k in self._groups if k not in groups]:
                del self._groups[key]
        return (0 if routine and not kept else 1) + len(kept)
