"""One `relkd run` at a time in an output folder.

Two runs into one folder would share everything in it: the second empties the first's `tmp/`
(TFX's packages for the Beam steps still running), rewrites `inputs/`, `run.log` and the summary,
writes the same SQLite metadata (one writer at a time: "database is locked" mid-step) and pushes
into the same serving folder. An advisory lock on a file in the folder refuses the second run
before it touches anything. The kernel drops the lock when its process ends, however it ends, so
a killed run leaves no stale lock behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Iterator

from pipeline.exit_codes import UsageError

LOCK_FILE = ".relkd-run.lock"


@contextlib.contextmanager
def holding(output_dir: str) -> Iterator[None]:
    """Holds `output_dir`'s run lock for the block; UsageError at once if another run holds it."""
    with open(os.path.join(output_dir, LOCK_FILE), "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process"
            raise UsageError(f"another `relkd run` ({holder}) is writing into {output_dir}; wait "
                             "for it to finish or give another --output") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
