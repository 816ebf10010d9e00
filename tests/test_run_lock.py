"""One `relkd run` at a time per output folder (pipeline/run_lock.py)."""
import os
import signal
import subprocess
import sys

import pytest

from pipeline import run_lock
from pipeline.exit_codes import UsageError

HOLD = """
import sys, time
from pipeline import run_lock
with run_lock.holding(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_second_holder_is_refused_with_the_first_named_and_the_lock_is_released_after(tmp_path):
    with run_lock.holding(str(tmp_path)):
        with pytest.raises(UsageError, match=rf"another `relkd run` \(pid {os.getpid()}, started "
                                             rf".*\) is writing into {tmp_path}; wait for it"):
            with run_lock.holding(str(tmp_path)):
                pass
    with run_lock.holding(str(tmp_path)):  # released when the first block ended
        pass


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(UsageError, match=f"pid {holder.pid}"):
            with run_lock.holding(str(tmp_path)):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    with run_lock.holding(str(tmp_path)):  # the kernel dropped the killed holder's lock
        pass


def test_relkd_run_into_a_folder_another_run_is_writing_is_a_usage_error_before_any_work(tmp_path, capsys):
    from pipeline import cli

    with run_lock.holding(str(tmp_path)):
        assert cli.main(["run", "--output", str(tmp_path)]) == 2
    assert "another `relkd run`" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == [run_lock.LOCK_FILE]  # no inputs/, tmp/ or run.log
