"""Constructed cases for benchmarks/gap_analysis.py (NumPy only, no TensorFlow)."""
import numpy as np
import pytest

from benchmarks import gap_analysis as ga
from benchmarks import relevance_metrics as rm


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


# Three queries of three pairs: query "a" has relevant results, "c" none, "b" in between; inside
# each query the first pair is the most relevant. No two logits tie, so a round trip through the
# sigmoid cannot flip a comparison.
QUERIES = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
RELEVANCE = [3.0, 2.5, 2.0, 3.0, 2.0, 1.0, 2.0, 1.0, 1.0]
LEVELS = np.repeat([2.5, 0.0, -2.5], 3)
ORDER = np.tile([1.0, 0.0, -1.0], 3)


def test_logits_invert_the_sigmoid_and_stay_finite_at_0_and_1():
    np.testing.assert_allclose(ga.logits(_sigmoid([-3.0, 0.0, 2.5])), [-3.0, 0.0, 2.5], atol=1e-9)
    assert np.isfinite(ga.logits([0.0, 1.0])).all()


def test_query_means_and_between_query_share():
    np.testing.assert_allclose(ga.query_means(QUERIES, LEVELS + ORDER), LEVELS)
    assert ga.between_query_share(QUERIES, LEVELS) == pytest.approx(1.0)
    assert ga.between_query_share(QUERIES, ORDER) == pytest.approx(0.0)
    # Sums of squares: between 3 * (6.25 + 0 + 6.25) = 37.5, within 3 * 2 = 6.
    assert ga.between_query_share(QUERIES, LEVELS + ORDER) == pytest.approx(37.5 / 43.5)
    assert np.isnan(ga.between_query_share(QUERIES, np.ones(9)))


def test_a_student_that_is_the_teacher_has_no_gap():
    teacher = _sigmoid(LEVELS + ORDER)
    gap = ga.analyse(QUERIES, teacher, teacher, RELEVANCE)
    assert gap["correlation"] == pytest.approx(1.0)
    assert np.isnan(gap["error_between_query_share"])  # no error to split
    assert gap["student_query_level_auc"] == gap["teacher_query_level_auc"]
    assert gap["student_order_teacher_levels_auc"] == pytest.approx(rm.auc(teacher, RELEVANCE))


def test_a_student_that_misjudges_whole_queries_is_found_out_between_queries():
    teacher = _sigmoid(LEVELS + ORDER)
    student = _sigmoid(LEVELS[::-1] + ORDER)  # query levels reversed, order within queries right
    gap = ga.analyse(QUERIES, student, teacher, RELEVANCE)
    assert gap["error_between_query_share"] == pytest.approx(1.0)
    assert gap["teacher_query_level_auc"] > gap["student_query_level_auc"]
    # With the teacher's levels the student's own order gives the teacher's AUC back.
    assert gap["student_order_teacher_levels_auc"] == pytest.approx(rm.auc(teacher, RELEVANCE))
    assert gap["teacher_order_student_levels_auc"] < rm.auc(teacher, RELEVANCE)
    assert gap["correlation"] == pytest.approx(-31.5 / 43.5)  # covariance 6 - 37.5
    assert gap["between_query_share_teacher"] == pytest.approx(37.5 / 43.5)


def test_a_student_that_misorders_within_queries_is_found_out_within_them():
    teacher = _sigmoid(LEVELS + ORDER)
    student = _sigmoid(LEVELS - ORDER)  # levels right, every query's order reversed
    gap = ga.analyse(QUERIES, student, teacher, RELEVANCE)
    assert gap["error_between_query_share"] == pytest.approx(0.0, abs=1e-12)
    assert gap["student_query_level_auc"] == pytest.approx(gap["teacher_query_level_auc"])
    assert gap["teacher_order_student_levels_auc"] == pytest.approx(rm.auc(teacher, RELEVANCE))
    # Of the 18 (relevant, non-relevant) pairs the teacher orders 17 right, this mix 13.
    assert rm.auc(teacher, RELEVANCE) == pytest.approx(17 / 18)
    assert gap["student_order_teacher_levels_auc"] == pytest.approx(13 / 18)


def test_misaligned_inputs_are_refused():
    with pytest.raises(ValueError, match="one entry per pair"):
        ga.analyse(QUERIES, np.full(8, 0.5), np.full(9, 0.5), RELEVANCE)


def _levels_missed_by_the_student(feature_tells: bool):
    """120 queries of 4 pairs. The teacher's logits are the truth; the student has its order but
    misses each query's level, which is 2 x a query feature (or unrelated to it)."""
    rng = np.random.default_rng(0)
    queries = np.repeat(np.arange(120), 4)
    level = rng.normal(size=120)
    order = rng.normal(size=480)
    teacher_logits = level[queries] * 2 + order
    relevance = np.where(teacher_logits + rng.normal(scale=0.5, size=480) > 0, 3.0, 1.0)
    feature = level if feature_tells else rng.normal(size=120)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    return queries, sigmoid(order), sigmoid(teacher_logits), feature[queries][:, None], relevance


def test_a_level_the_query_features_tell_is_recovered_on_held_out_queries():
    queries, student, teacher, features, relevance = _levels_missed_by_the_student(True)
    result = ga.level_correction(queries, student, teacher, features, relevance)
    assert result["correlation"] > 0.95 and result["queries"] == 120
    assert result["auc"] > result["student_auc"] + 0.1
    assert result["auc"] == pytest.approx(rm.auc(teacher, relevance), abs=0.01)


def test_features_unrelated_to_the_level_do_not_lift_the_student():
    queries, student, teacher, features, relevance = _levels_missed_by_the_student(False)
    result = ga.level_correction(queries, student, teacher, features, relevance)
    # A chance correlation over 120 queries lifts it a little; the telling feature lifted it 0.33.
    assert abs(result["correlation"]) < 0.3
    assert result["auc"] < result["student_auc"] + 0.05
    with pytest.raises(ValueError, match="at least 5 queries"):
        ga.level_correction(queries[:12], student[:12], teacher[:12], features[:12],
                                      relevance[:12])
