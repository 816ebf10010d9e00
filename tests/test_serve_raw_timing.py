"""benchmarks/serve_raw_timing.py: models called in turn on a split's pairs, full calls only."""
import json

import pytest
import tensorflow as tf

from benchmarks import serve_raw_timing

PAIRS = [("cordless drill", "P1", "DEWALT 20V cordless drill kit"), ("garden hose", "P2", "50 ft hose"),
         ("red paint", "P3", "Behr red paint 1 gal"), ("lamp", "P4", "Brass table lamp"),
         ("saw", "P5", "Ryobi circular saw")]


def _write_split(root, split="eval"):
    folder = root / "student_examples" / f"Split-{split}"
    folder.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(folder / "data.gz"), options="GZIP") as writer:
        for values in PAIRS:
            feature = {key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
                       for key, v in zip(("query", "item_id", "item_title"), values)}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                         .SerializeToString())


def test_models_are_timed_in_turn_on_full_calls(tiny_berm_o, tmp_path):
    _write_split(tmp_path)
    out = tmp_path / "timing.json"
    result = serve_raw_timing.main(["--work-dir", str(tmp_path), "--model", f"a={tiny_berm_o}",
                                    "--model", f"b={tiny_berm_o}", "--batch-size", "2",
                                    "--passes", "2", "--out", str(out)])
    # 5 pairs: two full calls of 2 per pass, two timed passes.
    assert result["calls_per_model"] == 4 and set(result["models"]) == {"a", "b"}
    assert all(m["median_ms"] > 0 and m["p90_ms"] >= m["median_ms"] for m in result["models"].values())
    assert json.loads(out.read_text())["models"]["a"]["model_dir"] == tiny_berm_o


def test_it_says_what_is_wrong_with_its_arguments(tiny_berm_o, tmp_path):
    _write_split(tmp_path)
    with pytest.raises(SystemExit):  # one model only
        serve_raw_timing.parse_args(["--work-dir", str(tmp_path), "--model", f"a={tiny_berm_o}"])
    with pytest.raises(SystemExit):  # not a SavedModel
        serve_raw_timing.parse_args(["--work-dir", str(tmp_path), "--model", f"a={tiny_berm_o}",
                                     "--model", f"b={tmp_path}"])
    with pytest.raises(SystemExit, match="fewer than --batch-size 6"):
        serve_raw_timing.main(["--work-dir", str(tmp_path), "--model", f"a={tiny_berm_o}",
                               "--model", f"b={tiny_berm_o}", "--batch-size", "6"])
