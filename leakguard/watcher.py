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
* A fork never waits for leakguard's work or I/O: before ``os.fork()``
  (:func:`before_fork`, from the at-fork handler in :mod:`leakguard._state`) the
  thread is asked to end and the fork waits only while it gets on with ending
  (:meth:`Watcher.park`): an idle thread (nearly always: it waits for its next
  tick) ends at once, one computing a tick at its next step (the tick runs again
  after the fork), one writing once the write is done, so a single-threaded host
  forks single-threaded (no "multi-threaded" DeprecationWarning on 3.12+, no lock
  of ours held in the child); a thread in a long uninterruptible step (a big heap
  walk) or blocked writing (a full pipe) is left running, and its tick completes.
  It starts again on the same schedule in the parent.  The thread is one of
  :mod:`leakguard._threads`: ``threading.enumerate()``, ``active_count()`` and
  gevent's monkey-patching see the host as without leakguard.
* :func:`restart_in_child` runs in a forked child (gunicorn/uwsgi prefork,
  multiprocessing): the parent's thread does not exist there, so the child
  starts its own with its own reporter state; the registry was cleared, so the
  child only ever attributes sockets it created itself.

Inherited sockets (the judge's :func:`leakguard.judge.inherited_fds`): while the
child still holds a socket it inherited at fork, it is counted in the child's
summary (``inherited``, ``inherited_leaks``) but never reported as one of the
child's leaks (the parent, which created it, reports it with its creation
site), and left out of the child's metrics by site.  ``leakguard.snapshot()``
itself still lists them (its contract: every CLOSE_WAIT socket is in
``leaks``), with origin ``unknown``.

Nothing here ever raises into the host: a failing tick is logged at debug level
and the next one runs as usual.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from typing import Any

from . import _threads, diagnose, fdlimit, judge, kernel, report
from . import churn as _churn
from ._log import log
from .snapshot import Snapshot, take as take_snapshot

__all__ = [
    "Watcher",
    "after_fork_in_child",
    "after_fork_in_parent",
    "before_fork",
    "configure",
    "current",
    "dump",
    "restart_in_child",
    "stop",
]

_state_ref: Any = None  # the _state._State, for the signal handler and the exit hook
_signum: int | None = None  # the dump signal our handler is installed for
_previous: Any = None  # the handler we replaced (restored by stop())
_exit_hooked = [False]
_parked_by: dict[int, Watcher] = {}  # forking thread -> the watcher its fork parked


#: Quiet by default: with nothing changed, a routine summary at most this often (seconds).
SUMMARY_EVERY_S = 300.0


class Watcher(_threads.Restartable):
    """Ticks every *interval* seconds (None: only on demand); never raises into the host.

    Emit policy: a tick reports its ``leakguard.summary`` only when something a
    person acts on changed since the last summary (leaks, CLOSE_WAIT sockets,
    inherited leaks, descriptors by tenths of the limit) or :data:`SUMMARY_EVERY_S`
    passed, or when another event (leak, churn, fd limit) goes out with it:
    a steady production process logs one line every few minutes, not one per tick.
    """

    _what = "watcher thread"

    def __init__(self, interval: float | None, reporter: report.Reporter, churn: _churn.ChurnTracker | None) -> None:
        self.interval = interval
        self.reporter = reporter
        self.churn = churn
        self.ticks = 0  # completed ticks (tests and benchmarks wait on this)
        self.pid = os.getpid()
        self._cache = kernel.StateCache()  # steady sockets cost no syscall of their own per tick
        allocate = _threads.api()[2]
        super().__init__(allocate)  # _mu, _stopping, _parked, _running, _thread
        self.diagnoses = diagnose.Cache()  # a tick walks the heap only for new or changed leak groups
        self._tick_lock = allocate()  # one tick or dump at a time (tests call tick() directly)
        self._wake = _threads.Wake(allocate)
        self._dump_requested = False
        self._busy = False  # the thread is ticking or dumping
        self._writing = False  # ... and writing its output
        self._carried: list[Any] = []  # churn warnings of a tick a fork cut short, for the next one
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

    def stop(self, timeout: float = 5.0) -> None:
        with self._mu:
            self._stopping = True
            t = self._thread
        if fdlimit._registered and fdlimit._registered[0] is self.fd_history:
            fdlimit.register(None)
        self._wake.set()
        if t is not None and not t.is_current():
            t.join(timeout)
        if t is None or not t.is_alive():
            self._cache.close()  # else the thread closes it as it ends

    @property
    def alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def park(self) -> None:
        """Before a fork: end the thread, so that the process forks single-threaded, waiting only while it ends.

        Python 3.12+ warns about forking a multi-threaded process, and a child
        forked while a thread holds a lock inherits the lock held forever.  The
        thread is woken and asked to end: an idle one (waiting for its next tick:
        nearly always) ends at once; one computing a tick ends at its next step
        (:meth:`_step`; the tick runs again after the fork); one writing a report
        ends once the write is done.  The fork waits for that only while the thread
        gets on with it (:meth:`leakguard._threads.OSThread.end_wait`), never for
        leakguard's work or I/O: a thread in a long step (a big heap walk) or
        blocked writing (a full pipe) is left running, the fork goes on, and the
        tick completes as if there had been no fork.  :meth:`resume` restarts the
        thread if it ended.
        """
        with self._mu:
            self._parked += 1
            t = self._thread if self._running else None
        if t is not None and not t.is_current():
            self._wake.set()
            t.end_wait()

    def request_dump(self) -> None:
        """Ask the thread to write a report now (safe from a signal handler)."""
        self._dump_requested = True
        self._wake.set()

    def tick(self) -> None:
        """Snapshot, churn, report, metrics; failures are contained."""
        self._tick_once()

    def _tick_once(self) -> bool:
        """:meth:`tick`; False when a fork cut it short (it is to run again)."""
        if self._stopping:
            return True
        try:
            with self._tick_lock:
                self._tick()
        except _Parked:
            return False
        except Exception:  # the host must never see our failure
            log.debug("leakguard: watcher tick failed", exc_info=True)
        self.ticks += 1
        return True

    def _step(self) -> None:
        """Between two steps of a tick: end it here if a fork waits for this thread (see :meth:`park`)."""
        if self._parked:
            t = self._thread
            if t is not None and t.is_current():
                raise _Parked

    def _output(self) -> None:
        """The report is computed, its output comes next: the last :meth:`_step`, then a fork leaves us alone."""
        with self._mu:
            self._step()
            self._writing = True

    def _tick(self) -> None:
        churn = self.churn
        if churn is not None:
            churn.step = self._step  # its machine-wide table read is long: a fork may end the tick there
        pre = churn.before() if churn is not None else None
        snap = take_snapshot(self._cache)
        self.diagnoses.attach(snap.leaks)
        inherited = judge.inherited_fds(snap)
        self._step()
        warnings = churn.observe(snap, pre) if churn is not None and pre is not None else []
        if self._carried:
            warnings, self._carried = self._carried + warnings, []
        outlook = self.fd_history.add_snapshot(snap, time.monotonic())
        last = self._summary_key, self._summary_at
        try:
            self.reporter.report(
                snap,
                inherited,
                warnings,
                routine=self.routine(snap, inherited),
                outlook=outlook,
                before_output=self._output,
            )
        except _Parked:
            self._carried = warnings  # observed once only: the next tick reports them
            self._summary_key, self._summary_at = last  # this tick's summary was not written
            raise
        finally:
            self._writing = False
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
                try:
                    self.reporter.report(
                        snap,
                        judge.inherited_fds(snap),
                        dump=True,
                        outlook=fdlimit.outlook(snap),
                        before_output=self._output,
                    )
                finally:
                    self._writing = False
        except _Parked:
            self._dump_requested = True  # after the fork
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
                    if self._parked:
                        continue  # the dump runs again after the fork
                due = self._due
                if due is not None and interval is not None and time.monotonic() >= due:
                    if not self._tick_once():
                        continue  # a fork waits for this thread to end: the loop's top ends it
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


class _Parked(BaseException):
    """A fork asks the watcher thread to end: the tick in progress ends here (see :meth:`Watcher.park`)."""


_instances: weakref.WeakSet[Watcher] = weakref.WeakSet()


def running() -> list[Watcher]:
    """The watchers of this process whose thread is alive (``threading`` does not list them)."""
    return [w for w in list(_instances) if w.pid == os.getpid() and w.alive]


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
    try:
        _configure_watcher(state, cfg)
    finally:
        _follow_metrics(state.watcher)


def _configure_watcher(state: Any, cfg: Any) -> None:
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
            metrics.follow(False)
            metrics.stop()
        except Exception:
            log.debug("leakguard: stopping metrics failed", exc_info=True)


# -- fork (called by the at-fork handler in leakguard._state) --------------------------------------


def before_fork() -> None:
    """End the thread before the fork, waiting only while it gets on with ending (see :meth:`Watcher.park`)."""
    try:
        w = current()
        if w is not None and w.pid == os.getpid():
            _parked_by[_threads.api()[3]()] = w
            w.park()
    except Exception:
        pass


def after_fork_in_parent() -> None:
    try:
        w = _parked_by.pop(_threads.api()[3](), None)
        if w is not None:
            w.resume()
    except Exception:
        pass


def after_fork_in_child() -> None:
    """The parent's thread does not exist here: forget its watcher (the child starts its own)."""
    _parked_by.clear()
    st = _state_ref
    old = st.watcher if st is not None else None
    if isinstance(old, Watcher):
        st.watcher = None
        old._cache.close()  # the parent's epoll set, shared with it: this copy is dropped, never used


def restart_in_child(state: Any) -> None:
    """In a forked child with leakguard installed: the child's own watcher, metrics and dump signal."""
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


def _follow_metrics(w: Watcher | None) -> None:
    """Tell the metrics (when loaded) whether ticks refresh them, and which churn tracker to read."""
    metrics = sys.modules.get("leakguard.metrics")  # loaded only when metrics are exported
    if metrics is not None:
        metrics.follow(w is not None and w.interval is not None, w.churn if w is not None else None)


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
