"""benchmarks/berm_tables_scale.py: BERM-O exported and served in children, size by size."""
import json
import os

from benchmarks import berm_tables_scale
from trainer import berm_serving


def test_sizes_export_load_and_serve_and_the_graph_does_not_grow(tmp_path, capsys):
    out, kept = tmp_path / "scale.json", tmp_path / "kept"
    tables = ["--top-n", "3", "--calls", "5", "--tables-dir", str(tmp_path / "tables")]
    berm_tables_scale.main(["--nodes", "30", "300", *tables, "--work-dir", str(kept), "--keep",
                            "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["benchmark"] == "berm_tables_scale" and record["git_commit"]
    assert "child_model" not in record["settings"] and record["settings"]["calls"] == 5
    small, large = record["runs"]
    assert small["nodes"] == {"query": 30, "item": 30} and large["nodes"] == {"query": 300, "item": 300}
    # The model holds the tables it was given: the ones the reader reads from the same files.
    assert large["fingerprint"] == berm_serving.read_neighbour_tables(large["tables"], 2, 3).fingerprint()
    for run in (small, large):
        assert run["export_s"] > 0 and run["load_s"] > 0 and 0 < run["p50_ms"] <= run["p99_ms"]
        assert run["loaded_rss_mb"] >= run["load_baseline_rss_mb"] > 0
        assert "baseline_p50_ms" not in run
    # Ten times the nodes: more variables, the same graph (the tables are weights, not constants).
    assert large["variables_bytes"] > small["variables_bytes"]
    assert abs(large["graph_bytes"] - small["graph_bytes"]) < 1000
    assert "| 600 |" in capsys.readouterr().out  # the Markdown table
    assert sorted(os.listdir(kept)) == ["berm_n30", "berm_n300"]

    # The kept models as the baseline of a second run: served call by call beside its own.
    work_dir = tmp_path / "models"
    berm_tables_scale.main(["--nodes", "30", *tables, "--work-dir", str(work_dir),
                            "--baseline-models", str(kept), "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    assert 0 < run["baseline_p50_ms"] <= run["baseline_p99_ms"] and run["p50_ms"] > 0
    assert run["max_score_difference"] == 0.0  # the same commit: the same weights and tables
    assert "(baseline " in capsys.readouterr().out
    assert os.listdir(work_dir) == []  # without --keep the models are removed once measured
