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
    assert [m["max_score_difference"] for m in result["models"].values()] == [0.0, 0.0]


def test_it_reports_how_far_each_model_scores_from_the_first(tiny_berm_o, tmp_path):
    from trainer import berm_serving, student

    _write_split(tmp_path)
    scorer = berm_serving.load_scorer(tiny_berm_o)
    bias = scorer.get_layer(student.TOKEN_SCORER).get_layer(student.VECTOR_SCORER).get_layer(
        "order0_logit").bias
    bias.assign(bias + 1.0)  # every score of the 0-order path moves, none by more than 0.25
    berm_serving.export_serving_model(scorer, str(tmp_path / "shifted"))
    loaded = tf.saved_model.load(tiny_berm_o).signatures[student.RAW_SIGNATURE]
    shifted = tf.saved_model.load(str(tmp_path / "shifted")).signatures[student.RAW_SIGNATURE]
    inputs = {key: tf.constant([p[i] for p in PAIRS])
              for i, key in enumerate(("query", "item_id", "item_title"))}
    expected = float(abs(shifted(**inputs)["score"].numpy() - loaded(**inputs)["score"].numpy()).max())
    result = serve_raw_timing.main(["--work-dir", str(tmp_path), "--model", f"a={tiny_berm_o}",
                                    "--model", f"b={tmp_path / 'shifted'}", "--batch-size", "5"])
    assert result["models"]["a"]["max_score_difference"] == 0.0
    assert 0.0 < expected <= 0.25
    assert result["models"]["b"]["max_score_difference"] == pytest.approx(expected, abs=1e-7)


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
