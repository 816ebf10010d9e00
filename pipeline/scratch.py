"""A run's temporary files, kept in a directory of the run's own and removed when it ends.

TFX 1.15 packs its own installation (28 MB) into a new temporary directory for every Beam step
whose arguments name no way of shipping code to workers, the DirectRunner's included, and never
removes it (`tfx.utils.dependency_utils.build_ephemeral_package`). A few runs a day fill a small
/tmp; pointing the process's and its children's temporary files at a directory that the run
owns bounds what they can leave behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def scratch_directory(path: str) -> Iterator[str]:
    """Makes `path` (emptied first: a killed run may have left it) the temporary directory of
    this process (`tempfile`) and of the processes it starts (TMPDIR) until the block ends,
    then removes it."""
    path = os.path.abspath(path)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = path
    os.environ["TMPDIR"] = path
    try:
        yield path
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(path, ignore_errors=True)
