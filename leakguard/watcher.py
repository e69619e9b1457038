"""The periodic check: one daemon thread that snapshots and reports every interval.

Lifecycle (driven by :mod:`leakguard._state`):

* :func:`configure` starts, reconfigures or stops the thread to match the
  configuration: it runs when ``report_interval`` is set (a tick every interval:
  snapshot, churn, structlog report, metrics) or ``dump_signal`` is set (the
  signal handler only wakes the thread, which writes the report: a signal
  handler itself must not take locks the interrupted code may hold).
* :func:`stop` (``uninstall()``) and interpreter exit (``threading``'s
  pre-shutdown hook, before non-daemon threads are joined) stop it promptly: it
  waits on an event, so stopping interrupts the wait, never a report half-written.
* A fork never waits for it: before ``os.fork()`` an idle thread (nearly
  always: it waits for its next tick) ends and is joined, so a single-threaded
  host forks single-threaded (no "multi-threaded" DeprecationWarning on 3.12+,
  no lock of ours held in the child); it starts again on the same schedule in
  the parent.  A thread in the middle of a report is left alone, whatever its
  output is blocked on.  The thread is the interpreter's own (``_thread``), not
  a ``threading.Thread``: ``threading.enumerate()``, ``active_count()`` and
  gevent's monkey-patching (which would make a new ``threading.Thread`` a
  greenlet, and makes the end of an old one raise ``KeyError`` in
  ``threading._delete``) see the host as without leakguard.
* :func:`after_fork` runs in a forked child (gunicorn/uwsgi prefork,
  multiprocessing): the parent's thread does not exist there, so the child
  starts its own with its own reporter state; the registry was cleared, so the
  child only ever attributes sockets it created itself.

Inherited sockets: descriptors that were sockets at fork time are remembered as
(fd, inode).  While the child still holds the same socket on that fd, it is
*inherited*: counted in the child's summary (``inherited``,
``inherited_leaks``) but never reported as one of the child's leaks (the parent,
which created it, reports it with its creation site), and left out of the
child's metrics by site.  ``leakguard.snapshot()`` itself still lists them (its
contract: every CLOSE_WAIT socket is in ``leaks``), with origin ``unknown``.

Nothing here ever raises into the host: a failing tick is logged at debug level
and the next one runs as usual.
"""

from __future__ import annotations

import _thread
import os
import sys
import threading
import time
import weakref
from typing import Any

from . import churn as _churn
from . import fdlimit, kernel, report
from ._log import log
from .snapshot import Snapshot, take as take_snapshot

__all__ = ["Watcher", "after_fork", "configure", "current", "dump", "inherited_fds", "stop"]

_state_ref: Any = None  # the _state._State, for the signal handler and the exit hook
_inherited: dict[int, int] = {}  # fd -> socket inode, for sockets this process inherited at fork
_signum: int | None = None  # the dump signal our handler is installed for
_previous: Any = None  # the handler we replaced (restored by stop())
_exit_hooked = [False]
_parked_by: dict[int, Watcher] = {}  # forking thread -> the watcher its fork parked


def _thread_api() -> tuple[Any, Any, Any, Any]:
    """(start_joinable_thread or None, start_new_thread, allocate_lock, get_ident): the interpreter's own.

    gevent's ``monkey.patch_all()`` (always after install() under ``leakguard
    run``) replaces ``_thread``'s functions with greenlet-based ones: a watcher
    started with those, or with locks made by them, would be a greenlet that runs
    only when the host yields to gevent's hub.  Looked up at each start, so a
    patch made before install() or between two forks is seen.
    """
    joinable = getattr(_thread, "start_joinable_thread", None)  # 3.13+: joined with pthread_join
    api = [joinable, _thread.start_new_thread, _thread.allocate_lock, _thread.get_ident]
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        names = ("start_joinable_thread", "start_new_thread", "allocate_lock", "get_ident")
        for i, name in enumerate(names):
            if api[i] is None:
                continue
            try:
                api[i] = monkey.get_original("_thread", name)
            except Exception:  # an older gevent, or a name it does not know: the module's own is the original
                pass
    return api[0], api[1], api[2], api[3]


class _OSThread:
    """A thread of the interpreter's own that the ``threading`` module does not know.

    ``threading`` would list it (``active_count()``, ``enumerate()``), count it
    at fork time (the "multi-threaded" DeprecationWarning of 3.12+), and, under
    gevent's monkey-patching, fail to forget it at exit (a ``KeyError`` from
    ``threading._delete``).  :meth:`join` returns once the operating-system
    thread is gone, which is what that warning counts.
    """

    __slots__ = ("_done", "_handle", "ident", "native_id")

    def __init__(self, target: Any) -> None:
        joinable, start_new, allocate, get_ident = _thread_api()
        done = allocate()
        done.acquire()
        self._done = done
        self.ident: int | None = None
        self.native_id: int | None = None

        def run() -> None:
            try:
                self.ident = get_ident()
                self.native_id = _thread.get_native_id()
                target()
            finally:
                done.release()

        self._handle = joinable(run, daemon=True) if joinable is not None else None
        if joinable is None:
            start_new(run, ())

    def is_alive(self) -> bool:
        return bool(self._done.locked())

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (at most *timeout* seconds); True once it has."""
        if not self._done.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            return False
        self._done.release()
        if self._handle is not None:
            try:
                self._handle.join()  # pthread_join: the operating system's thread is gone
            except Exception:
                pass
            return True
        # Before 3.13 nothing joins the OS thread; it ends a moment after its Python part.
        task = f"/proc/self/task/{self.native_id}"
        for _ in range(2000):
            if not os.path.exists(task):
                break
            time.sleep(0.0001)  # a real sleep: the ending thread needs the GIL to finish
        return True


class _Wake:
    """An event without ``threading``: set() from any thread or a signal handler, wait() in the watcher.

    A lock held while nobody asked for a wake-up; set() releases it, wait()
    takes it back.  No Python-level lock on set()'s path (a signal handler may
    interrupt any code, including a wait() in progress on another thread).
    """

    __slots__ = ("_lock",)

    def __init__(self, allocate: Any) -> None:
        self._lock = allocate()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # set already
            pass

    def wait(self, timeout: float | None) -> None:
        self._lock.acquire(True, -1 if timeout is None else min(max(0.0, timeout), _TIMEOUT_MAX))


_TIMEOUT_MAX = min(_thread.TIMEOUT_MAX, 365 * 86400.0)


#: Quiet by default: with nothing changed, a routine summary at most this often (seconds).
SUMMARY_EVERY_S = 300.0


class Watcher:
    """Ticks every *interval* seconds (None: only on demand); never raises into the host.

    Emit policy: a tick reports its ``leakguard.summary`` only when something a
    person acts on changed since the last summary (leaks, CLOSE_WAIT sockets,
    inherited leaks, descriptors by tenths of the limit) or :data:`SUMMARY_EVERY_S`
    passed, or when another event (leak, churn, fd limit) goes out with it:
    a steady production process logs one line every few minutes, not one per tick.
    """

    def __init__(self, interval: float | None, reporter: report.Reporter, churn: _churn.ChurnTracker | None) -> None:
        self.interval = interval
        self.reporter = reporter
        self.churn = churn
        self.ticks = 0  # completed ticks (tests and benchmarks wait on this)
        self.pid = os.getpid()
        self._cache = kernel.StateCache()  # steady sockets cost no syscall of their own per tick
        allocate = _thread_api()[2]
        # Guards the fields below, held for a few operations at a time, never across a tick:
        # the at-fork hooks take it, and a fork must never wait for leakguard's work or I/O.
        self._mu = allocate()
        self._tick_lock = allocate()  # one tick or dump at a time (tests call tick() directly)
        self._wake = _Wake(allocate)
        self._stopping = False
        self._dump_requested = False
        self._busy = False  # the thread is ticking or dumping
        self._parked = 0  # forks in progress (see park())
        self._running = False  # a thread runs (or is starting) and has not decided to end
        self._thread: _OSThread | None = None
        self._due: float | None = None  # time.monotonic() of the next tick
        _instances.add(self)
        self._summary_key: tuple[int, ...] | None = None
        self._summary_at = 0.0
        self.fd_history = fdlimit.History()  # descriptors and sockets per site at each tick: the fd projection

    def start(self) -> None:
        if self.interval is not None:
            self._due = time.monotonic() + self.interval
            fdlimit.register(self.fd_history)
        with self._mu:
            self._spawn()

    def _spawn(self) -> None:  # under _mu
        if not self._running and not self._stopping and not self._parked:
            self._running = True
            try:
                self._thread = _OSThread(self._run)
            except Exception:  # no thread to be had (a limit): no reports, the host is untouched
                self._running = False
                log.debug("leakguard: cannot start the watcher thread", exc_info=True)

    def stop(self, timeout: float = 5.0) -> None:
        with self._mu:
            self._stopping = True
            t = self._thread
        if fdlimit._registered and fdlimit._registered[0] is self.fd_history:
            fdlimit.register(None)
        self._wake.set()
        if t is not None and t.ident != _thread_api()[3]():
            t.join(timeout)
        if t is None or not t.is_alive():
            self._cache.close()  # else the thread closes it as it ends

    @property
    def alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def park(self) -> None:
        """Before a fork: end the thread if it is idle, so that the process forks single-threaded.

        Python 3.12+ warns about forking a multi-threaded process, and a child
        forked while a thread holds a lock inherits the lock held forever.  An
        idle thread (waiting for its next tick: nearly always) is ended and
        joined, which is quick and involves no I/O; a thread in the middle of a
        tick is left alone (the fork does not wait for a report, whatever its
        output is blocked on) and ends after it.  :meth:`resume` restarts it.
        """
        with self._mu:
            self._parked += 1
            t = self._thread if self._running and not self._busy else None
        if t is not None:
            self._wake.set()
            t.join(_PARK_JOIN_S)

    def resume(self) -> None:
        """After a fork, in the parent: the thread again, on the same schedule."""
        with self._mu:
            self._parked = max(0, self._parked - 1)
            self._spawn()

    def request_dump(self) -> None:
        """Ask the thread to write a report now (safe from a signal handler)."""
        self._dump_requested = True
        self._wake.set()

    def tick(self) -> None:
        """Snapshot, churn, report, metrics; failures are contained."""
        if self._stopping:
            return
        try:
            with self._tick_lock:
                self._tick()
        except Exception:  # the host must never see our failure
            log.debug("leakguard: watcher tick failed", exc_info=True)
        finally:
            self.ticks += 1

    def _tick(self) -> None:
        churn = self.churn
        pre = churn.before() if churn is not None else None
        snap = take_snapshot(self._cache)
        inherited = inherited_fds(snap)
        warnings = churn.observe(snap, pre) if churn is not None and pre is not None else []
        outlook = self.fd_history.add_snapshot(snap, time.monotonic())
        self.reporter.report(snap, inherited, warnings, routine=self.routine(snap, inherited), outlook=outlook)
        metrics = sys.modules.get("leakguard.metrics")
        if metrics is not None:
            metrics.update(snap, inherited, churn)

    def routine(self, snap: Snapshot, inherited: frozenset[int], now: float | None = None) -> bool:
        """Nothing worth a summary changed since the last one, and it is recent (see the class doc)."""
        now = time.monotonic() if now is None else now
        limit = snap.fds_limit
        key = (
            len(snap.leaks),
            snap.counts.get("CLOSE_WAIT", 0),
            sum(1 for s in snap.leaks if s.fd in inherited) if inherited else 0,
            snap.fds_open * 10 // limit if limit > 0 else 0,
        )
        if key == self._summary_key and now - self._summary_at < SUMMARY_EVERY_S:
            return True
        self._summary_key, self._summary_at = key, now
        return False

    def dump(self) -> None:
        try:
            with self._tick_lock:
                snap = take_snapshot()
                self.reporter.report(snap, inherited_fds(snap), dump=True, outlook=fdlimit.outlook(snap))
        except Exception:
            log.debug("leakguard: dump failed", exc_info=True)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # nothing of ours may surface in the host, not even at shutdown
            pass
        finally:
            if self._stopping:
                self._cache.close()

    def _loop(self) -> None:
        interval = self.interval
        while True:
            with self._mu:
                if self._stopping or self._parked:
                    self._running = False
                    return
                self._busy = True
            try:
                if self._dump_requested:
                    self._dump_requested = False
                    self.dump()
                due = self._due
                if due is not None and interval is not None and time.monotonic() >= due:
                    self.tick()
                    due += interval
                    now = time.monotonic()
                    if due <= now:  # a slow tick or a suspended process: skip, don't burst
                        due = now + interval
                    self._due = due
            finally:
                with self._mu:
                    self._busy = False
            due = self._due
            self._wake.wait(None if due is None else due - time.monotonic())


_instances: weakref.WeakSet[Watcher] = weakref.WeakSet()


def running() -> list[Watcher]:
    """The watchers of this process whose thread is alive (``threading`` does not list them)."""
    return [w for w in list(_instances) if w.pid == os.getpid() and w.alive]


#: How long a fork waits at most for an idle watcher thread to end (it takes microseconds;
#: the bound is for a process so starved that the thread cannot get the GIL).
_PARK_JOIN_S = 1.0


def current() -> Watcher | None:
    """The running watcher of this process, if any."""
    st = _state_ref
    w = st.watcher if st is not None else None
    return w if isinstance(w, Watcher) else None


def configure(state: Any) -> None:
    """Start, restart or stop the watcher, dump signal and metrics to match ``state.config``."""
    global _state_ref
    _state_ref = state
    cfg = state.config
    _configure_signal(cfg.dump_signal)
    _configure_metrics(cfg)
    interval = cfg.report_interval
    need = interval is not None or cfg.dump_signal is not None
    w: Watcher | None = state.watcher
    reporter: report.Reporter | None = None
    churn: _churn.ChurnTracker | None = None
    if w is not None:
        reporter, churn = w.reporter, w.churn
        if not need or w.interval != interval:
            state.watcher = None
            w.stop()
            w = None
    if not need:
        return  # nothing will report: build no reporter (keeps structlog unimported)
    if reporter is None:
        reporter = report.Reporter(cfg)
    else:
        reporter.config = cfg
    if cfg.churn_warning:
        if churn is None or (cfg.churn_limit is not None and churn.limit != cfg.churn_limit):
            churn = _churn.ChurnTracker(cfg.churn_limit)
    else:
        churn = None
    if w is not None:
        w.reporter, w.churn = reporter, churn
    elif need:
        w = state.watcher = Watcher(interval, reporter, churn)
        _hook_exit()
        w.start()


def stop(state: Any) -> None:
    """Stop the thread, restore the dump signal's previous handler, stop the metrics server."""
    w, state.watcher = state.watcher, None
    if w is not None:
        w.stop()
    _configure_signal(None)
    metrics = sys.modules.get("leakguard.metrics")
    if metrics is not None:
        try:
            metrics.stop()
        except Exception:
            log.debug("leakguard: stopping metrics failed", exc_info=True)


def _before_fork() -> None:
    # The fork waits for nothing of ours: an idle thread ends (quickly, no I/O), a busy one is left.
    try:
        w = current()
        if w is not None and w.pid == os.getpid():
            _parked_by[_thread_api()[3]()] = w
            w.park()
    except Exception:
        pass


def _after_fork_in_parent() -> None:
    try:
        w = _parked_by.pop(_thread_api()[3](), None)
        if w is not None:
            w.resume()
    except Exception:
        pass


def _after_fork_in_child() -> None:
    _parked_by.clear()  # the parent's watchers; this process starts its own (after_fork)


if hasattr(os, "register_at_fork"):
    # Hooks cannot be removed: inert unless a watcher runs.
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
    )


def after_fork(state: Any) -> None:
    """In a forked child: remember inherited sockets; start the child's own watcher."""
    global _inherited
    _after_fork_in_child()
    _inherited = _scan_sockets()
    old, state.watcher = state.watcher, None  # the parent's thread does not exist in the child
    if isinstance(old, Watcher):
        old._cache.close()  # the parent's epoll set, shared with it: this copy is dropped, never used
    metrics = sys.modules.get("leakguard.metrics")
    if metrics is not None:
        metrics.after_fork()
    try:
        configure(state)
    except Exception:
        log.debug("leakguard: restarting the watcher after fork failed", exc_info=True)


def dump() -> bool:
    """Write the current report now through the watcher thread; False when none runs."""
    w = current()
    if w is None:
        return False
    w.request_dump()
    return True


# -- inherited sockets ----------------------------------------------------------------------------


def _scan_sockets() -> dict[int, int]:
    out: dict[int, int] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out  # no /proc: inherited sockets are treated as the child's own (documented)
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            try:
                out[int(name)] = int(link[8:-1])
            except ValueError:
                pass
    return out


def inherited_fds(snap: Snapshot) -> frozenset[int]:
    """Descriptors in *snap* that still hold the socket this process inherited at fork."""
    if not _inherited:
        return frozenset()
    out = set()
    for s in snap.sockets:
        fd = s.fd
        if fd is None:
            continue
        ino = _inherited.get(fd)
        if ino is None:
            continue
        if s.record is not None:  # the fd was closed and reused by a socket this process made
            _inherited.pop(fd, None)
            continue
        try:
            same = os.fstat(fd).st_ino == ino
        except OSError:
            same = False
        if same:
            out.add(fd)
        else:
            _inherited.pop(fd, None)
    return frozenset(out)


# -- dump signal ----------------------------------------------------------------------------------


def _on_signal(signum: int, frame: Any) -> None:
    try:
        w = current()
        if w is not None:
            w.request_dump()
    except Exception:
        pass
    prev = _previous
    if callable(prev):  # chain: the host's handler runs as if we were not here
        prev(signum, frame)


def _configure_signal(signum: int | None) -> None:
    global _signum, _previous
    if signum == _signum:
        return
    import signal  # only when a dump signal is (or was) configured

    if _signum is not None:
        try:
            if signal.getsignal(_signum) is _on_signal:
                signal.signal(_signum, _previous if _previous is not None else signal.SIG_DFL)
        except (ValueError, OSError, TypeError):  # not the main thread: our handler stays, inert
            log.debug("leakguard: could not restore the handler of signal %s", _signum, exc_info=True)
        _signum, _previous = None, None
    if signum is not None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("leakguard: dump_signal needs install() from the main thread; no handler installed")
            return
        try:
            prev = signal.getsignal(signum)
            signal.signal(signum, _on_signal)
        except (ValueError, OSError) as exc:
            log.warning("leakguard: cannot handle signal %s: %s", signum, exc)
            return
        _signum, _previous = signum, prev


# -- metrics ---------------------------------------------------------------------------------------


def _configure_metrics(cfg: Any) -> None:
    if cfg.metrics_port is None and "leakguard.metrics" not in sys.modules:
        return
    try:
        from . import metrics

        metrics.configure(cfg)
    except Exception as exc:
        log.warning("leakguard: metrics unavailable: %s", exc)


# -- interpreter exit ------------------------------------------------------------------------------


def _at_exit() -> None:
    st = _state_ref
    w = st.watcher if st is not None else None
    if isinstance(w, Watcher):
        w.stop(timeout=2.0)
    metrics = sys.modules.get("leakguard.metrics")
    if metrics is not None:
        try:
            metrics.stop()
        except Exception:
            pass


def _hook_exit() -> None:
    # threading's hook runs before non-daemon threads are joined and long before
    # daemon threads are frozen mid-write (which can abort the interpreter on a
    # held stderr lock); plain atexit is the fallback.
    if _exit_hooked[0]:
        return
    _exit_hooked[0] = True
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError
        register(_at_exit)
    except RuntimeError:
        import atexit

        atexit.register(_at_exit)
