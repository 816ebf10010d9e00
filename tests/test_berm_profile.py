"""benchmarks/berm_profile.py on a tiny BERM-O: calls timed alone, and traced op time shared out."""
import pytest

from benchmarks import berm_profile

PAIRS = (["cordless drill", "garden hose", "red paint", "cordless drill", "lamp"],
         ["P1", "P2", "P3", "P4", "P5"],
         ["DEWALT 20V cordless drill kit", "50 ft garden hose", "Behr red exterior paint 1 gal",
          "Ryobi drill bits", "Brass table lamp"])


@pytest.mark.parametrize("node_name, part", [
    ("StatefulPartitionedCall/StatefulPartitionedCall/berm_vector_scorer/kernel_pooling/MatMul_2",
     "berm_vector_scorer/kernel_pooling"),
    ("StatefulPartitionedCall/title_wordpiece/FastWordpieceTokenizeWithOffsets/X", "title_wordpiece"),
    ("StatefulPartitionedCall/StatefulPartitionedCall/Gather_11", "serve_raw/Gather"),
    ("StatefulPartitionedCall", "serve_raw"),
])
def test_an_op_is_credited_to_the_part_its_name_scope_names(node_name, part):
    assert berm_profile.part_of(node_name) == part


def test_calls_are_timed_in_full_batches_only(tiny_berm_o):
    rounds = berm_profile.time_alone(tiny_berm_o, PAIRS, batch_size=2, rounds=2)
    assert [r["calls"] for r in rounds] == [2, 2]  # 5 pairs: two full batches of 2
    assert all(0 < r["median_ms"] and 0 < r["mean_ms"] for r in rounds)
    with pytest.raises(ValueError, match="fewer than --batch-size"):
        berm_profile.time_alone(tiny_berm_o, PAIRS, batch_size=6, rounds=1)


def test_the_trace_shares_every_op_out_over_the_models_parts(tiny_berm_o):
    trace = berm_profile.trace_parts(tiny_berm_o, PAIRS, batch_size=2, calls=3, warm_up=1)
    shares = {p["part"]: p["share"] for p in trace["parts"]}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert [p["share"] for p in trace["parts"]] == sorted(shares.values(), reverse=True)
    # The 0-order path's interaction and both tokenisers ran in every call.
    assert {"berm_vector_scorer/kernel_pooling", "query_wordpiece", "title_wordpiece"} <= set(shares)
    assert trace["calls"] == 3 and trace["ops_per_call"] > 50


def test_cold_calls_are_timed_after_each_pause_and_after_a_teacher_call(tiny_berm_o, tmp_path,
                                                                         monkeypatch):
    import tensorflow as tf

    teacher_calls = []

    class Teacher:  # stands in for a teacher SavedModel: serve_raw takes query and title only
        signatures = {"serve_raw": lambda query, item_title: teacher_calls.append(
            (query.shape[0], item_title.shape[0])) or {"score": tf.zeros_like(query, tf.float32)}}

    load = tf.saved_model.load
    monkeypatch.setattr(tf.saved_model, "load",
                        lambda d: Teacher() if d == str(tmp_path) else load(d))
    cold = berm_profile.time_cold(tiny_berm_o, PAIRS, batch_size=2, pauses=[0.0, 0.01],
                                  teacher_dir=str(tmp_path))
    assert [(r["before"], r.get("pause_seconds")) for r in cold] == [
        ("pause", 0.0), ("pause", 0.01), ("teacher", None)]
    assert all(r["calls"] == 2 and r["median_ms"] > 0 for r in cold)
    # Before each of the two timed calls (not the warm-up), on the batch BERM-O then scores.
    assert teacher_calls == [(2, 2)] * 2


def test_the_command_line_refuses_what_it_cannot_run(tiny_berm_o, tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("x")
    args = berm_profile.parse_args(["--model", tiny_berm_o, "--input", str(csv)])
    assert args.pauses == [0.05, 0.45] and args.teacher_model is None
    assert berm_profile.parse_args(["--model", tiny_berm_o, "--input", str(csv), "--pauses"]).pauses == []
    for bad in (["--pauses", "-1"], ["--teacher-model", str(tmp_path / "missing")]):
        with pytest.raises(SystemExit):
            berm_profile.parse_args(["--model", tiny_berm_o, "--input", str(csv)] + bad)
