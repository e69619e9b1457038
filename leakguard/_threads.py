"""leakguard's own threads: the interpreter's, unknown to ``threading``, and gone before a fork.

Three parts of leakguard run a thread: the watcher (periodic reports), the
metrics server and the pools' checkout timer.  Each is an :class:`OSThread`:

* ``threading`` does not know it, so ``threading.enumerate()`` and
  ``active_count()`` see the host as without leakguard, and gevent's
  ``monkey.patch_all()`` after ``install()`` (always the case under
  ``leakguard run``) neither turns it into a greenlet nor makes its end raise
  ``KeyError`` in ``threading._delete``;
* its locks and waits come from the interpreter's own ``_thread`` functions
  (gevent's originals once it patched them), see :func:`api`;
* its owner ends it before ``os.fork()``, waiting only while it gets on with
  ending (:meth:`OSThread.end_wait`: never for leakguard's work or I/O), and
  starts it again in the parent afterwards (the at-fork handler in
  :mod:`leakguard._state`), so a single-threaded host forks single-threaded: no "This process is
  multi-threaded" DeprecationWarning on 3.12+ (which counts the operating
  system's threads), no lock of ours held forever in the child.
"""

from __future__ import annotations

import _thread
import os
import sys
import time
from typing import Any

__all__ = ["PARK_WAIT_S", "PARK_WORK_S", "OSThread", "Restartable", "Wake", "api", "original"]

#: How much of its own CPU time one of these threads may still spend while a fork waits for it to
#: end (:meth:`OSThread.end_wait`): an idle thread ends in microseconds, one at a step of its work
#: in a millisecond; past this it is in a long uninterruptible step (a heap walk), not ending.
PARK_WORK_S = 0.02
#: The longest a fork waits for it in all: the CPU it waits for is the scheduler's (a loaded
#: machine), never leakguard's work or I/O; this bounds a process so starved it gets none.
PARK_WAIT_S = 1.0
#: Polls (1 ms apart) in a row that see the thread asleep with no CPU spent before a fork stops
#: waiting for it (blocked writing to a full pipe, or on a lock): a few, as a thread also sleeps a
#: moment for the GIL or a kernel lock on a loaded machine.
_STALLED_POLLS = 10

#: The longest wait a lock accepts, bounded to a year (report_interval's limit).
TIMEOUT_MAX = min(_thread.TIMEOUT_MAX, 365 * 86400.0)


def original(module: str, name: str, default: Any) -> Any:
    """``module.name`` as it was before gevent's monkey-patching (*default* without gevent)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        try:
            return monkey.get_original(module, name)
        except Exception:  # an older gevent, or a name it does not know: the module's own is the original
            pass
    return default


def api() -> tuple[Any, Any, Any, Any]:
    """(start_joinable_thread or None, start_new_thread, allocate_lock, get_ident): the interpreter's own.

    gevent's ``monkey.patch_all()`` replaces ``_thread``'s functions with
    greenlet-based ones: a thread started with those, or with locks made by
    them, would be a greenlet that runs only when the host yields to gevent's
    hub.  Looked up at each call, so a patch made before install() or between
    two forks is seen.
    """
    joinable = getattr(_thread, "start_joinable_thread", None)  # 3.13+: joined with pthread_join
    return (
        original("_thread", "start_joinable_thread", joinable) if joinable is not None else None,
        original("_thread", "start_new_thread", _thread.start_new_thread),
        original("_thread", "allocate_lock", _thread.allocate_lock),
        original("_thread", "get_ident", _thread.get_ident),
    )


class OSThread:
    """A thread of the interpreter's own that the ``threading`` module does not know (see the module doc).

    :meth:`join` returns once the operating-system thread is gone, which is
    what the multi-threaded fork warning counts.
    """

    __slots__ = ("_done", "_handle", "ident", "native_id")

    def __init__(self, target: Any) -> None:
        joinable, start_new, allocate, get_ident = api()
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

    def is_current(self) -> bool:
        """Is the calling thread this one?"""
        return self.ident is not None and self.ident == api()[3]()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (at most *timeout* seconds); True once it has."""
        deadline = time.monotonic() + max(0.0, timeout or 0.0)
        if not self._done.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            return False
        self._done.release()
        if self._handle is not None:
            try:
                self._handle.join()  # pthread_join: the thread's own work is over
            except Exception:
                pass
        # The kernel counts a thread (/proc/self/stat, what the fork warning reads) until it is
        # reaped, a moment after its Python part ends and even after pthread_join returns (it
        # wakes the joiner before the task leaves its thread group): wait for the task itself,
        # bounded by time (a loaded machine), not by a count of polls.
        task = f"/proc/self/task/{self.native_id}"
        deadline = max(deadline, time.monotonic()) + 0.02
        while os.path.exists(task) and time.monotonic() < deadline:
            time.sleep(0.0001)  # a real sleep: the ending thread may need the GIL to finish
        return True


    def _progress(self) -> tuple[float | None, bool]:
        """(the thread's CPU time or None when unknown, is it asleep in the kernel: blocked on I/O or a lock)."""
        cpu: float | None = None
        asleep = False
        try:
            if self.ident is not None:
                cpu = time.clock_gettime(time.pthread_getcpuclockid(self.ident))
        except (AttributeError, OSError, OverflowError):  # not here, or the thread has just ended
            pass
        try:
            with open(f"/proc/self/task/{self.native_id}/stat", "rb") as f:
                asleep = f.read().rsplit(b")", 1)[1].split()[0] in (b"S", b"D")
        except (OSError, IndexError):
            pass
        return cpu, asleep

    def end_wait(self, work: float = PARK_WORK_S, limit: float = PARK_WAIT_S) -> bool:
        """Wait for the thread, asked to end, to end; True once it has.

        It is waited for while it gets on with ending: never once it has spent
        *work* seconds of its own CPU time meanwhile (it is in a long step of its
        work), nor once it sleeps in the kernel without progress (blocked writing
        to a full pipe, or waiting for a lock), and *limit* seconds at most in all.
        A thread waiting for the CPU (a loaded machine) is waited for.
        """
        deadline = time.monotonic() + limit
        start, _ = self._progress()
        last, stalled = start, 0
        while not self.join(0.001):
            cpu, asleep = self._progress()
            if time.monotonic() >= deadline or (cpu is not None and start is not None and cpu - start >= work):
                return False
            stalled = stalled + 1 if asleep and cpu == last else 0
            if stalled >= _STALLED_POLLS:  # asleep poll after poll, no CPU spent: blocked
                return False
            last = cpu
        return True


class Wake:
    """An event without ``threading``: set() from any thread or a signal handler, wait() in the thread.

    A lock held while nobody asked for a wake-up; set() releases it, wait()
    takes it back.  No Python-level lock on set()'s path (a signal handler may
    interrupt any code, including a wait() in progress on another thread).
    """

    __slots__ = ("_lock",)

    def __init__(self, allocate: Any = None) -> None:
        self._lock = (allocate or api()[2])()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # set already
            pass

    def wait(self, timeout: float | None) -> bool:
        """Wait until set() (True, and clear) or *timeout* seconds pass (False)."""
        return bool(self._lock.acquire(True, -1 if timeout is None else min(max(0.0, timeout), TIMEOUT_MAX)))


class Restartable:
    """The lifecycle of one of leakguard's threads: started, ended before a fork, started again after it.

    A subclass gives :meth:`_run` (the thread's body, which returns once
    ``_stopping`` or ``_parked`` is set, clearing ``_running`` under ``_mu``) and
    its own ``park()`` (how a fork ends the thread: what it waits for).  ``_mu``
    guards the fields, held for a few operations at a time, never across the
    thread's work: the at-fork hooks take it, and a fork must never wait for
    leakguard's work or I/O.
    """

    #: what the thread is, for the log line when none can be started
    _what = "leakguard thread"

    def __init__(self, allocate: Any = None) -> None:
        self._mu = (allocate or api()[2])()
        self._stopping = False
        self._parked = 0  # forks in progress
        self._running = False  # a thread runs (or is starting) and has not decided to end
        self._thread: OSThread | None = None

    def _run(self) -> None:
        raise NotImplementedError

    def _spawn(self) -> None:  # under _mu
        if not self._running and not self._stopping and not self._parked:
            self._running = True
            try:
                self._thread = OSThread(self._run)
            except Exception:  # no thread to be had (a limit): nothing of ours runs, the host is untouched
                self._running = False
                from ._log import log

                log.debug("leakguard: cannot start the %s", self._what, exc_info=True)

    def resume(self) -> None:
        """After a fork, in the parent: the thread again."""
        with self._mu:
            self._parked = max(0, self._parked - 1)
            self._spawn()
