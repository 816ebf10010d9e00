"""Hand-computed cases for benchmarks/relevance_metrics.py (NumPy only, no TensorFlow)."""
import itertools
import math

import numpy as np
import pytest

from benchmarks import relevance_metrics as rm


def _pairwise_auc(labels, scores):
    """Brute force: share of (relevant, non-relevant) pairs ordered right, ties one half."""
    pos = [s for l, s in zip(labels, scores) if l]
    neg = [s for l, s in zip(labels, scores) if not l]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# --- AUC ---------------------------------------------------------------------------------

def test_binary_labels_threshold_is_inclusive():
    assert rm.binary_labels([1.0, 2.0, 2.33, 2.34, 3.0]).tolist() == [0, 0, 1, 1, 1]
    assert rm.binary_labels([1.0, 2.0, 3.0], threshold=2.0).tolist() == [0, 1, 1]


def test_average_ranks_share_the_mean_rank():
    assert rm.average_ranks([0.5, 0.1, 0.5, 0.9]).tolist() == [2.5, 1.0, 2.5, 4.0]
    assert rm.average_ranks([3, 3, 3]).tolist() == [2.0, 2.0, 2.0]


def test_auc_hand_computed_with_a_tie():
    # labels 0 1 1 0 1; relevant scores .9 .5 .3 vs non-relevant .1 .5:
    # (.9,.1) 1, (.9,.5) 1, (.5,.1) 1, (.5,.5) 1/2, (.3,.1) 1, (.3,.5) 0 -> 4.5 / 6
    relevance = [1.0, 3.0, 2.33, 2.0, 3.0]
    scores = [0.1, 0.9, 0.5, 0.5, 0.3]
    assert rm.auc(scores, relevance) == pytest.approx(0.75)


def test_auc_extremes_and_degenerate_sets():
    relevance = [1, 1, 3, 3]
    assert rm.auc([0.1, 0.2, 0.3, 0.4], relevance) == 1.0
    assert rm.auc([0.4, 0.3, 0.2, 0.1], relevance) == 0.0
    assert rm.auc([0.5, 0.5, 0.5, 0.5], relevance) == 0.5
    assert math.isnan(rm.auc([0.1, 0.2], [3, 3]))
    assert math.isnan(rm.auc([0.1, 0.2], [1, 2]))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_pairwise_count_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 5, 60).astype(float)  # five distinct values: many ties
    assert rm.binary_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))


def test_auc_rejects_misaligned_and_nan():
    with pytest.raises(ValueError):
        rm.auc([0.1, 0.2], [1, 3, 3])
    with pytest.raises(ValueError):
        rm.auc([0.1, float("nan")], [1, 3])


# --- Per-query AUC -------------------------------------------------------------------------

def test_per_query_auc_averages_queries_with_both_classes():
    query_ids = ["a", "a", "a", "b", "b", "b", "c", "c", "d"]
    relevance = [3, 1, 2, 3, 3, 1, 3, 2.5, 1]
    scores = [0.9, 0.2, 0.5, 0.1, 0.5, 0.5, 0.3, 0.4, 0.7]
    # a: relevant .9 beats .2 and .5 -> 1. b: relevant .1 and .5 vs .5 -> (0 + 1/2) / 2.
    # c: only relevant pairs, d: only a non-relevant pair -> neither counts.
    result = rm.per_query_auc(query_ids, scores, relevance)
    assert result.value == pytest.approx((1.0 + 0.25) / 2)
    assert (result.num_queries, result.num_queries_total) == (2, 4)


def test_per_query_auc_ignores_score_scale_across_queries():
    # Perfect within each query although query b's scores are all below query a's.
    query_ids = [1, 1, 2, 2]
    relevance = [3, 1, 3, 1]
    scores = [0.9, 0.8, 0.2, 0.1]
    assert rm.per_query_auc(query_ids, scores, relevance).value == 1.0
    assert rm.auc(scores, relevance) == 0.75  # pooled: (.2, .8) is ordered wrong


def test_per_query_auc_without_any_counting_query_is_nan():
    result = rm.per_query_auc(["a", "b"], [0.1, 0.2], [3, 1])
    assert math.isnan(result.value) and result.num_queries == 0 and result.num_queries_total == 2


# --- NDCG -----------------------------------------------------------------------------------

def test_ndcg_hand_computed():
    # gains 2 1 0; ranked by score: gain 1, gain 0, gain 2 -> DCG = 1/1 + 0 + 2/log2(4) = 2.
    # Ideal: 2/1 + 1/log2(3) + 0.
    relevance = [3, 2, 1]
    scores = [0.1, 0.9, 0.5]
    ideal = 2 + 1 / math.log2(3)
    q = ["q"] * 3
    assert rm.ndcg_at_k(q, scores, relevance, k=10).value == pytest.approx(2 / ideal)
    assert rm.ndcg_at_k(q, scores, relevance, k=2).value == pytest.approx(1 / ideal)
    assert rm.ndcg_at_k(q, scores, relevance, k=1).value == pytest.approx(1 / 2)


def test_ndcg_gain_is_relevance_minus_minimum():
    # On 1..3 gains are 0..2, so relevance 1.5 and 2 have gains 0.5 and 1.
    relevance = [1.5, 2.0]
    ideal = 1 + 0.5 / math.log2(3)
    worst = 0.5 + 1 / math.log2(3)
    assert rm.ndcg_at_k(["q", "q"], [0.0, 1.0], relevance).value == pytest.approx(1.0)
    assert rm.ndcg_at_k(["q", "q"], [1.0, 0.0], relevance).value == pytest.approx(worst / ideal)
    # With another minimum the gains (and so the ratio) change.
    shifted = rm.ndcg_at_k(["q", "q"], [1.0, 0.0], relevance, relevance_min=0.0).value
    assert shifted == pytest.approx((1.5 + 2 / math.log2(3)) / (2 + 1.5 / math.log2(3)))


def test_ndcg_ties_get_the_expected_dcg_over_orders():
    # Scores .5 .5 .1, gains 2 0 1: orders [2,0,1] -> 2.5 and [0,2,1] -> 2/log2(3) + 0.5.
    relevance = [3, 1, 2]
    scores = [0.5, 0.5, 0.1]
    expected_dcg = (2.5 + 2 / math.log2(3) + 0.5) / 2
    ideal = 2 + 1 / math.log2(3)
    q = ["q"] * 3
    assert rm.ndcg_at_k(q, scores, relevance).value == pytest.approx(expected_dcg / ideal)
    # A tie straddling the cut-off: top-1 is gain 2 or 0 with equal chance.
    assert rm.ndcg_at_k(q, scores, relevance, k=1).value == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(4))
def test_tie_averaged_dcg_matches_mean_over_permutations(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, 6).astype(float)
    gains = rng.integers(0, 3, 6).astype(float)
    k = 4
    discounts = 1 / np.log2(np.arange(2, 8))
    totals = []
    for perm in itertools.permutations(range(6)):
        # A full order consistent with the scores: descending score, ties in `perm` order.
        order = sorted(perm, key=lambda i: -scores[i])
        totals.append(sum(gains[i] * discounts[r] for r, i in enumerate(order[:k])))
    assert rm.dcg_at_k(scores, gains, k) == pytest.approx(np.mean(totals))


def test_ndcg_skips_queries_with_zero_ideal_dcg_and_averages_the_rest():
    query_ids = ["a", "a", "b", "b", "c"]
    relevance = [3, 1, 1, 1, 2]
    scores = [0.1, 0.9, 0.3, 0.4, 0.5]
    # a: gain 2 ranked second -> 2/log2(3) / 2; b: all gains 0 -> skipped; c: one pair -> 1.
    result = rm.ndcg_at_k(query_ids, scores, relevance)
    assert result.value == pytest.approx((1 / math.log2(3) + 1.0) / 2)
    assert (result.num_queries, result.num_queries_total) == (2, 3)


def test_ndcg_rejects_relevance_below_minimum():
    with pytest.raises(ValueError):
        rm.ndcg_at_k(["q"], [0.1], [0.5])


def test_evaluate_collects_everything():
    result = rm.evaluate(["a", "a", "b", "b"], [0.9, 0.1, 0.2, 0.8], [3, 1, 3, 1])
    assert result["auc"] == pytest.approx(0.75)  # pooled: only (.2, .8) is ordered wrong
    assert result["per_query_auc"] == pytest.approx(0.5)
    assert result["per_query_auc_queries"] == 2
    assert result["ndcg@10_queries"] == 2
    # b: gain 2 at rank 2 -> (2 / log2(3)) / 2.
    assert result["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(3)) / 2)
    assert (result["pairs"], result["relevant_pairs"], result["queries"]) == (4, 2, 2)


# --- IDF overlap baseline -------------------------------------------------------------------

def test_tokenize_lowercases_and_splits_on_punctuation():
    assert rm.tokenize("1/2-in. PVC Tee_fitting") == ["1", "2", "in", "pvc", "tee", "fitting"]
    assert rm.tokenize("  ") == []


def test_idf_overlap_scorer_toy_example():
    scorer = rm.IdfOverlapScorer().fit(["red drill", "blue drill", "red hammer", "saw"])
    assert scorer.num_documents == 4
    # df: red 2, drill 2, blue 1, hammer 1, saw 1; N = 4.
    assert scorer.idf("red") == pytest.approx(math.log(5 / 3) + 1)
    assert scorer.idf("blue") == pytest.approx(math.log(5 / 2) + 1)
    assert scorer.idf("widget") == pytest.approx(math.log(5) + 1)  # unseen: the largest weight
    scores = scorer.score(["red drill", "red drill", "Blue widget", "saw saw", "!!", "drill"],
                          ["Red Drill kit", "red hammer", "blue drill", "saw", "saw", "saw"])
    idf_blue, idf_widget = math.log(5 / 2) + 1, math.log(5) + 1
    assert scores.tolist() == pytest.approx(
        [1.0, 0.5, idf_blue / (idf_blue + idf_widget), 1.0, 0.0, 0.0])


def test_idf_overlap_ranks_the_covering_title_first():
    scorer = rm.IdfOverlapScorer().fit(["cordless drill", "drill bit", "cordless saw", "hammer"])
    titles = ["cordless drill 18v", "drill bit set", "hammer"]
    scores = scorer.score(["cordless drill"] * 3, titles)
    assert scores[0] > scores[1] > scores[2] == 0.0
    assert rm.ndcg_at_k(["q"] * 3, scores, [3.0, 2.0, 1.0]).value == pytest.approx(1.0)


def test_idf_overlap_rejects_misaligned_inputs():
    with pytest.raises(ValueError):
        rm.IdfOverlapScorer().fit(["a"]).score(["a", "b"], ["a"])


def test_binary_labels_count_a_float32_judgment_at_the_threshold():
    # As in the pipeline's eval features: 2.33 read back from tf.Example is still relevant.
    stored = np.array([np.float32(2.33), np.float32(2.0), 2.33, 3.0], dtype=np.float64)
    assert stored[0] < 2.33
    np.testing.assert_array_equal(rm.binary_labels(stored, 2.33), [1, 0, 1, 1])
