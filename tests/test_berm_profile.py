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
