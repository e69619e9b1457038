"""The periodic check: one daemon thread that snapshots and reports every interval."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from . import report, snapshot

__all__ = ["Watcher", "after_fork", "configure", "stop"]

log = logging.getLogger("leakguard")


class Watcher:
    """Takes a snapshot every *interval* seconds and hands it to *sink*; never raises."""

    def __init__(self, interval: float, sink: Any) -> None:
        self.interval = interval
        self.sink = sink
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leakguard-watcher", daemon=True)
        self.pid = os.getpid()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def tick(self) -> None:
        try:
            self.sink(snapshot.take())
        except Exception:  # the host must never see our failure
            log.debug("leakguard: watcher tick failed", exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()


def configure(state: Any) -> None:
    """Start, restart or stop the watcher to match ``state.config``."""
    interval = state.config.report_interval
    w = state.watcher
    if w is not None and (interval is None or w.interval != interval):
        stop(state)
        w = None
    if interval is not None and w is None:
        state.watcher = Watcher(interval, report.Reporter(state.config).emit)
        state.watcher.start()
    elif w is not None:
        w.sink = report.Reporter(state.config).emit


def stop(state: Any) -> None:
    w, state.watcher = state.watcher, None
    if w is not None:
        w.stop()


def after_fork(state: Any) -> None:
    """In a forked child: the parent's thread is gone; start the child's own."""
    state.watcher = None
    configure(state)
