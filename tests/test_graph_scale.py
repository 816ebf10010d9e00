"""benchmarks/graph_scale.py: a small size end to end, and what its JSON records beside the figures."""
import glob
import json
import os
import tempfile

from benchmarks import graph_scale


def test_a_size_runs_in_a_child_and_the_json_names_commit_machine_and_settings(tmp_path, capsys):
    out = tmp_path / "scale.json"
    graph_scale.main(["--edges", "1e3", "--k", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["benchmark"] == "graph_scale" and record["git_commit"]
    assert record["machine"]["cores"] == os.cpu_count()
    assert {"load_average_before", "load_average_after"} <= set(record["machine"])
    assert record["settings"]["k"] == 1 and "child_edges" not in record["settings"]
    (run,) = record["runs"]
    assert run["rows"] == 1000 and 0 < run["distinct_edges"] <= 1000
    assert run["table_rows"] > 0 and run["wall_s"] > 0
    assert "| 1,000 |" in capsys.readouterr().out  # the Markdown table
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "graph_scale_*")), "the child left its output"
