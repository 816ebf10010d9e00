"""`relkd run`'s input checks that run before any library loads (pipeline/run_arguments.py)."""
import pytest

from pipeline import run_arguments
from pipeline.exit_codes import UsageError


@pytest.mark.parametrize("logs, judgments, dataset, dataset_input, message", [
    ("l.csv", None, None, None, "give both --logs and --judgments"),
    (None, "j.csv", None, None, "give both --logs and --judgments"),
    ("l.csv", "j.csv", "homedepot", "x.zip", "--dataset replaces --logs/--judgments"),
    (None, None, "amazon", "x.zip", "unknown --dataset 'amazon'; known: homedepot"),
    (None, None, "homedepot", None, "--dataset homedepot needs --input PATH"),
    (None, None, None, "x.zip", "--input goes with --dataset"),
])
def test_flag_combinations_that_name_no_single_way_in_are_refused(logs, judgments, dataset,
                                                                   dataset_input, message):
    with pytest.raises(UsageError, match=message):
        run_arguments.check_input_choice(logs, judgments, dataset, dataset_input)


def test_paths_must_exist_unless_they_are_globs(tmp_path):
    logs, judgments, config = tmp_path / "logs.csv", tmp_path / "judgments.csv", tmp_path / "c.yaml"
    for path in (logs, judgments, config):
        path.write_text("x\n")
    # Every way in that is complete passes: nothing (default data), files, globs, a dataset file.
    run_arguments.check(None, None, None, None, None)
    run_arguments.check(str(logs), str(judgments), None, None, str(config))
    run_arguments.check(str(tmp_path / "logs-*.csv"), str(tmp_path), None, None, None)
    run_arguments.check(None, None, "homedepot", str(logs), None)
    with pytest.raises(UsageError, match=f"judgments input not found: {tmp_path}/nope.csv"):
        run_arguments.check(str(logs), str(tmp_path / "nope.csv"), None, None, None)
    with pytest.raises(UsageError, match="Home Depot input not found"):
        run_arguments.check(None, None, "homedepot", str(tmp_path / "train_dev.csv.zip"), None)
    with pytest.raises(UsageError, match="config file not found: nope.yaml"):
        run_arguments.check(None, None, None, None, "nope.yaml")
