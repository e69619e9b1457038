"""pytest plugin: the test that leaves a socket open fails, naming the line that opened it.

Off by default.  Turn it on with ``--leakguard``, the ini option ``leakguard = true``
or ``LEAKGUARD_PYTEST=1``.  Every setting is a command-line flag, an ini option and
an environment variable (flag wins over environment, environment over ini):

=====================  ======================  ===========================  =========================
flag                   ini                     environment                  meaning
=====================  ======================  ===========================  =========================
``--leakguard``        ``leakguard``           ``LEAKGUARD_PYTEST``         on/off (default off)
``--leakguard-mode``   ``leakguard_mode``      ``LEAKGUARD_PYTEST_MODE``    ``fail`` (default) / ``warn``
``--leakguard-gc``     ``leakguard_gc``        ``LEAKGUARD_PYTEST_GC``      sockets freed by the garbage
                                                                            collector: ``warn`` (default),
                                                                            ``fail``, ``off``
``--leakguard-grace``  ``leakguard_grace``     ``LEAKGUARD_PYTEST_GRACE``   seconds a closing socket gets
                                                                            (default 0.5)
``--leakguard-ignore`` ``leakguard_ignore``    ``LEAKGUARD_PYTEST_IGNORE``  globs of creation sites
                                                                            (``path.py:LINE``), peers
                                                                            (``host:port``) or targets
=====================  ======================  ===========================  =========================

Ignore globs from all three sources add up, each value split on commas and whitespace;
the summary names any glob that matched no socket.

How a socket is attributed:

- A socket opened during a test's setup, call or teardown and still open once that
  test's fixtures are torn down is the test's leak: the test fails (its teardown report
  carries the failure; the test counts once, as failed) with one paragraph per socket:
  state, origin, peer, age, creation site ``path/to/test_file.py:LINE``, then the stack
  from the application's outermost frame inwards.  Tests that already failed are not
  checked (what they left open is a consequence of the failure).
- Sockets opened while a class-, module-, package- or session-scoped fixture is set up
  belong to that fixture, and so do sockets opened later that are reachable from the
  fixture's value (a pooled connection of a session-wide ``requests.Session``) and
  connections accepted on a listening socket the fixture owns (an in-process server).
  They are judged when the fixture is torn down; a leak is an error at that teardown.
- Before anything is called leaked it gets a grace period: one ``gc.collect()`` and a
  bounded exponential back-off (goleak's retry), so code that is closing never fails.
  Tests that opened no socket pay one integer comparison; the kernel is read only for
  sockets finally judged leaked.
- Under pytest-xdist each worker checks its own tests; the controller prints the summary.
- A socket idle in a pool a module global keeps (``urllib3._DEFAULT_POOL``, a
  module-level ``requests.Session``) is nobody's leak: the summary names the pool once.
- A socket that was never closed but freed by the garbage collector (what
  ``ResourceWarning`` reports) is listed with its creation stack: a warning in the
  terminal summary by default, a failure with ``--leakguard-gc=fail``.

Escape hatches: ``@pytest.mark.no_leakguard`` skips a test's check;
``@pytest.mark.leakguard(allow=N)`` tolerates up to N sockets and
``@pytest.mark.leakguard(allow=["127.0.0.1:6379", "tests/conftest.py:*"])`` ignores the
matching ones (same globs as ``leakguard_ignore``).
"""

from __future__ import annotations

import _socket
import fnmatch
import gc
import os
import socket
import threading
import time
import types
from collections.abc import Generator, Iterable, Iterator
from typing import Any, NamedTuple

import pytest

from . import _state, kernel, registry, report, stacks
from .integrations import _pools
from .snapshot import SocketInfo, _type_name
from .snapshot import take as _take_snapshot

__all__ = ["Settings", "parse_globs", "settings_key"]

MODES = ("fail", "warn")
GC_MODES = ("warn", "fail", "off")
DEFAULT_GRACE = 0.5
_REACH_BUDGET = 200_000  # objects visited when looking for an owning fixture
_SKIP_MODULES = ("_pytest", "pluggy", "pytest", "leakguard", "xdist", "execnet")
_MAX_SUMMARY_BLOCKS = 30


class Settings(NamedTuple):
    """The plugin's settings, merged once from flags, environment and ini (immutable)."""

    enabled: bool = False
    mode: str = "fail"
    gc: str = "warn"
    grace: float = DEFAULT_GRACE
    ignore: tuple[str, ...] = ()

    def describe(self) -> str:
        out = f"leakguard: on (mode={self.mode}, gc={self.gc}, grace={self.grace:g}s"
        if self.ignore:
            out += f", ignoring {', '.join(self.ignore)}"
        return out + ")"


settings_key = pytest.StashKey[Settings]()
_result_key = pytest.StashKey["_Verdict"]()
_failed_key = pytest.StashKey[bool]()


# --------------------------------------------------------------------------- settings


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("leakguard", "socket leak checks (leakguard)")
    group.addoption(
        "--leakguard",
        action="store_true",
        default=None,
        dest="leakguard",
        help="fail tests that leave sockets open (also: ini leakguard=true, LEAKGUARD_PYTEST=1)",
    )
    group.addoption(
        "--leakguard-mode",
        default=None,
        dest="leakguard_mode",
        metavar="fail|warn",
        help="fail (default): a leaking test fails; warn: leaks are listed in the terminal summary",
    )
    group.addoption(
        "--leakguard-gc",
        default=None,
        dest="leakguard_gc",
        metavar="warn|fail|off",
        help="sockets never closed but freed by the garbage collector: warn (default), fail or off",
    )
    group.addoption(
        "--leakguard-grace",
        default=None,
        dest="leakguard_grace",
        metavar="SECONDS",
        help=f"how long a socket that is still closing gets before it counts as leaked (default {DEFAULT_GRACE})",
    )
    group.addoption(
        "--leakguard-ignore",
        action="append",
        default=None,
        dest="leakguard_ignore",
        metavar="GLOB",
        help="ignore sockets whose creation site (path.py:LINE), peer (host:port) or target matches "
        "(comma- or space-separated globs; repeatable)",
    )
    parser.addini("leakguard", "enable leakguard's socket leak checks", type="bool", default=False)
    parser.addini("leakguard_mode", "leakguard: fail or warn", default="")
    parser.addini("leakguard_gc", "leakguard: sockets freed by the garbage collector: warn, fail or off", default="")
    parser.addini("leakguard_grace", "leakguard: seconds a closing socket gets", default="")
    parser.addini(
        "leakguard_ignore",
        "leakguard: globs of creation sites (path.py:LINE), peers (host:port) or targets to ignore",
        type="linelist",
        default=[],
    )


def _pick(config: pytest.Config, option: str, env: str, ini: str) -> tuple[Any, str]:
    """(value, where it came from): flag, then environment, then ini."""
    value = config.getoption(option, None)
    if value is not None:
        return value, f"--{option.replace('_', '-')}"
    if env in os.environ:
        return os.environ[env], f"environment variable {env}"
    return config.getini(ini), f"ini option {ini}"


def _parse_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise pytest.UsageError(f"leakguard: {where} must be true or false, not {value!r}")


def _parse_choice(value: Any, where: str, choices: tuple[str, ...], default: str) -> str:
    v = str(value).strip().lower()
    if not v:
        return default
    if v not in choices:
        raise pytest.UsageError(f"leakguard: {where} must be one of {', '.join(choices)}, not {value!r}")
    return v


def _parse_grace(value: Any, where: str) -> float:
    if value is None or str(value).strip() == "":
        return DEFAULT_GRACE
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = -1.0
    if not 0 <= out <= 60:
        raise pytest.UsageError(f"leakguard: {where} must be a number of seconds from 0 to 60, not {value!r}")
    return out


def load_settings(config: pytest.Config) -> Settings:
    """Merge flags, environment and ini into :class:`Settings` (UsageError on bad values)."""
    value, where = _pick(config, "leakguard", "LEAKGUARD_PYTEST", "leakguard")
    enabled = _parse_bool(value, where)
    mode = _parse_choice(*_pick(config, "leakguard_mode", "LEAKGUARD_PYTEST_MODE", "leakguard_mode"), MODES, "fail")
    gc_mode = _parse_choice(*_pick(config, "leakguard_gc", "LEAKGUARD_PYTEST_GC", "leakguard_gc"), GC_MODES, "warn")
    grace = _parse_grace(*_pick(config, "leakguard_grace", "LEAKGUARD_PYTEST_GRACE", "leakguard_grace"))
    ignore = parse_globs(config.getini("leakguard_ignore") or [])
    ignore += parse_globs([os.environ.get("LEAKGUARD_PYTEST_IGNORE", "")])
    ignore += parse_globs(config.getoption("leakguard_ignore", None) or [])
    return Settings(enabled, mode, gc_mode, grace, tuple(dict.fromkeys(ignore)))


def parse_globs(values: Iterable[str]) -> list[str]:
    """Ignore globs from any source (flag, ini line, environment): each value is split
    on commas and whitespace, so ``'a.py:*,127.0.0.1:*'`` is two globs everywhere."""
    return [g for v in values for g in str(v).replace(",", " ").split()]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "leakguard(allow=N|[globs]): tolerate up to N leaked sockets, or ignore sockets whose creation "
        "site, peer or target matches a glob",
    )
    config.addinivalue_line("markers", "no_leakguard: do not check this test for leaked sockets")
    settings = load_settings(config)
    config.stash[settings_key] = settings
    if not settings.enabled:
        return
    config.pluginmanager.register(_Summary(config, settings), _SUMMARY)
    worker = hasattr(config, "workerinput")
    controller = not worker and getattr(config.option, "dist", "no") != "no"
    if controller:  # the xdist controller runs no tests; its workers check them
        _register_findings(config)  # and send their reports here, any of them may carry findings
    else:
        config.pluginmanager.register(_Checker(config, settings), "leakguard-checker")


def pytest_report_header(config: pytest.Config) -> str | None:
    settings = config.stash.get(settings_key, None)
    if settings is None or not settings.enabled:
        return None
    return settings.describe()


# --------------------------------------------------------------------------- GC watch


class _GcEvent:
    """A socket that was never closed and was freed by the garbage collector."""

    __slots__ = ("at", "entry", "fd", "kind", "peer")

    def __init__(self, fd: int, entry: Any, kind: str, peer: str | None, at: float) -> None:
        self.fd = fd
        self.entry = entry  # the registry's raw entry: (ref, created, seq, frames, scope)
        self.kind = kind
        self.peer = peer
        self.at = at

    @property
    def seq(self) -> int:
        return int(self.entry[2])

    @property
    def rec(self) -> registry.Record:
        # A fresh view: the table's own may already describe a newer socket on this fd.
        return registry.Record(self.fd, self.entry)


_gc_events: list[_GcEvent] = []
_orig_socket_del: Any = getattr(_socket.socket, "__del__")  # the C finalizer (warns, closes)


def _socket_del(self: Any) -> None:
    # Only sockets freed while still open reach the inside of this if: close()
    # and detach() leave fd -1.  Then the C finalizer runs as always (it emits
    # ResourceWarning and closes the descriptor).
    try:
        fd = _socket.socket.fileno(self)
        if fd >= 0:
            entry = registry.entry(fd)
            if entry is not None and entry[0] is not None:
                obj = entry[0]()
                if (obj is None or obj is self) and len(_gc_events) < 10_000:
                    try:
                        peer = kernel.format_address(self.family, self.getpeername())
                    except OSError:
                        peer = None
                    kind = _type_name(int(self.family), int(self.type))
                    _gc_events.append(_GcEvent(fd, entry, kind, peer, time.monotonic()))
    except Exception:  # contained: freeing the socket must go on exactly as without us
        pass
    _orig_socket_del(self)


_socket_del.__qualname__ = "socket.__del__"


_watchers = [0]  # sessions watching (an in-process pytester run nests one in another)


def _watch_gc() -> None:
    _watchers[0] += 1
    if vars(socket.socket).get("__del__") is None:
        socket.socket.__del__ = _socket_del  # type: ignore[attr-defined]


def _unwatch_gc() -> None:
    _watchers[0] = max(_watchers[0] - 1, 0)
    if _watchers[0] == 0:
        if vars(socket.socket).get("__del__") is _socket_del:
            del socket.socket.__del__  # type: ignore[attr-defined]
        _gc_events.clear()


# --------------------------------------------------------------------------- ownership


class _Fixture:
    """A fixture wider than function scope and the sockets it owns."""

    __slots__ = ("fixturedef", "name", "owned", "scope", "where")

    def __init__(self, fixturedef: Any, name: str, scope: str, where: str) -> None:
        self.fixturedef = fixturedef
        self.name = name
        self.scope = scope
        self.where = where  # the test whose setup created it
        self.owned: list[registry.Record] = []

    def label(self) -> str:
        return f"fixture '{self.name}' ({self.scope} scope)"

    def roots(self) -> list[Any]:
        """What the fixture's sockets may be reached from: its value and its pending teardown."""
        out: list[Any] = []
        cached = getattr(self.fixturedef, "cached_result", None)
        if cached is not None and cached[0] is not None:
            out.append(cached[0])
        out.extend(getattr(self.fixturedef, "_finalizers", ()) or ())
        return out


def _skip_object(obj: Any) -> bool:
    if isinstance(obj, (type, types.ModuleType, types.CodeType, str, bytes, int, float, types.BuiltinFunctionType)):
        return True
    mod = getattr(type(obj), "__module__", "") or ""
    return mod.startswith(_SKIP_MODULES)


def _reachable(roots: Iterable[Any], targets: dict[int, Any]) -> set[int]:
    """ids of *targets* reachable from *roots* through strong references (bounded walk).

    Modules, classes and function globals are not followed (everything is reachable
    from them), nor pytest's own objects.
    """
    found: set[int] = set()
    seen: set[int] = set()
    todo = list(roots)
    budget = _REACH_BUDGET
    while todo and budget > 0:
        obj = todo.pop()
        i = id(obj)
        if i in seen:
            continue
        seen.add(i)
        budget -= 1
        if i in targets:
            found.add(i)
            if len(found) == len(targets):
                break
            continue
        if isinstance(obj, types.FunctionType):
            if not (getattr(obj, "__module__", "") or "").startswith(_SKIP_MODULES):
                todo.extend(x for x in (obj.__closure__, obj.__defaults__, obj.__kwdefaults__) if x)
            continue
        if isinstance(obj, types.FrameType):
            todo.append(obj.f_locals)
            continue
        if _skip_object(obj):
            continue
        todo.extend(gc.get_referents(obj))
    return found


def _addr_key(family: int, addr: Any) -> Any:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return (str(addr[0]), int(addr[1]))
    if addr:
        return addr
    return None


_WILDCARDS = ("0.0.0.0", "::", "")


def _accepted(rec: registry.Record) -> bool:
    """Was this socket returned by ``socket.accept()`` (a server-side connection)?"""
    frames = rec.frames
    return bool(frames) and frames[0].co_name == "accept" and frames[0].co_filename == socket.__file__


def _sock_of(rec: registry.Record) -> socket.socket | None:
    obj = rec.ref() if rec.ref is not None else None
    return obj if isinstance(obj, socket.socket) else None


def _local_key(sock: socket.socket) -> Any:
    try:
        return _addr_key(sock.family, sock.getsockname())
    except OSError:
        return None


def _find_listener(local: Any, records: Iterable[registry.Record]) -> tuple[bool, registry.Record | None]:
    """(a listening socket with this address exists, its record if leakguard has one)."""
    if local is None:
        return False, None
    wild = (("0.0.0.0", local[1]), ("::", local[1])) if isinstance(local, tuple) else ()
    for rec in records:
        sock = _sock_of(rec)
        if sock is None:
            continue
        try:
            if sock.fileno() != rec.fd or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
        except OSError:
            continue
        key = _local_key(sock)
        if key == local or key in wild:
            return True, rec
    # A listener opened before leakguard was installed (conftest import time): ask the kernel.
    try:
        for ks in kernel.read_sockets({})[0]:
            if ks.state == "LISTEN" and ks.local is not None and isinstance(local, tuple):
                host, _, port = ks.local.rpartition(":")
                if port == str(local[1]) and host.strip("[]") in (local[0], *_WILDCARDS):
                    return True, None
    except Exception:
        pass
    return False, None


# --------------------------------------------------------------------------- judging


def _peer(rec: registry.Record) -> str | None:
    sock = _sock_of(rec)
    if sock is None:
        return None
    try:
        return kernel.format_address(sock.family, sock.getpeername())
    except OSError:
        return None


def _matches(rec: registry.Record, globs: Iterable[str], peer: str | None = None) -> bool:
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
    hit = [g for g in globs if any(fnmatch.fnmatchcase(n, g) for n in names)]
    _matched_globs.update(hit)  # every glob that matched, for the summary's "matched nothing"
    return bool(hit)


_matched_globs: set[str] = set()  # ignore globs that matched a socket in this process


def _process_wide(rec: registry.Record) -> str | None:
    """The module global keeping the pool *rec* (or, for a server-side socket, its
    client end in this process) sits idle in, or None."""
    pool = rec.pool
    if pool is None and _accepted(rec):
        client = _client_end(rec)
        pool = client.pool if client is not None else None
    if pool is None or pool.checked_out:
        return None
    where: str | None = _pools.process_wide(pool)
    return where


def _client_end(rec: registry.Record) -> registry.Record | None:
    """The record of the socket at the other end of accepted connection *rec*, if in this process."""
    sock = _sock_of(rec)
    if sock is None:
        return None
    try:
        peer = _addr_key(sock.family, sock.getpeername())
    except OSError:
        return None
    for other in registry.live().values():
        s = _sock_of(other)
        if other is not rec and other.pool is not None and s is not None and _local_key(s) == peer:
            return other
    return None


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
    if alive and all(t.ident in quiet for t in threading.enumerate()):
        return alive
    deadline = time.monotonic() + grace
    delay = 0.001
    while alive:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.1)
        alive = [r for r in alive if r.alive()]
    if alive:
        gc.collect()  # finalizers run by the first collection may have freed more
        alive = [r for r in alive if r.alive()]
    return alive


def _infos(recs: list[registry.Record]) -> list[SocketInfo]:
    """Kernel state joined with each record (read only for sockets judged leaked)."""
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
    return out


def _short(g: report.LeakGroup) -> str:
    """``test_x.py:12 (CLOSE_WAIT, peer 127.0.0.1:5000)``; a group: ``(15 sockets: CLOSE_WAIT, ...)``."""
    o = g.oldest
    bits = [", ".join(g.states()) if o.state else o.type]
    peers = g.peers()
    if peers and peers[0][0] != "?":
        bits.append(f"peer {peers[0][0]}" + (f" and {len(peers) - 1} more" if len(peers) > 1 else ""))
    count = f"{g.count} sockets: " if g.count > 1 else ""
    return f"{g.site if o.stack else '<unknown site>'} ({count}{', '.join(bits)})"


def _plural(n: int, word: str) -> str:
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


def _leak_text(head: str, infos: list[SocketInfo], item: Any = None) -> str:
    """The failure: one line naming each creation site, state and peer, then one block per group of
    sockets (creation site and verdict: what holds them, the fix, the stack with the test's line marked)."""
    with stacks.rendering():
        groups = report.group(infos)
        first = f"{head} {_plural(len(infos), 'socket')} open, created at " + ", ".join(_short(g) for g in groups)
        marks = _test_marks(infos, item) if item is not None else None
        blocks = [report.format_group(g, marks=marks, trim_outer=True) for g in groups]
    return "\n\n".join([first] + blocks)


def _gc_text(events: list[_GcEvent], whose: str) -> str:
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
    head = f"leakguard: {_plural(len(events), 'socket')} {whose} never closed; the garbage collector freed {'it' if len(events) == 1 else 'them'}: {sites}"
    return "\n\n".join([head] + blocks)


class _Verdict:
    """What the teardown check found, for the teardown report."""

    def __init__(self) -> None:
        self.fail_text: list[str] = []
        self.warn_text: list[str] = []
        self.test_leaks = 0
        self.fixture_leaks = 0
        self.gc_closed = 0
        self.kind: str | None = None  # "test" when the test itself fails, "fixture" for a fixture error
        self.unchecked: str | None = None
        self.kept: list[str] = []  # process-wide pools holding this test's idle sockets, first sight

    def summary(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "kind": self.kind,
            "test_leaks": self.test_leaks,
            "fixture_leaks": self.fixture_leaks,
            "gc_closed": self.gc_closed,
            "warnings": self.warn_text,
            "unchecked": self.unchecked,
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


class _Checker:
    """The per-process part: attributes sockets to tests and fixtures and judges them."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.we_installed = False
        self.mark = 0  # seq taken at the start of the current test's setup
        self.taken = 0  # seq numbers this plugin consumed since then (not sockets)
        self.fixtures: dict[Any, _Fixture] = {}  # active wider-scoped fixtures by FixtureDef
        self.claimed: dict[int, _Fixture] = {}  # record seq -> owning fixture
        self.pending: list[_Fixture] = []  # torn down, to be judged at the end of this teardown
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
            _watch_gc()
        self.mark = self._take()
        self.quiet = frozenset(t.ident for t in threading.enumerate() if t.ident is not None)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.settings.gc != "off":
            _unwatch_gc()
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
        fx = _Fixture(fixturedef, fixturedef.argname, fixturedef.scope, getattr(node, "nodeid", "?"))
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
                self._adopt_reachable(cands, [fx])
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

    def _adopt_reachable(self, cands: list[registry.Record], fixtures: Iterable[_Fixture]) -> list[registry.Record]:
        """Hand sockets reachable from a fixture's value to that fixture; return the rest."""
        left = list(cands)
        for fx in fixtures:
            if not left:
                break
            targets: dict[int, Any] = {}
            for rec in left:
                if rec.pool is not None and rec.pool.checked_out:
                    continue  # checked out of a pool and never returned: the test holds it
                obj = rec.ref() if rec.ref is not None else None
                if obj is not None:
                    targets[id(obj)] = obj
            if not targets:
                break
            found = _reachable(fx.roots(), targets)
            if not found:
                continue
            keep = []
            for rec in left:
                obj = rec.ref() if rec.ref is not None else None
                if obj is not None and id(obj) in found:
                    fx.owned.append(rec)
                    self.claimed[rec.seq] = fx
                else:
                    keep.append(rec)
            left = keep
        return left

    def _drop_process_wide(self, recs: list[Any], verdict: _Verdict) -> list[Any]:
        """Sockets idle in a pool a module global keeps for the whole process
        (``urllib3._DEFAULT_POOL``), and the server ends of their connections, are
        nobody's leak: named once per run, not judged.  *recs*: records, or
        (fixture, record) pairs."""
        left = []
        for item in recs:
            where = _process_wide(item[1] if isinstance(item, tuple) else item)
            if where is None:
                left.append(item)
            elif where not in self.kept:
                self.kept.add(where)
                verdict.kept.append(where)
        return left

    def _adopt_accepted(self, cands: list[registry.Record]) -> list[registry.Record]:
        """Server-side connections belong to whoever owns the listening socket."""
        left = []
        records: list[registry.Record] | None = None
        for rec in cands:
            sock = _sock_of(rec)
            if sock is None or not _accepted(rec):
                left.append(rec)
                continue
            if records is None:
                records = list(registry.live().values())
            exists, listener = _find_listener(_local_key(sock), records)
            if not exists:
                left.append(rec)  # its server is gone: nobody but the test can close it now
                continue
            if listener is not None and listener.seq > self.mark and listener.seq not in self.claimed:
                left.append(rec)  # the test's own server
                continue
            owner = self.claimed.get(listener.seq) if listener is not None else None
            if owner is not None:
                owner.owned.append(rec)
                self.claimed[rec.seq] = owner
            # else: a server older than this test that no fixture owns: not the test's
        return left

    # -- judging

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        # trylast: after the fixtures' teardown, before pytest collects unraisable
        # exceptions (a ResourceWarning from our gc.collect() belongs to this test).
        # The common case first, in a few operations: no sequence number was taken since
        # the test began but the plugin's own (no socket was created, none can be open
        # from this test), no fixture finished and no socket was freed by the GC.
        created = self._created()
        if not (created or self.pending or _gc_events):
            self.item = None
            return
        try:
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
            if pm.get_plugin(_REPORTER) is None:  # registered now: the teardown report is made next
                pm.register(_Reporter(self), _REPORTER)

    def _judge(self, item: pytest.Item, created: bool) -> _Verdict | None:
        """*created*: sequence numbers were taken during the test (sockets may be open)."""
        settings = self.settings
        pending, self.pending = self.pending, []
        cands = self._candidates(created)
        if not (cands or pending or _gc_events):
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
            cands = self._drop_process_wide(cands, verdict)
        if cands:
            cands = self._adopt_accepted(cands)
        if cands and self.fixtures:
            cands = self._adopt_reachable(cands, list(self.fixtures.values()))
        fixture_recs = [(fx, r) for fx in pending for r in fx.owned if r.alive()]
        for fx in pending:
            for r in fx.owned:
                self.claimed.pop(r.seq, None)
        fixture_recs = [
            (fx, r) for fx, r in fixture_recs if not _matches(r, settings.ignore) and not _loop_internal(r)
        ]
        if fixture_recs:
            fixture_recs = self._drop_process_wide(fixture_recs, verdict)
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
            infos = _infos(cands)
            text = _leak_text("leakguard: this test left", infos, item)
            verdict.test_leaks = len(infos)
            (verdict.fail_text if fail else verdict.warn_text).append(text)
            if fail:
                verdict.kind = "test"
        by_fixture: dict[int, tuple[_Fixture, list[registry.Record]]] = {}
        for fx, r in fixture_recs:
            by_fixture.setdefault(id(fx), (fx, []))[1].append(r)
        for fx, recs in by_fixture.values():
            infos = _infos(recs)
            text = _leak_text(f"leakguard: {fx.label()}, set up for {fx.where}, left", infos, item)
            verdict.fixture_leaks += len(infos)
            (verdict.fail_text if fail else verdict.warn_text).append(text)
            if fail and verdict.kind is None:
                verdict.kind = "fixture"
        self._judge_gc(verdict, skip, pending)
        verdict.unchecked = skip
        if not (verdict.fail_text or verdict.warn_text or verdict.kept):
            return None
        return verdict

    def _judge_gc(self, verdict: _Verdict, skip: str | None, pending: list[_Fixture]) -> None:
        if not _gc_events:
            return
        events = _gc_events[:]
        del _gc_events[: len(events)]
        finished = {r.seq: fx for fx in pending for r in fx.owned}
        mine: list[_GcEvent] = []
        others: list[_GcEvent] = []
        by_fixture: dict[int, tuple[_Fixture, list[_GcEvent]]] = {}
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
            text = _gc_text(mine, "opened by this test")
            if fail:
                verdict.fail_text.append(text)
                verdict.kind = "test"
            else:
                verdict.warn_text.append(text)
        for fx, evs in by_fixture.values():
            verdict.gc_closed += len(evs)
            text = _gc_text(evs, f"opened by {fx.label()}, set up for {fx.where},")
            if fail and fx in pending:
                verdict.fail_text.append(text)
                verdict.kind = verdict.kind or "fixture"
            else:
                verdict.warn_text.append(text)
        if others:
            verdict.gc_closed += len(others)
            verdict.warn_text.append(_gc_text(others, "opened before this test (at import or by an earlier test)"))

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
        _register_findings(self.config)  # before this report is logged

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Iterator[None]:
        workeroutput = getattr(self.config, "workeroutput", None)
        if isinstance(workeroutput, dict):  # an xdist worker: sent to the controller, which prints the summary
            workeroutput["leakguard_matched"] = sorted(_matched_globs)
        result = yield
        # Fixtures finalized outside any test's teardown (an interrupted run).
        pending = [fx for fx in self.pending if any(r.alive() for r in fx.owned)]
        self.pending = []
        for fx in pending:
            recs = _settle([r for r in fx.owned if r.alive()], self.settings.grace, self.quiet)
            if recs:
                self.session_notes.append(_leak_text(f"leakguard: {fx.label()}, set up for {fx.where}, left", _infos(recs)))
        if _gc_events:
            events = _gc_events[:]
            _gc_events.clear()
            self.session_notes.append(_gc_text(events, "opened during the session"))
        return result


class _Findings:
    """What leakguard's own teardown reports add to the run: their status and their counts.

    The xdist controller registers it with the summary (the workers' reports arrive
    there).  A process that runs tests registers it with its first verdict, before that
    report is logged: until then there is nothing for it to do, and pytest would call
    both hooks for every report, three per test (a suite that leaks nothing should not
    pay for that).
    """

    def __init__(self, summary: _Summary) -> None:
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


class _Reporter:
    """Puts each verdict on its test's teardown report.  Registered with the first verdict:
    pytest makes three reports per test and a suite without leaks should not pay for a
    hook wrapper around each of them."""

    def __init__(self, checker: _Checker) -> None:
        self.checker = checker

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        rep = yield
        if call.when == "teardown" and self.checker.verdicts:
            self.checker.attach(item, rep)
        return rep


_FINDINGS = "leakguard-findings"
_SUMMARY = "leakguard-summary"
_REPORTER = "leakguard-reporter"


def _register_findings(config: pytest.Config) -> None:
    """Make sure :class:`_Findings` sees the reports from now on (idempotent)."""
    pm = config.pluginmanager
    if pm.get_plugin(_FINDINGS) is None:
        summary = pm.get_plugin(_SUMMARY)
        if isinstance(summary, _Summary):
            pm.register(_Findings(summary), _FINDINGS)


def _teardown_reports(terminalreporter: Any) -> int:
    """How many teardown reports were logged: the terminal keeps every report in ``stats``."""
    stats = getattr(terminalreporter, "stats", None) or {}
    return sum(1 for reports in stats.values() for rep in reports if getattr(rep, "when", None) == "teardown")


class _Summary:
    """Counts and texts from the teardown reports (also those an xdist worker sends).

    Tests count as checked by their teardown reports, read from the terminal's
    ``stats`` once at the end; :class:`_Findings` adds what leakguard found.
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
        seen = self.matched | _matched_globs
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
        """A leaking test counts once, as failed: not also as passed for its call phase."""
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
                f"leakguard: {_plural(len(unmatched), 'ignore pattern')} matched no socket: {', '.join(unmatched)}",
                yellow=True,
            )
        parts = [f"{_plural(_teardown_reports(tr), 'test')} checked"]
        parts.append(f"{_plural(self.test_leaks, 'leaked socket')} in {_plural(self.leaky_tests, 'test')}")
        if self.fixture_leaks:
            parts.append(f"{_plural(self.fixture_leaks, 'leaked socket')} in fixtures")
        parts.append(f"{_plural(self.gc_closed, 'socket')} closed by the garbage collector")
        line = f"leakguard ({self.settings.mode} mode): " + ", ".join(parts)
        bad = self.test_leaks or self.fixture_leaks
        tr.write_line(line, red=bool(bad) and self.settings.mode == "fail", yellow=bool(bad or self.gc_closed))
