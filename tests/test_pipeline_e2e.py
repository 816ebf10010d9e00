"""The ingestion half of the DAG under LocalDagRunner, in-process and through the `relkd` command."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest

from pipeline import configs, local_runner, run_summary

pytestmark = pytest.mark.e2e

# The generator always injects at least one fault of each kind, which is more than 1% of a
# shop this small, hence the relaxed quarantine limit.
TINY_SHOP = {"default_data": {"num_items": 200, "num_queries": 40, "results_per_query": 8},
             "data": {"max_quarantine_fraction": 0.05}}
LOG_HEADER = ["query", "item_id", "item_title", "impressions", "clicks"]
# Gates any model clears, for tests about plumbing (tests/test_evaluation_gates.py fails gates).
PERMISSIVE_GATES = {"evaluation": {"gates": {"auc": {"bound": 0.0}, "ndcg": {"bound": 0.0}}}}
# Models as small as the plumbing allows: the tests here are about the DAG, not model quality.
SMALL_MODELS = {"teacher": {"settings": {"num_layers": 1, "max_seq_length": 32, "epochs": 1}},
                "student": {"settings": {"epochs": 1}}}


def write_logs_and_judgments(directory, extra_log_column=None, bad_log_rows=0):
    os.makedirs(directory, exist_ok=True)
    logs_path, judgments_path = os.path.join(directory, "logs.csv"), os.path.join(directory, "judgments.csv")
    header = LOG_HEADER + ([extra_log_column] if extra_log_column else [])
    with open(logs_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for q in range(30):
            for i in range(4):
                row = [f"query {q}", f"P{q}-{i}", f"title {i} of {q}", 20, i]
                writer.writerow(row + (["mobile"] if extra_log_column else []))
        for b in range(bad_log_rows):
            writer.writerow([f"query {b}", f"BAD{b}", "title", 1, 5] + (["mobile"] if extra_log_column else []))
    with open(judgments_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "item_id", "relevance"])
        for q in range(30):
            writer.writerow([f"query {q}", f"P{q}-0", 3])
            writer.writerow([f"query {q}", f"P{q}-3", 1])
    return logs_path, judgments_path


def quiet(_):
    pass


def check_report_in_browser(path, expected_gates):
    """Headless Chromium: no console errors, the gate table and every plot present and drawn."""
    from browser import Page

    with Page() as page:
        page.open(path)
        seen = page.evaluate("""(() => ({
            gates: [...document.querySelectorAll('table.gates tbody tr')].map(
                r => [...r.cells].map(c => c.textContent)),
            verdict: document.getElementById('verdict').textContent,
            plots: [...document.querySelectorAll('img.plot')].map(
                i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})),
            scripts: document.scripts.length,
        }))()""")
        assert page.console_errors() == []
    assert len(seen["gates"]) == expected_gates
    assert all(row[7] in ("PASS", "FAIL") for row in seen["gates"])
    assert [p["alt"] for p in seen["plots"]] == [
        "AUC by slice", "NDCG@10 by slice", "Calibration", "Score distributions", "Teacher-student scatter"]
    assert all(p["complete"] and p["width"] > 100 and p["height"] > 100 for p in seen["plots"]), seen["plots"]
    assert seen["scripts"] == 0
    return seen


# Nodes logged less often than this keep no tables in BERM-O: on the tiny shop some do.
TABLE_MIN_IMPRESSIONS = 200


def test_default_data_runs_through_the_whole_dag(tmp_path, monkeypatch):
    from conftest import read_examples
    from tfx.utils import dependency_utils

    config = configs.load_config(overrides={
        **TINY_SHOP, **PERMISSIVE_GATES, **SMALL_MODELS,
        "graph": {"table_min_impressions": TABLE_MIN_IMPRESSIONS}})
    # With the default Beam arguments no step packs TFX into an sdist for workers that the
    # in-memory DirectRunner does not have (pipeline/configs.py, beam_pipeline_args).
    packed = []
    monkeypatch.setattr(dependency_utils, "build_ephemeral_package", lambda: packed.append(1) or "x")
    messages = []
    outcome = local_runner.run(config, str(tmp_path / "run"), echo=messages.append)
    assert outcome.exit_code == local_runner.EXIT_OK, outcome.message
    assert packed == []
    summary = outcome.summary
    assert summary["status"] == "succeeded" and summary["data_gate"]["passed"]
    for kind in ("logs", "judgments"):
        entry = summary["inputs"][kind]
        assert entry["rows_in"] == entry["accepted"] + entry["quarantined"] > 0
        assert entry["examples_per_split"]["train"] > 0
        assert sum(entry["examples_per_split"].values()) == entry["accepted"]
        assert os.path.isdir(entry["quarantine_dir"])
    # The generator injects a few faults on purpose: they are counted, not dropped.
    assert summary["inputs"]["logs"]["quarantined"] > 0
    assert all(info and info["state"] == "COMPLETE" for info in summary["nodes"].values())
    assert len(summary["nodes"]) == 20

    # Graph: statistics, and contexts joined onto both inputs.
    assert summary["graph"]["nodes"]["query"] > 0 and summary["graph"]["edges"]["after_hub_cap"] > 0
    nodes = summary["nodes"]
    judged = read_examples(os.path.join(nodes["GraphContexts"]["outputs"]["judgment_examples"][0]["uri"], "Split-train"))
    assert judged and all(r["item_title"] for r in judged), "judgments get the item's title from the logs"
    assert all("q_o2_ids" in r and "i_o1_weights" in r for r in judged)
    # ... and the evaluation label and slices (components/graph/eval_features.py).
    # relevance comes back from tf.Example as float32: a judged 2.33 is relevant too.
    assert any(abs(r["relevance"] - 2.33) < 1e-6 for r in judged)
    assert all(r["relevant"] == (1.0 if r["relevance"] >= 2.33 - 1e-6 else 0.0) for r in judged)
    assert {r["query_segment"] for r in judged} <= {"head", "torso", "tail", "unlogged"}
    assert {r["graph_context"] for r in judged} <= {"warm", "cold"} and "warm" in {r["graph_context"] for r in judged}

    # Only the StudentEvaluator blesses: on Kubeflow the baseline query matches any ModelBlessing
    # with blessed=1 (tests/test_kubeflow.py), so a blessed teacher would become the student's
    # baseline there.
    assert "blessed" not in nodes["TeacherEvaluator"]["outputs"]["blessing"][0]["properties"]
    assert nodes["StudentEvaluator"]["outputs"]["blessing"][0]["properties"]["blessed"] == 1

    # Teacher: trained, and every accepted logged pair labelled once with a score in [0, 1].
    assert summary["teacher"]["epochs"] == 1
    labelled_uri = nodes["TeacherLabeller"]["outputs"]["output_examples"][0]["uri"]
    labelled = [r for split in ("train", "eval", "test") for r in read_examples(os.path.join(labelled_uri, f"Split-{split}"))]
    assert len(labelled) == summary["inputs"]["logs"]["accepted"]
    assert all(0.0 <= r["teacher_score"] <= 1.0 for r in labelled)
    assert len({(r["query"], r["item_id"]) for r in labelled}) == len(labelled)
    # Every judged pair is logged in the generated shop, so each judgment reaches its log example.
    judged_pairs = [r for r in labelled if r["relevance"] >= 0]
    assert len(judged_pairs) == summary["inputs"]["judgments"]["accepted"]

    # Student and BERM-O: the served model answers raw strings, unknown ids included.
    import tensorflow as tf
    from tfx.utils import path_utils

    berm_o = tf.saved_model.load(path_utils.serving_model_path(
        nodes["BermServingExporter"]["outputs"]["serving_model"][0]["uri"]))
    known = labelled[0]
    scores = berm_o.signatures["serve_raw"](
        query=tf.constant([known["query"], "a query nobody typed"]),
        item_id=tf.constant([known["item_id"], "NO-SUCH-ITEM"]),
        item_title=tf.constant([known["item_title"], "Some Title 3ml"]))["score"].numpy()
    assert scores.shape == (2,) and all(0.0 <= s <= 1.0 for s in scores)
    # ... and carries the TitleEncoder's vector of every title logged at least
    # TABLE_MIN_IMPRESSIONS times, and the tables of the queries and items logged that often.
    import collections

    from trainer import berm_serving, sentence_vectors

    volume = {side: collections.Counter() for side in ("title", "query", "item")}
    for r in labelled:
        for side, key in (("title", r["item_title"].strip()), ("query", r["query"]), ("item", r["item_id"])):
            volume[side][key] += r["impressions"]
    busy = {side: {k for k, n in counts.items() if k and n >= TABLE_MIN_IMPRESSIONS}
            for side, counts in volume.items()}
    vectors = sentence_vectors.read_sentence_vectors(nodes["TitleEncoder"]["outputs"]["title_vectors"][0]["uri"])
    assert sorted(vectors.titles) == sorted(busy["title"])
    manifest = berm_serving.read_manifest(path_utils.serving_model_path(
        nodes["BermServingExporter"]["outputs"]["serving_model"][0]["uri"]))
    assert manifest["title_vectors"] == len(vectors.titles)
    assert manifest["tables"]["nodes"] == {side: len(busy[side]) for side in ("query", "item")}
    without = {side: set(volume[side]) - busy[side] for side in ("query", "item")}
    assert without["query"] and without["item"], "the tiny shop has nodes logged less often than the bound"
    assert summary["graph"]["nodes_without_tables"] == dict(
        {side: len(without[side]) for side in without},
        **{f"{side}_impressions": sum(volume[side][k] for k in without[side]) for side in without},
        num_impressions=sum(r["impressions"] for r in labelled))
    # e.g. "3 queries (4.1 % of impressions), 82 items (20.3 %)"
    without_tables = run_summary.nodes_without_tables(summary["graph"])
    assert without_tables.startswith(f"{len(without['query'])} queries (") and " % of impressions), " \
        f"{len(without['item'])} items (" in without_tables

    # Every judged item of the tiny shop is logged, so every judgment has a title to learn from.
    assert summary["graph"]["judgments"] == {"total": summary["inputs"]["judgments"]["accepted"],
                                             "without_title": 0}
    assert run_summary.judgments_without_title(summary["graph"]) is None

    # Evaluation: TFMA metrics for both models on the held-out judged pairs; the student cleared
    # its gates, so BERM-O was pushed as version 1 of the TF Serving layout.
    evaluation = summary["evaluation"]
    for role in ("teacher", "student"):
        values = evaluation[role]["candidate"]
        assert values["example_count"] == summary["inputs"]["judgments"]["examples_per_split"]["test"]
        assert 0.0 <= values["auc"] <= 1.0 and 0.0 <= values["ndcg@10"] <= 1.0
        assert 1 <= values["query_count"] < values["example_count"]
    assert -1.0 <= evaluation["student"]["candidate"]["teacher_agreement"] <= 1.0
    assert evaluation["student"]["blessed"] and evaluation["push"]["pushed"]
    serving = os.path.join(tmp_path, "run", "serving", "relkd")
    [version] = os.listdir(serving)
    assert version.isdigit() and os.path.exists(os.path.join(serving, version, "saved_model.pb"))
    assert evaluation["push"]["destination"].rstrip("/") == os.path.join(serving, version)

    # The report: written by the run, and read in a real browser.
    report_path = summary["paths"]["report"]
    assert report_path == os.path.join(tmp_path, "run", "report", "report.html")
    check_report_in_browser(report_path, expected_gates=2)
    with open(os.path.join(tmp_path, "run", "report", "report.md")) as f:
        markdown = f.read()
    assert "Blessed and pushed" in markdown and "| auc | all pairs |" in markdown
    assert (f"| without tables in BERM-O (< {TABLE_MIN_IMPRESSIONS} impressions) | "
            f"{without_tables} |") in markdown

    # Progress names each step with its position and time.
    assert any(m.startswith("[1/20] ") and m.endswith("...") for m in messages)
    assert any("BermServingExporter done in" in m for m in messages)
    printed = []
    local_runner.print_summary(outcome, echo=printed.append)
    assert (f"without tables in BERM-O (< {TABLE_MIN_IMPRESSIONS} impressions): "
            f"{without_tables}") in "\n".join(printed)
    with open(os.path.join(tmp_path, "run", "run_summary.json")) as f:
        assert json.load(f)["inputs"]["logs"]["rows_in"] == summary["inputs"]["logs"]["rows_in"]
    with open(os.path.join(tmp_path, "run", "run_summary.md")) as f:
        assert (f"- without tables in BERM-O (fewer than {TABLE_MIN_IMPRESSIONS} impressions; "
                f"cold-start path): {without_tables}") in f.read()
    assert not os.path.exists(os.path.join(tmp_path, "run", "tmp")), "the steps' scratch outlived the run"


def test_schema_drift_stops_the_run_naming_input_and_column(tmp_path):
    logs, judgments = write_logs_and_judgments(str(tmp_path / "in"), extra_log_column="device")
    outcome = local_runner.run(configs.load_config(), str(tmp_path / "run"), logs=logs, judgments=judgments, echo=quiet)
    assert outcome.exit_code == local_runner.EXIT_DATA_REJECTED
    assert "logs" in outcome.message and "column 'device'" in outcome.message
    assert "New column" in outcome.message
    problems = outcome.summary["nodes"]["DataValidationGate"]
    assert problems["state"] == "FAILED"
    assert not os.path.exists(os.path.join(tmp_path, "run", "tmp")), "a failed run left its scratch"


def test_too_many_quarantined_rows_stop_the_run(tmp_path):
    logs, judgments = write_logs_and_judgments(str(tmp_path / "in"), bad_log_rows=5)
    outcome = local_runner.run(configs.load_config(), str(tmp_path / "run"), logs=logs, judgments=judgments, echo=quiet)
    assert outcome.exit_code == local_runner.EXIT_DATA_REJECTED
    assert "clicks_exceed_impressions 5" in outcome.message and "above the limit of 1.00%" in outcome.message
    assert outcome.summary["inputs"]["logs"]["quarantined"] == 5
    # Under a relaxed limit the same rows go to quarantine and the run goes on to the push:
    # test_cli_run_prints_progress_and_where_outputs_are runs the whole DAG on them.


class _PipelineBuilt(Exception):
    pass


@pytest.mark.parametrize("resume", [False, True])
def test_only_resume_turns_the_cache_on(tmp_path, monkeypatch, resume):
    # Without --resume every step runs again, even into a folder that holds a finished run: TFX
    # recomputes whenever the pipeline's cache is off, so checking what the runner builds is
    # enough (a third whole-DAG run above would spend two minutes showing the same).
    logs, judgments = write_logs_and_judgments(str(tmp_path / "in"))
    built = {}

    def capture(config, **_):
        built["enable_cache"] = config.enable_cache
        raise _PipelineBuilt

    monkeypatch.setattr(local_runner, "create_pipeline", capture)
    config = configs.load_config()
    with pytest.raises(_PipelineBuilt):
        local_runner.run(config, str(tmp_path / "run"), logs=logs, judgments=judgments, echo=quiet,
                         resume=resume)
    assert built["enable_cache"] is resume
    assert config.enable_cache is False  # The caller's config is left as it was.


def relkd(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_ctrl_c_during_a_step_says_where_it_stopped_and_how_to_resume(tmp_path):
    import signal

    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(TINY_SHOP))
    # A shell that starts pytest in the background (as `cmd &` does) has SIGINT ignored, and
    # Python keeps an ignored SIGINT ignored: give the run the default, as a terminal does.
    run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--output", str(tmp_path / "run"),
                            "--config", str(config_path)], cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in run.stdout:
            if line.startswith("[6/20]"):  # a Beam step (statistics) under way
                run.send_signal(signal.SIGINT)
                break
        out, err = run.communicate(timeout=300)
    finally:
        run.kill()
    assert run.returncode == 130, out + err
    assert re.search(r"interrupted during step \w+; the steps that finished are kept: run the same "
                     r"command with --resume to reuse them", err), out + err  # on stderr, as every error
    assert "Run interrupted in" in out and "Traceback" not in out + err
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert "KeyboardInterrupt" in (tmp_path / "run" / "run.log").read_text()  # the stack goes there
    assert not (tmp_path / "run" / "tmp").exists()


def _node_states(run_dir):
    summary = json.loads((run_dir / "run_summary.json").read_text())
    return {node: info["state"] for node, info in summary["nodes"].items()}


def test_cli_run_prints_progress_and_where_outputs_are(tmp_path):
    # With bad rows under a relaxed quarantine limit (the strict limit stops them:
    # test_too_many_quarantined_rows_stop_the_run).
    logs, judgments = write_logs_and_judgments(str(tmp_path / "in"), bad_log_rows=5)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**PERMISSIVE_GATES, **SMALL_MODELS,
                                       "data": {"max_quarantine_fraction": 0.1}}))
    # --resume into a fresh folder is a whole run: there is nothing yet to reuse.
    run_args = ("run", "--logs", logs, "--judgments", judgments, "--output", str(tmp_path / "run"),
                "--config", str(config_path), "--resume")
    result = relkd(*run_args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\[\d+/20\] BermServingExporter done in", result.stdout)
    assert "[20/20] Pusher done in" in result.stdout
    assert "pushed: BERM-O version" in result.stdout
    assert f"report: {tmp_path / 'run' / 'report' / 'report.html'}" in result.stdout
    first_states = _node_states(tmp_path / "run")
    assert set(first_states.values()) == {"COMPLETE"}, first_states

    [version] = os.listdir(tmp_path / "run" / "serving" / "relkd")

    # Run again with --resume and nothing changed: the slow steps come from TFX's cache, and the
    # student, blessed again against itself, is not pushed as a second copy.
    resumed = relkd(*run_args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    states = _node_states(tmp_path / "run")
    assert states["TeacherTrainer"] == "CACHED" and states["TeacherLabeller"] == "CACHED", states
    assert re.search(r"\[\d+/20\] TeacherTrainer reused from an earlier run", resumed.stdout)
    assert f"pushed: BERM-O version {version} -> " in resumed.stdout
    assert "(already served there: not copied again)" in resumed.stdout
    assert os.listdir(tmp_path / "run" / "serving" / "relkd") == [version]

    # `relkd report` writes the report again, anywhere; a folder that is not a run is a usage error.
    again = relkd("report", "--run", str(tmp_path / "run"), "--output", str(tmp_path / "again"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    # Only its two lines: TensorFlow's deprecation notices about TFMA's readers stay off the terminal.
    assert again.stdout.startswith("Report: ") and "WARNING" not in again.stderr + again.stdout
    assert (tmp_path / "again" / "report.html").exists() and (tmp_path / "again" / "report.md").exists()
    assert len(list((tmp_path / "again").glob("*.png"))) == 5
    not_a_run = relkd("report", "--run", str(tmp_path / "in"), cwd=tmp_path)
    assert not_a_run.returncode == 2 and "not a relkd run directory" in not_a_run.stderr
    assert ("logs: 125 rows in = 120 accepted + 5 quarantined (clicks_exceed_impressions 5)"
            in result.stdout)
    assert re.search(r"logs quarantine\W+\S+quarantine", result.stdout), result.stdout
    assert "run_summary.json" in result.stdout and "pipeline root" in result.stdout
    assert "Traceback" not in result.stderr

    # A later run into the same folder that stops at the data gate reports only what it ran: not
    # the evaluation and push the run above left in the same metadata store.
    drifted_logs, _ = write_logs_and_judgments(str(tmp_path / "drifted"), extra_log_column="device")
    rejected = relkd("run", "--logs", drifted_logs, "--judgments", judgments, "--output", str(tmp_path / "run"),
                     "--config", str(config_path), cwd=tmp_path)
    assert rejected.returncode == local_runner.EXIT_DATA_REJECTED, rejected.stdout + rejected.stderr
    assert "column 'device'" in rejected.stderr  # the reason on stderr, the figures on stdout
    assert "pushed:" not in rejected.stdout and "eval student" not in rejected.stdout, rejected.stdout
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["status"] == "data rejected" and "evaluation" not in summary
    assert summary["nodes"]["Pusher"] is None and summary["nodes"]["StudentTrainer"] is None
    assert summary["nodes"]["DataValidationGate"]["state"] == "FAILED"


@pytest.mark.parametrize("args,message", [
    (["--logs", "x.csv"], "give both --logs and --judgments"),
    (["--logs", "missing.csv", "--judgments", "missing.csv"], "logs input not found"),
    (["--dataset", "homedepot"], "needs --input"),
    (["--config", "nope.yaml"], "config file not found"),
])
def test_cli_usage_errors_exit_2_with_a_message(tmp_path, monkeypatch, capsys, args, message):
    # In-process: `python -m pipeline.cli` only adds sys.exit, and the CLI test above runs that.
    from pipeline import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--output", str(tmp_path / "run"), *args]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "Traceback" not in stderr


HELP_PROBE = """
import sys
from pipeline import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:  # argparse: --help, a bad flag
    code = e.code
print("exit", code)
print("loaded:", sorted({"tensorflow", "tfx", "apache_beam"} & set(sys.modules)))
"""


@pytest.mark.parametrize("args,code,said", [
    (["--help"], 0, "usage: relkd"), (["serve", "--help"], 0, "usage: relkd serve"),
    (["run", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["run", "--config", "nope.yaml"], 2, "config file not found: nope.yaml"),
    (["run", "--logs", "missing.csv", "--judgments", "missing.csv"], 2, "logs input not found"),
    (["run", "--dataset", "homedepot", "--input", "nope.zip"], 2, "Home Depot input not found"),
    (["generate", "--output", "out", "--config", "nope.yaml"], 2, "config file not found: nope.yaml"),
    (["compile", "--kubeflow", "out.json", "--config", "nope.yaml"], 2, "config file not found: nope.yaml"),
    # Where a command writes: a file where a folder belongs, or the reverse (README.md and tests/
    # are this checkout's own), is answered before the work rather than by the first write after it.
    (["run", "--output", "README.md"], 2, "--output README.md is a file; give a folder"),
    (["generate", "--output", "README.md"], 2, "--output README.md is a file; give a folder"),
    (["report", "--run", "runs/x", "--output", "README.md"], 2, "--output README.md is a file"),
    (["compile", "--kubeflow", "README.md/relkd.json"], 2, "README.md is a file, so no folder can be made"),
    (["score", "--model-dir", "nope", "--input", "README.md", "--output", "tests"], 2,
     "--output tests is a folder; give the path of a file"),
    (["score", "--model-dir", "nope", "--input", "tests", "--output", "scores.csv"], 2,
     "input tests is a folder; give the CSV file of pairs"),
    (["score", "--target", "localhost:8500", "--model", "relkd", "--query", "drill", "--items",
      "items.csv", "--max-pairs-per-request", "0"], 2, "--max-pairs-per-request must be at least 1"),
])
def test_help_bad_flags_and_missing_paths_are_answered_before_the_libraries_load(tmp_path, args, code, said):
    result = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], cwd=os.path.dirname(os.path.dirname(__file__)),
                            capture_output=True, text=True, timeout=120)
    assert f"exit {code}" in result.stdout and "loaded: []" in result.stdout, result.stdout + result.stderr
    assert said in (result.stdout if code == 0 else result.stderr)
