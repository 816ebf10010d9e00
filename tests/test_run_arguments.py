"""`relkd run`'s input checks that run before any library loads (pipeline/run_arguments.py)."""
import os

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


def test_output_paths_must_be_the_right_kind_of_thing_where_they_exist(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x\n")
    # Folders and files that do not exist yet pass, however deep; so do existing ones of the
    # right kind and remote paths, which only TensorFlow's file system can answer for.
    run_arguments.check_output_path(str(tmp_path / "new" / "run"), "--output", folder=True)
    run_arguments.check_output_path(str(tmp_path), "--output", folder=True)
    run_arguments.check_output_path(str(tmp_path / "new" / "scores.csv"), "--output", folder=False)
    run_arguments.check_output_path(str(a_file), "--output", folder=False)
    run_arguments.check_output_path("gs://bucket/relkd.json", "--kubeflow", folder=False)
    with pytest.raises(UsageError, match=f"--output {a_file} is a file; give a folder"):
        run_arguments.check_output_path(str(a_file), "--output", folder=True)
    with pytest.raises(UsageError, match=f"--output {tmp_path} is a folder; give the path of a file"):
        run_arguments.check_output_path(str(tmp_path), "--output", folder=False)
    for folder in (True, False):
        with pytest.raises(UsageError, match=f"{a_file} is a file, so no folder can be made there"):
            run_arguments.check_output_path(str(a_file / "deeper" / "out"), "--kubeflow", folder)
    with pytest.raises(UsageError, match=f"--output {a_file} is a file"):
        run_arguments.check(None, None, None, None, None, str(a_file))


def test_an_output_folder_nobody_may_write_in_is_refused(tmp_path, monkeypatch):
    # The tests run as root here, whom a folder's mode does not stop; the check asks os.access.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(run_arguments.os, "access",
                        lambda path, mode: path != str(locked) and real_access(path, mode))
    with pytest.raises(UsageError, match=f"--output {locked}/run: no permission to write in {locked}$"):
        run_arguments.check_output_path(str(locked / "run"), "--output", folder=True)
    with pytest.raises(UsageError, match=f"no permission to write in {locked}$"):
        run_arguments.check_output_path(str(locked / "scores.csv"), "--output", folder=False)
    run_arguments.check_output_path(str(tmp_path / "open" / "run"), "--output", folder=True)
