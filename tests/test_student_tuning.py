"""benchmarks/student_tuning.py reads a split's joined examples for the gap analysis, and scores
them as if the items shown only with eval queries had never been logged."""
import math
import os

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


def _pair(query, title):
    feature = {key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
               for key, value in (("query", query), ("item_title", title))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_title_vectors(folder, titles, title_vectors):
    """A TitleEncoder output folder holding `titles`' vectors."""
    from trainer import sentence_vectors

    folder.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(folder / "vectors.gz"), "GZIP") as writer:
        for title, vector in zip(titles, title_vectors):
            writer.write(sentence_vectors.to_tf_example(title, "title", vector).SerializeToString())


def _exported_title_path_student(vectors, model_dir):
    """A tiny 0-order student with the title-vector path started on `vectors`, exported as
    BERM-O to `model_dir`; returns the in-memory scorer."""
    from trainer import bert_checkpoint, berm_layers, berm_serving, student

    vocab = berm_layers.read_vocab(bert_checkpoint.vocab_file())
    rng = np.random.default_rng(0)
    tf.keras.utils.set_random_seed(0)
    scorer = student.build_student(vocab, 0, pretrained_embeddings=rng.normal(
        size=(len(vocab), 8)).astype(np.float32), embedding_dim=4, hidden_dim=4,
        title_table=(vectors.titles, vectors.title_vectors))
    student.init_title_vector_path(scorer, vectors)
    berm_serving.export_serving_model(scorer, model_dir)
    return scorer


def test_unlogged_titles_score_through_the_fallback_and_logged_ones_as_before(tmp_path):
    """score_with_unlogged_titles re-exports the student with the train pairs' titles alone in its
    table: an eval pair whose title only eval queries were shown with changes score, the others
    keep theirs."""
    from trainer import sentence_vectors

    rng = np.random.default_rng(0)
    titles = ["steel claw hammer", "oak dining chair", "garden hose reel"]
    vectors = sentence_vectors.SentenceVectors(titles, rng.normal(size=(3, 5)).astype(np.float32),
                                               ["hammer"], rng.normal(size=(1, 5)).astype(np.float32))
    vectors_dir = tmp_path / "title_vectors"
    _write_title_vectors(vectors_dir, titles, vectors.title_vectors)
    model_dir = str(tmp_path / "model")
    _exported_title_path_student(vectors, model_dir)

    train = [_pair("hammer", titles[0]), _pair("chair", titles[1])]
    eval_pairs = [_pair("claw hammer", titles[0]), _pair("hose", titles[2])]
    scores, kept = student_tuning.score_with_unlogged_titles(
        model_dir, str(vectors_dir), train, eval_pairs, str(tmp_path / "cold"))
    assert kept == {"title_vectors_kept": 2, "title_vectors_dropped": 1}
    as_logged = student_tuning.score_examples(model_dir, eval_pairs)
    assert abs(scores[0] - as_logged[0]) < 1e-6  # its title was logged with a train query
    assert abs(scores[1] - as_logged[1]) > 1e-4  # "garden hose reel" now takes the fallback
    assert os.path.isfile(tmp_path / "cold" / "saved_model.pb")  # the re-exported BERM-O


def test_rescore_finds_the_model_an_earlier_run_left(tmp_path):
    """--rescore skips training and scores the model of an earlier run of the same name."""
    import json

    with pytest.raises(FileNotFoundError, match="run without --rescore first"):
        student_tuning.earlier_student(str(tmp_path), 1)
    (tmp_path / "student_k1").mkdir()
    (tmp_path / "student_k1" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "student_k1_run").mkdir()
    (tmp_path / "student_k1_run" / "history.json").write_text(json.dumps({"val_loss": [3.0, 2.0, 2.5]}))
    info = student_tuning.earlier_student(str(tmp_path), 1)
    assert info["model_dir"] == str(tmp_path / "student_k1")
    assert (info["epochs_run"], info["best_epoch"], info["train_seconds"]) == (3, 2, None)


def test_query_level_features_tell_word_counts_and_the_nearest_titles(tmp_path):
    from trainer import sentence_vectors

    titles = ["steel claw hammer", "oak dining chair", "garden hose reel"]
    _write_title_vectors(tmp_path, titles, sentence_vectors.SentenceEncoder().encode(titles))
    queries = ["steel claw hammer", "chair", "steel claw hammer"]
    features = student_tuning.query_level_features(queries, str(tmp_path))
    np.testing.assert_array_equal(features["word count"], [[3], [1], [3]])
    both = features["word count + nearest titles"]
    assert both.shape == (3, 4)
    np.testing.assert_array_equal(both[0], both[2])  # one row per pair, equal within a query
    assert both[0, 1] == pytest.approx(1.0, abs=1e-5)  # the query is a stored title
    assert both[1, 1] < 0.99 and both[1, 1] >= both[1, 2] >= both[1, 3]  # nearest first
    coverage = features["word count + catalogue coverage"]
    assert coverage.shape == (3, 7)
    np.testing.assert_array_equal(coverage[:, 0], [3, 1, 3])
    np.testing.assert_array_equal(coverage[:, 1], [0, 0, 0])  # every word is in some title


def test_catalogue_coverage_counts_the_titles_that_know_each_query_word():
    titles = ["steel claw hammer", "claw hammer set", "oak dining chair"]
    coverage = student_tuning.catalogue_coverage(["claw hammer", "vacume", "oak hammer", ""], titles)
    assert coverage.shape == (4, 6)
    # claw and hammer are in two titles each; "vacume" is in none and splits into pieces.
    np.testing.assert_allclose(coverage[0, :4], [0.0, np.log(3), np.log(3), np.log(3)])
    assert coverage[1, 0] == 1.0 and coverage[1, 3] == 0.0 and coverage[1, 4] > 1
    np.testing.assert_allclose(coverage[2, :4], [0.0, np.log(2), (np.log(2) + np.log(3)) / 2, np.log(3)])
    assert coverage[0, 4] == 1.0  # "claw", "hammer": one WordPiece each
    np.testing.assert_allclose(coverage[3], [1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # no words
    assert student_tuning.catalogue_coverage([], titles).shape == (0, 6)


def test_level_features_read_the_students_own_stand_in_for_the_query(tmp_path):
    """With the student's model, a third feature set: the nearest titles of the stand-in its title
    path computes for a query (its query map of the WordPiece mean), read from the export."""
    from trainer import sentence_vectors, student

    titles = ["steel claw hammer", "oak dining chair", "garden hose reel"]
    vectors = sentence_vectors.SentenceVectors(
        titles, sentence_vectors.SentenceEncoder().encode(titles), [], np.zeros([0, 384], np.float32))
    _write_title_vectors(tmp_path, titles, vectors.title_vectors)
    model_dir = str(tmp_path / "model")
    scorer = _exported_title_path_student(vectors, model_dir)

    queries = ["claw hammer", "chair", "claw hammer"]
    expected = (student.static_means(scorer, queries, student.QUERY_WORDPIECE)
                @ student.sentence_match_layer(scorer).query_map.numpy())
    np.testing.assert_allclose(student_tuning.student_query_stand_ins(model_dir, queries), expected,
                               rtol=1e-5, atol=1e-6)
    features = student_tuning.query_level_features(queries, str(tmp_path), model_dir)
    own = features["word count + the student's stand-in's nearest titles"]
    assert own.shape == (3, 4)
    np.testing.assert_array_equal(own[0], own[2])
    np.testing.assert_array_equal(own[:, 0], [2, 1, 2])
    assert own[1, 1] >= own[1, 2] >= own[1, 3]
    assert "word count + the student's stand-in's nearest titles" not in \
        student_tuning.query_level_features(queries, str(tmp_path))
