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


@pytest.mark.parametrize("text,message", [
    ("serving:\n  base_directory: {afile}/serving\n",
     "serving.base_directory {afile}/serving: {afile} is a file, so no folder can be made there"),
    ("metadata:\n  sqlite_path: {afile}/meta.sqlite\n",
     "metadata.sqlite_path {afile}/meta.sqlite: {afile} is a file"),
    ("metadata:\n  backend: mysql\n  mysql: {{host: 127.0.0.1, port: 1, password_env: ''}}\n",
     "metadata.backend is mysql: cannot use mysql://relkd@127.0.0.1:1/relkd_mlmd"),
])
def test_run_refuses_where_it_could_not_record_or_push_before_any_step(tmp_path, capsys, text, message):
    # Before: the Pusher failed after the whole run, or a traceback (the SQLite file, MySQL).
    from pipeline import cli

    afile = tmp_path / "afile"
    afile.write_text("")
    config = tmp_path / "c.yaml"
    config.write_text(text.format(afile=afile))
    output = tmp_path / "run"
    assert cli.main(["run", "--config", str(config), "--output", str(output)]) == 2
    assert message.format(afile=afile) in capsys.readouterr().err
    assert not (output / "inputs").exists()  # refused before the default data was generated


def test_a_store_that_cannot_be_read_after_the_steps_fails_the_run_with_a_sentence(tmp_path, monkeypatch):
    # Before, the summary's own crash replaced whatever the steps had said.
    from tfx import v1 as tfx

    from pipeline import configs, local_runner, run_summary
    from pipeline.exit_codes import EXIT_FAILED

    class NoSteps:
        def run(self, pipeline):
            pass

    def unreadable(*args, **kwargs):
        raise RuntimeError("mysql_real_connect failed")

    monkeypatch.setattr(tfx.orchestration, "LocalDagRunner", NoSteps)
    monkeypatch.setattr(run_summary, "collect", unreadable)
    outcome = local_runner.run(configs.load_config(), str(tmp_path / "run"), echo=lambda line: None)
    assert outcome.exit_code == EXIT_FAILED
    assert "their ML Metadata" in outcome.message and "mysql_real_connect failed" in outcome.message
    assert outcome.summary["status"] == "failed"


def test_a_failed_runs_reason_goes_to_stderr_and_a_library_screenful_is_cut(tmp_path, monkeypatch, capsys):
    from tfx import v1 as tfx

    from pipeline import configs, local_runner

    beam_says = "Not a valid TFRecord. Fewer than 12 bytes: b'" + "0a" * 5000 + "'"

    class CorruptRecord:
        def run(self, pipeline):
            raise ValueError(beam_says)

    monkeypatch.setattr(tfx.orchestration, "LocalDagRunner", CorruptRecord)
    outcome = local_runner.run(configs.load_config(), str(tmp_path / "run"), echo=lambda line: None)
    assert outcome.exit_code == local_runner.EXIT_FAILED
    assert outcome.message.startswith("step ? failed: ValueError: Not a valid TFRecord.")
    assert f"... ({len(beam_says) - 600:,} more characters in run.log)" in outcome.message
    assert len(outcome.message) < 800
    assert "0a" * 5000 in (tmp_path / "run" / "run.log").read_text()
    local_runner.print_summary(outcome)
    out, err = capsys.readouterr()
    assert outcome.message in err and outcome.message not in out
    assert "Run failed in" in out
