"""benchmarks/student_tuning.py reads a split's joined examples for the gap analysis."""
import math

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import student_tuning


def _example(query, teacher_score, relevance=None):
    feature = {"query": tf.train.Feature(bytes_list=tf.train.BytesList(value=[query.encode()])),
               "teacher_score": tf.train.Feature(float_list=tf.train.FloatList(value=[teacher_score]))}
    if relevance is not None:
        feature["relevance"] = tf.train.Feature(float_list=tf.train.FloatList(value=[relevance]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_split_pairs_reads_queries_teacher_scores_and_judgments(tmp_path):
    split = tmp_path / "Split-train"
    split.mkdir()
    examples = [_example("drill", 0.75, 3.0), _example("drill", 0.25), _example("saw", 0.5, 1.0)]
    with tf.io.TFRecordWriter(str(split / "data.gz"), options="GZIP") as writer:
        for e in examples:
            writer.write(e)
    pairs = student_tuning.split_pairs(str(tmp_path), "train")
    assert pairs["serialized"] == examples
    assert pairs["queries"] == ["drill", "drill", "saw"]
    np.testing.assert_allclose(pairs["teacher"], [0.75, 0.25, 0.5])
    assert pairs["relevance"][0] == 3.0 and math.isnan(pairs["relevance"][1])  # unjudged pair


def test_split_pairs_says_which_split_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no eval examples"):
        student_tuning.split_pairs(str(tmp_path), "eval")


def test_each_seed_and_setting_keeps_its_own_model_folder():
    names = {student_tuning.default_name(1, 42, True, {}), student_tuning.default_name(1, 7, True, {}),
             student_tuning.default_name(1, 7, False, {}),
             student_tuning.default_name(1, 7, True, {"term_gating": False})}
    assert len(names) == 4
    assert student_tuning.default_name(0, 3, False, {"b": 2, "a": 1}) == "k0_seed3_no_title_vectors_a=1_b=2"
