"""The label and slice features GraphContexts gives judged pairs for evaluation."""
import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from components.graph import eval_features as ef


def test_query_segments_split_traffic_busiest_first():
    # 200 impressions: one query of 100 (50%), five of 10 (25%), fifty of 1 (25%).
    counts = {100: 1, 10: 5, 1: 50}
    assert ef.segment_thresholds(counts, 0.5, 0.25) == (100, 10)
    assert [ef.query_segment(v, (100, 10)) for v in (100, 10, 1, None)] == ["head", "torso", "tail", "unlogged"]
    # Queries tied at the boundary volume all go to the busier segment.
    assert ef.segment_thresholds(counts, 0.4, 0.2) == (100, 10)
    # No torso share: the torso is empty.
    head_min, torso_min = ef.segment_thresholds(counts, 0.5, 0.0)
    assert head_min == torso_min == 100
    assert ef.segment_thresholds({}, 0.5, 0.3) == (float("inf"), float("inf"))


@pytest.mark.parametrize("degree,bucket", [(0, "0"), (1, "1"), (2, "2-4"), (4, "2-4"), (5, "5+"), (900, "5+")])
def test_item_degree_buckets(degree, bucket):
    assert ef.degree_bucket(degree, (1, 2, 5)) == bucket


def test_config_rejects_impossible_shares_and_edges():
    with pytest.raises(ValueError, match="shares"):
        ef.EvalFeatureConfig(head_share=0.8, torso_share=0.3)
    with pytest.raises(ValueError, match="increasing"):
        ef.EvalFeatureConfig(item_degree_edges=(2, 1))


def test_attach_eval_features_to_judged_pairs():
    logs = [
        {"query": "drill", "item_id": "A", "item_title": "drill a", "impressions": 100, "clicks": 5},
        {"query": "drill", "item_id": "B", "item_title": "drill b", "impressions": 60, "clicks": 1},
        {"query": "saw", "item_id": "A", "item_title": "drill a", "impressions": 30, "clicks": 0},
        {"query": "hammer", "item_id": "C", "item_title": "hammer", "impressions": 10, "clicks": 0},
    ]
    judged = [
        {"query": "drill", "item_id": "A", "relevance": 3.0, "q_o1_ids": ["A", "B"], "i_o1_ids": []},
        {"query": "hammer", "item_id": "C", "relevance": 2.0, "q_o1_ids": [], "i_o1_ids": []},
        {"query": "never logged", "item_id": "Z", "relevance": 1.0, "q_o1_ids": [], "i_o1_ids": []},
    ]
    config = ef.EvalFeatureConfig(relevant_threshold=2.33, relevance_min=1.0, head_share=0.5,
                                  torso_share=0.4, item_degree_edges=(1, 2, 5))

    def strip(example):
        return (example["query"], example["relevant"], example["gain"], example["query_segment"],
                example["item_degree"], example["graph_context"])

    with beam.Pipeline() as pipeline:
        out = (pipeline | "Judged" >> beam.Create(judged)
               | ef.AttachEvalFeatures(pipeline | "Logs" >> beam.Create(logs), config, max_order=1)
               | beam.Map(strip))
        # 200 impressions: drill 160 (80%) is head; saw (15%) reaches 95% >= 90%: torso; hammer tail.
        assert_that(out, equal_to([
            ("drill", 1.0, 2.0, "head", "2-4", "warm"),
            ("hammer", 0.0, 1.0, "tail", "1", "cold"),
            ("never logged", 0.0, 0.0, "unlogged", "0", "cold"),
        ]))


def test_a_judgment_read_back_from_float32_still_meets_its_threshold():
    # A judged 2.33 comes out of tf.Example as 2.3299999237; it is relevant at threshold 2.33.
    stored = float(np.float32(2.33))
    assert stored < 2.33
    assert ef.is_relevant(stored, 2.33)
    assert ef.is_relevant(2.67, 2.33)
    assert not ef.is_relevant(float(np.float32(2.0)), 2.33)
    assert not ef.is_relevant(float(np.float32(2.3299)), 2.33)
