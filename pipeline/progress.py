"""Readable progress for LocalDagRunner runs: which component runs, how far, how long.

LocalDagRunner announces each node through absl logging; this turns those records into one
line per step and, while a long step runs, a heartbeat with the elapsed time. Everything
else TFX, Beam and TensorFlow log goes to the run's log file, not the terminal.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from typing import Callable, Dict, List, Optional

_RUNNING = re.compile(r"Component (\S+) is running\.")
_FINISHED = re.compile(r"Component (\S+) is finished\.")
# TFX's launcher, between a node's two lines above, when --resume's cache supplies its outputs.
_CACHED = re.compile(r"A cached execution \d+ is used\.")


def _fmt(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


class ProgressReporter(logging.Handler):
    def __init__(self, node_ids: List[str], echo: Callable[[str], None] = print, heartbeat_s: float = 30.0):
        super().__init__(level=logging.INFO)
        self._order = list(node_ids)
        self._echo = echo
        self._heartbeat_s = heartbeat_s
        self._current: Optional[str] = None
        self._current_cached = False
        self._started = 0.0
        self._run_started = time.monotonic()
        self.durations: Dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _position(self, node_id: str) -> str:
        total = len(self._order)
        index = self._order.index(node_id) + 1 if node_id in self._order else len(self.durations) + 1
        return f"[{index}/{total}]"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # A malformed third-party log record must not break the run.
            return
        match = _RUNNING.search(message)
        if match:
            self._started, self._current = time.monotonic(), match.group(1)
            self._current_cached = False
            self._echo(f"{self._position(self._current)} {self._current} ...")
            return
        if self._current and _CACHED.search(message):
            self._current_cached = True
            return
        match = _FINISHED.search(message)
        if match:
            node = match.group(1)
            elapsed = time.monotonic() - self._started
            self.durations[node] = elapsed
            self._current = None
            done = "reused from an earlier run" if self._current_cached else f"done in {_fmt(elapsed)}"
            self._echo(f"{self._position(node)} {node} {done} "
                       f"(total {_fmt(time.monotonic() - self._run_started)})")

    def _beat(self) -> None:
        # Wakes when the running step's next heartbeat is due, and at least each second to see
        # a new step begin: a fixed one-second poll printed a beat up to a second late, and one
        # due just before the step ended not at all. The count is kept per step start:
        # consecutive steps can begin within one poll.
        step, announced, wait = None, 0, 1.0
        while not self._stop.wait(wait):
            wait = 1.0
            node, started = self._current, self._started
            if not node:
                continue
            if (node, started) != step:
                step, announced = (node, started), 0
            elapsed = time.monotonic() - started
            due = int(elapsed // self._heartbeat_s)
            if due > announced:
                announced = due
                self._echo(f"      {node} still running ({_fmt(elapsed)})")
            wait = min(1.0, max(0.01, (announced + 1) * self._heartbeat_s - elapsed))

    def __enter__(self) -> "ProgressReporter":
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    @property
    def current(self) -> Optional[str]:
        return self._current
