"""benchmarks/neighbour_tables_read.py: tables written once per size, read in a child, and its JSON."""
import json
import os

from benchmarks import neighbour_tables_read
from trainer import berm_serving


def test_a_size_is_written_once_and_read_in_a_child(tmp_path, capsys):
    work_dir, out = tmp_path / "tables", tmp_path / "read.json"
    args = ["--nodes", "40", "--max-order", "2", "--top-n", "3", "--work-dir", str(work_dir), "--out", str(out)]
    neighbour_tables_read.main(args)
    record = json.loads(out.read_text())
    assert record["benchmark"] == "neighbour_tables_read" and record["git_commit"]
    assert {"load_average_before", "load_average_after"} <= set(record["machine"])
    (run,) = record["runs"]
    assert run["nodes"] == 40 and run["records"] == 2 * 40 * 2  # both sides, orders 1 and 2
    assert run["keys"] == {"query": 40, "item": 40}
    assert run["peak_rss_mb"] >= run["baseline_rss_mb"] > 0 and run["wall_s"] > 0
    # The child read what this process reads from the same files.
    data = berm_serving.read_neighbour_tables(run["tables"], 2, 3)
    assert run["fingerprint"] == data.fingerprint() and run["distinct_texts"] == len(data.texts)
    assert max(len(row[row > 0]) for row in data.neighbours["query_o1"]) == 4  # top_n + 1 at order 1
    assert "| 80 | 160 |" in capsys.readouterr().out  # the Markdown table

    written = {f: os.path.getmtime(os.path.join(run["tables"], f)) for f in os.listdir(run["tables"])}
    neighbour_tables_read.main(args)  # a second run reads the same files
    assert {f: os.path.getmtime(os.path.join(run["tables"], f)) for f in os.listdir(run["tables"])} == written
    assert json.loads(out.read_text())["runs"][0]["fingerprint"] == run["fingerprint"]
