"""GraphContexts' count of judgments left without a title, and what a run makes of it."""
import json

import pytest

from components.data_gate import DataRejectedError
from components.graph import executor
from pipeline import run_summary


def counted(tmp_path, counts):
    (tmp_path / executor.JUDGMENT_TITLES_FILE).write_text(json.dumps(counts))
    return executor._judgment_titles(str(tmp_path))


def test_judgments_whose_items_no_log_shows_are_counted_and_named_in_the_summary(tmp_path):
    judgments = counted(tmp_path, {"with_title": 7, "without_title": 3})
    assert judgments == {"total": 10, "without_title": 3}
    warning = run_summary.judgments_without_title({"judgments": judgments})
    assert warning.startswith("3 of 10 judgments have no title") and "check the judgments' item ids" in warning
    assert run_summary.judgments_without_title({"judgments": {"total": 10, "without_title": 0}}) is None


def test_a_run_whose_judged_items_are_none_of_the_logs_stops_at_the_graph(tmp_path):
    # Before, the teacher fine-tuned on (query, "") pairs and the run went on to push.
    with pytest.raises(DataRejectedError, match="none of the 5 judged items has a title"):
        counted(tmp_path, {"without_title": 5})
    assert counted(tmp_path, {}) == {"total": 0, "without_title": 0}
