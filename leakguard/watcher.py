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

import os
import sys
import threading
import time
from typing import Any

from . import churn as _churn
from . import kernel, report
from ._log import log
from .snapshot import Snapshot, take as take_snapshot

__all__ = ["Watcher", "after_fork", "configure", "current", "dump", "inherited_fds", "stop"]

_state_ref: Any = None  # the _state._State, for the signal handler and the exit hook
_inherited: dict[int, int] = {}  # fd -> socket inode, for sockets this process inherited at fork
_signum: int | None = None  # the dump signal our handler is installed for
_previous: Any = None  # the handler we replaced (restored by stop())
_exit_hooked = [False]
# Held while the watcher reports; fork() waits for it (see _before_fork): a fork in the
# middle of a report would leave the child with the stderr buffer's lock (or a
# half-imported module) held by a thread that does not exist there.
_tick_lock = threading.Lock()
_fork_held = [False]


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
        self.dumps = 0
        self.pid = os.getpid()
        self._cache = kernel.StateCache()  # steady sockets cost no syscall of their own per tick
        self._wake = threading.Event()
        self._stopping = False
        self._dump_requested = False
        self._thread = threading.Thread(target=self._run, name="leakguard-watcher", daemon=True)
        self._summary_key: tuple[int, ...] | None = None
        self._summary_at = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._cache.close()  # else the thread closes it as it ends

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def request_dump(self) -> None:
        """Ask the thread to write a report now (safe from a signal handler)."""
        self._dump_requested = True
        self._wake.set()

    def tick(self) -> None:
        """Snapshot, churn, report, metrics; failures are contained."""
        if self._stopping:
            return
        try:
            with _tick_lock:
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
        self.reporter.report(snap, inherited, warnings, routine=self.routine(snap, inherited))
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
            with _tick_lock:
                snap = take_snapshot()
                self.reporter.report(snap, inherited_fds(snap), dump=True)
        except Exception:
            log.debug("leakguard: dump failed", exc_info=True)
        finally:
            self.dumps += 1

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._cache.close()

    def _loop(self) -> None:
        interval = self.interval
        due = time.monotonic() + interval if interval is not None else None
        while True:
            timeout = None if due is None else max(0.0, due - time.monotonic())
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stopping:
                return
            if self._dump_requested:
                self._dump_requested = False
                self.dump()
            if due is not None and interval is not None and time.monotonic() >= due:
                self.tick()
                due += interval
                now = time.monotonic()
                if due <= now:  # a slow tick or a suspended process: skip, don't burst
                    due = now + interval


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
    # Bounded: a report stuck on a full stderr pipe must not hang the host's fork.
    _fork_held[0] = _tick_lock.acquire(timeout=2.0)


def _after_fork_in_parent() -> None:
    if _fork_held[0]:
        _fork_held[0] = False
        _tick_lock.release()


def _after_fork_in_child() -> None:
    global _tick_lock
    _tick_lock = threading.Lock()  # whatever the parent held, this process starts free
    _fork_held[0] = False


if hasattr(os, "register_at_fork"):
    # Hooks cannot be removed: inert unless a watcher reports.  The child's lock is
    # renewed here and again in after_fork(), whichever hook runs first.
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
