"""The Home Depot benchmark's speed race: the orders it calls the models in, what it times, and
the session each model runs in; and the cold-start BERM-O's title table."""
import numpy as np
import pytest

from benchmarks import student_homedepot as sh
from benchmarks.serving_session import SessionSignature

QUERIES = ["cordless drill", "garden hose", "red paint", "cordless drill", "lamp"]
ITEM_IDS = ["P1", "P2", "P3", "P4", "P5"]
TITLES = ["DEWALT 20V cordless drill kit", "50 ft garden hose", "Behr red exterior paint 1 gal",
          "Ryobi drill bits", "Brass table lamp"]


def _recording_models():
    calls = []

    def model(name):
        def call(queries, item_ids, titles):
            assert isinstance(queries, np.ndarray) and len(queries) == len(item_ids) == len(titles)
            calls.append((name, queries[0]))
            return np.zeros(len(queries), np.float32)
        return call

    return calls, model("teacher"), model("berm_o")


@pytest.mark.parametrize("streams, order", [
    (False, ["teacher", "berm_o"] * 4),                    # call by call
    (True, (["teacher"] * 2 + ["berm_o"] * 2) * 2)])       # a whole pass each, in turn
def test_the_models_alternate_call_by_call_or_take_the_pass_in_turns(streams, order):
    calls, teacher, berm = _recording_models()
    result = sh.race(teacher, berm, QUERIES, ITEM_IDS, TITLES, batch_size=2, passes=2,
                     streams=streams)
    # One untimed warm-up call each, then 2 passes over the 2 full batches (the 5th pair is left out).
    assert [name for name, _ in calls] == ["teacher", "berm_o"] + order
    assert [first for name, first in calls[2:] if name == "berm_o"] == [
        "cordless drill", "red paint"] * 2
    for name in ("teacher", "berm_o"):
        assert result[name]["batches"] == 4 and result[name]["pairs"] == 8
        assert result[name]["pairs_per_second"] > 0
    assert result["order"] == ("streams" if streams else "alternating")
    assert result["speedup"] == pytest.approx(
        result["berm_o"]["pairs_per_second"] / result["teacher"]["pairs_per_second"])
    with pytest.raises(ValueError, match="fewer than 6 test pairs"):
        sh.race(teacher, berm, QUERIES, ITEM_IDS, TITLES, batch_size=6, passes=1)


def test_a_session_signature_scores_as_the_saved_model_does(tiny_berm_o):
    import tensorflow as tf

    from trainer import student

    raw = SessionSignature(tiny_berm_o, student.RAW_SIGNATURE, student.SCORE_KEY, intra_op_threads=1)
    assert list(raw.input_names) == sorted([student.QUERY_KEY, student.ITEM_ID_KEY, student.TITLE_KEY])
    scores = raw(**{student.QUERY_KEY: np.array(QUERIES, object),
                    student.ITEM_ID_KEY: np.array(ITEM_IDS, object),
                    student.TITLE_KEY: np.array(TITLES, object)})
    eager = tf.saved_model.load(tiny_berm_o).signatures[student.RAW_SIGNATURE](
        query=tf.constant(QUERIES), item_id=tf.constant(ITEM_IDS), item_title=tf.constant(TITLES))
    np.testing.assert_allclose(scores, eager[student.SCORE_KEY].numpy(), rtol=1e-6, atol=1e-6)
    raw.close()
    with pytest.raises(ValueError, match="has no signature 'nope'"):
        SessionSignature(tiny_berm_o, "nope", student.SCORE_KEY)


def test_loading_a_session_signature_prints_no_deprecation_notice(tmp_path):
    # In its own process: TensorFlow prints a deprecation notice once per process, so an earlier
    # load in this one would hide it.
    import os
    import subprocess
    import sys

    script = (
        "import tensorflow as tf\n"
        "from benchmarks.serving_session import SessionSignature\n"
        "class M(tf.Module):\n"
        "    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])\n"
        "    def f(self, x): return {'y': 2 * x}\n"
        "m = M()\n"
        f"tf.saved_model.save(m, {str(tmp_path)!r}, signatures={{'serving_default': m.f}})\n"
        f"s = SessionSignature({str(tmp_path)!r}, 'serving_default', 'y')\n"
        "print('scores', list(s(x=[1.0, 2.0])), 'filters', len(tf.get_logger().filters))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root}, check=True)
    assert "scores [2.0, 4.0] filters 0" in done.stdout    # and the logger is left as it was
    assert "deprecated" not in done.stderr + done.stdout


def test_the_race_threads_are_flags_with_the_servers_defaults(tmp_path):
    data = tmp_path / "train_dev.csv"
    data.write_text("id,product_uid,product_title,search_term,relevance\n", encoding="latin-1")
    from pipeline import cli

    args = sh.parse_args(["--input", str(data)])
    serve = cli.build_parser().parse_args(["serve", "--model-base", "."])
    # BERM-O races as `relkd serve` serves it; the teacher on every core, as TF Serving would.
    assert args.berm_intra_op_threads == serve.intra_op_threads == 1
    assert args.teacher_intra_op_threads == 0
    with pytest.raises(SystemExit):
        sh.parse_args(["--input", str(data), "--berm-intra-op-threads", "-1"])


def test_cold_start_keeps_only_the_titles_the_remaining_logs_hold(tmp_path, monkeypatch):
    import tensorflow as tf

    from trainer import berm_layers, sentence_vectors, student

    vectors = np.eye(3, dtype=np.float32)
    with tf.io.TFRecordWriter(str(tmp_path / "vectors.gz"), "GZIP") as writer:
        for title, vector in zip(TITLES[:3], vectors):
            writer.write(sentence_vectors.to_tf_example(title, sentence_vectors.TITLE, vector)
                         .SerializeToString())
    table = berm_layers.TitleVectorTable(3, 3)
    table.set_table(TITLES[:3], vectors)
    monkeypatch.setattr(student, "title_vector_table", lambda scorer: table)
    refits = []
    monkeypatch.setattr(student, "fit_title_fallback",
                        lambda scorer, titles, vectors: refits.append((titles, vectors)))
    # TITLES[1] was logged only with a test query; TITLES[4] is logged but has no vector.
    assert sh.forget_unlogged_titles("scorer", str(tmp_path), [TITLES[0], TITLES[2], TITLES[4]]) == {
        "title_vectors_kept": 2, "title_vectors_dropped": 1}
    # The fallback is fitted again on the kept titles alone (in text order, as they are read).
    kept = sorted([0, 2], key=TITLES.__getitem__)
    assert refits[0][0] == [TITLES[i] for i in kept]
    np.testing.assert_array_equal(refits[0][1], vectors[kept])
    got, known = table(tf.constant(TITLES[:3]))
    np.testing.assert_array_equal(known.numpy(), [True, False, True])
    np.testing.assert_array_equal(got.numpy(), [vectors[0], [0, 0, 0], vectors[2]])
    monkeypatch.setattr(student, "title_vector_table", lambda scorer: None)
    assert sh.forget_unlogged_titles("scorer", None, []) == {
        "title_vectors_kept": 0, "title_vectors_dropped": 0}
