import logging
import time

from pipeline.progress import ProgressReporter


def record(message):
    return logging.LogRecord("absl", logging.INFO, __file__, 1, message, None, None)


def test_steps_are_numbered_and_timed():
    lines = []
    reporter = ProgressReporter(["A", "B"], echo=lines.append)
    reporter.emit(record("Component B is running."))
    reporter.emit(record("Component B is finished."))
    reporter.emit(record("unrelated message"))
    assert lines[0] == "[2/2] B ..."
    assert lines[1].startswith("[2/2] B done in ") and "total" in lines[1]
    assert set(reporter.durations) == {"B"} and len(lines) == 2


def test_a_step_taken_from_the_cache_says_so():
    lines = []
    reporter = ProgressReporter(["A", "B"], echo=lines.append)
    for message in ("Component A is running.", "A cached execution 7 is used.", "Component A is finished.",
                    "Component B is running.", "Going to run a new execution 8", "Component B is finished."):
        reporter.emit(record(message))
    assert lines[1].startswith("[1/2] A reused from an earlier run (total ")
    assert lines[3].startswith("[2/2] B done in ")


def test_heartbeat_counts_from_the_start_of_the_step():
    lines = []
    with ProgressReporter(["A"], echo=lines.append, heartbeat_s=1.5) as reporter:
        reporter.emit(record("Component A is running."))
        time.sleep(3.5)
        reporter.emit(record("Component A is finished."))
    beats = [line for line in lines if "still running" in line]
    assert len(beats) == 2
    assert all(float(b.split("(")[1].rstrip("s)")) >= 1.5 for b in beats)


def test_heartbeat_restarts_for_a_step_that_follows_immediately():
    lines = []
    with ProgressReporter(["A", "B"], echo=lines.append, heartbeat_s=1.5) as reporter:
        reporter.emit(record("Component A is running."))
        time.sleep(3.5)
        reporter.emit(record("Component A is finished."))
        reporter.emit(record("Component B is running."))
        time.sleep(2.5)
        reporter.emit(record("Component B is finished."))
    assert any(line.startswith("      B still running") for line in lines), lines
