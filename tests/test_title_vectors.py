"""The title-vector path: the pretrained sentence encoder, the TitleEncoder's Beam pipeline, the
title table and the match layer (trainer/sentence_vectors.py, components/title_encoder.py,
berm_layers.TitleVectorTable / SentenceMatch). The student that uses them: tests/test_student.py."""
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions
from tfx.types import artifact_utils, standard_artifacts

from components import title_encoder
from conftest import write_title_split
from components.runtime_trainer import merged_exec_properties
from trainer import berm_layers, sentence_vectors


@pytest.fixture(scope="module")
def encoder():
    return sentence_vectors.SentenceEncoder(batch_size=2)


def test_sentence_encoder_gives_unit_vectors_that_place_alike_titles_closer(encoder):
    texts = ["cordless drill", "dewalt 20v max cordless drill driver", "50 ft garden hose", ""]
    vectors = encoder.encode(texts)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosine = vectors @ vectors.T
    assert cosine[0, 1] > cosine[0, 2] + 0.2
    # Batching does not change a text's vector.
    np.testing.assert_allclose(encoder.encode(texts[1:2]), vectors[1:2], atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_title_encoder_encodes_every_distinct_title_and_the_train_queries(tmp_path, encoder):
    examples = standard_artifacts.Examples()
    examples.uri = str(tmp_path / "examples")
    examples.split_names = artifact_utils.encode_split_names(["train", "eval"])
    write_title_split(examples.uri, "train", [("drill", "cordless drill"), ("drill", "hammer drill"),
                                         ("hose", " garden hose "), ("hose", "")])
    write_title_split(examples.uri, "eval", [("paint", "cordless drill"), ("brush", "paint brush")])
    out = str(tmp_path / "vectors")
    options = PipelineOptions(["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    with beam.Pipeline(options=options) as pipeline:
        title_encoder.encode_texts(pipeline, examples, out, query_split="train")
    got = sentence_vectors.read_sentence_vectors(out)
    # Titles of every split, once each, stripped; empty ones skipped. Queries of `train` only.
    # Both in text order, whatever order Beam wrote them in.
    assert got.titles == ["cordless drill", "garden hose", "hammer drill", "paint brush"]
    assert got.queries == ["drill", "hose"]
    np.testing.assert_allclose(got.title_vectors, encoder.encode(got.titles), atol=1e-5)
    np.testing.assert_allclose(got.query_vectors, encoder.encode(got.queries), atol=1e-5)

    with beam.Pipeline() as pipeline, pytest.raises(ValueError, match="query_split 'test'"):
        title_encoder.encode_texts(pipeline, examples, out, query_split="test")
    with pytest.raises(FileNotFoundError, match="no sentence vector files"):
        sentence_vectors.read_sentence_vectors(str(tmp_path))


def test_title_encoder_leaves_out_texts_logged_less_than_min_impressions(tmp_path, encoder):
    examples = standard_artifacts.Examples()
    examples.uri = str(tmp_path / "examples")
    examples.split_names = artifact_utils.encode_split_names(["train", "eval"])
    # Impressions are summed over a text's rows in every split it is read from.
    write_title_split(examples.uri, "train", [("drill", "cordless drill", 3), ("drill", "hammer drill", 4),
                                         ("hose", "garden hose", 1), ("hose", "hose reel", 2)])
    write_title_split(examples.uri, "eval", [("paint", "cordless drill", 2), ("brush", "paint brush", 9)])
    out = str(tmp_path / "vectors")
    with beam.Pipeline(options=PipelineOptions(["--direct_num_workers=1"])) as pipeline:
        title_encoder.encode_texts(pipeline, examples, out, query_split="train", min_impressions=4)
    got = sentence_vectors.read_sentence_vectors(out)
    assert got.titles == ["cordless drill", "hammer drill", "paint brush"]
    assert got.queries == ["drill"]
    np.testing.assert_allclose(got.title_vectors, encoder.encode(got.titles), atol=1e-5)
    with beam.Pipeline() as pipeline, pytest.raises(ValueError, match="min_impressions"):
        title_encoder.encode_texts(pipeline, examples, out, min_impressions=-1)


def test_reading_vectors_rejects_mixed_sizes_and_unknown_kinds(tmp_path):
    def write(folder, rows):
        os.makedirs(folder)
        with tf.io.TFRecordWriter(os.path.join(folder, "v.gz"), "GZIP") as writer:
            for text, kind, vector in rows:
                writer.write(sentence_vectors.to_tf_example(text, kind, vector).SerializeToString())

    title, query = sentence_vectors.TITLE, sentence_vectors.QUERY
    write(str(tmp_path / "ok"), [("b", title, [1, 2]), ("a", title, [3, 4]), ("q", query, [5, 6])])
    got = sentence_vectors.read_sentence_vectors(str(tmp_path / "ok"))
    assert got.titles == ["a", "b"] and got.queries == ["q"]
    np.testing.assert_array_equal(got.title_vectors, [[3, 4], [1, 2]])
    assert got.title_vectors.dtype == np.float32 and got.dim == 2
    write(str(tmp_path / "sizes"), [("a", title, [1, 2]), ("b", title, [1, 2, 3])])
    with pytest.raises(ValueError, match=r"different sizes \[2, 3\]"):
        sentence_vectors.read_sentence_vectors(str(tmp_path / "sizes"))
    write(str(tmp_path / "kind"), [("a", title, [1, 2]), ("b", "word", [1, 2])])
    with pytest.raises(ValueError, match="unknown kind 'word'"):
        sentence_vectors.read_sentence_vectors(str(tmp_path / "kind"))
    write(str(tmp_path / "queries"), [("q", query, [1, 2])])
    with pytest.raises(FileNotFoundError, match="no title vectors"):
        sentence_vectors.read_sentence_vectors(str(tmp_path / "queries"))


def test_trainer_hands_the_title_vectors_folder_to_the_module():
    merged = merged_exec_properties({"custom_config": '{"max_order": 1}', "epochs": 2}, "/x/vectors")
    assert tf.nest.flatten(merged["custom_config"])  # still JSON
    import json
    assert json.loads(merged["custom_config"]) == {"max_order": 1, "epochs": 2,
                                                   "title_vectors_dir": "/x/vectors"}


def test_title_vector_table_finds_known_titles_after_a_reload(tmp_path):
    titles = ["red drill", "blue saw", "garden hose"]
    vectors = np.arange(9, dtype=np.float32).reshape(3, 3)
    table = berm_layers.TitleVectorTable(3, 3)
    table.set_table(titles, vectors)
    got, known = table(tf.constant(["blue saw", " red drill ", "no such title", ""]))
    np.testing.assert_array_equal(known.numpy(), [True, True, False, False])
    np.testing.assert_array_equal(got.numpy(), [vectors[1], vectors[0], [0, 0, 0], [0, 0, 0]])
    # Rebuilt from its config (sizes only), the table comes back with the weights.
    inputs = tf.keras.Input(shape=(), dtype=tf.string)
    model = tf.keras.Model(inputs, table(inputs)[0])
    model.save(str(tmp_path / "m"), save_format="tf", save_traces=False)
    reloaded = tf.keras.models.load_model(str(tmp_path / "m"), compile=False)
    np.testing.assert_array_equal(reloaded(tf.constant(["garden hose", "x"])).numpy(),
                                  [vectors[2], [0, 0, 0]])
    with pytest.raises(ValueError, match="repeat"):
        berm_layers.TitleVectorTable(2, 3).set_table(["a", " a"], vectors[:2])


def test_title_vector_table_may_hold_fewer_titles_than_its_size():
    # What a model serving fewer titles than it was trained with gets (the benchmark's cold start).
    vectors = np.arange(9, dtype=np.float32).reshape(3, 3)
    table = berm_layers.TitleVectorTable(3, 3)
    table.set_table(["red drill", "blue saw", "garden hose"], vectors)
    table.set_table(["garden hose"], vectors[2:])
    got, known = table(tf.constant(["garden hose", "red drill", "blue saw", "zzz"]))
    np.testing.assert_array_equal(known.numpy(), [True, False, False, False])
    np.testing.assert_array_equal(got.numpy(), [vectors[2], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    for titles, rows in ((["a", "b", "c", "d"], np.zeros([4, 3])), ([], np.zeros([0, 3])),
                         (["a"], np.zeros([1, 2])), (["a", "b"], np.zeros([1, 3]))):
        with pytest.raises(ValueError, match="expected 1 to 3 titles"):
            table.set_table(titles, rows)


def test_sentence_match_uses_the_stored_vector_or_the_fallback_map():
    rng = np.random.default_rng(0)
    layer = berm_layers.SentenceMatch(4, initial_scale=3.0)
    query, title_static = rng.normal(size=(2, 5)).astype(np.float32), rng.normal(size=(2, 5)).astype(np.float32)
    stored = rng.normal(size=(2, 4)).astype(np.float32)
    layer((query, title_static, stored, tf.constant([True, False])))
    query_map, fallback = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    layer.set_maps(query_map, fallback)
    got = layer((query, title_static, stored, tf.constant([True, False]))).numpy()
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(query @ query_map)
    np.testing.assert_allclose(got, 3.0 * np.sum(q * unit(np.stack([stored[0], title_static[1] @ fallback])), -1),
                               rtol=1e-5)
    assert [w.name.split("/")[-1].split(":")[0] for w in layer.trainable_weights] == ["query_map", "scale"]


def test_ridge_map_recovers_a_linear_relation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 6))
    w = rng.normal(size=(6, 3))
    np.testing.assert_allclose(sentence_vectors.fit_linear_map(x, x @ w, l2=1e-6), w, atol=1e-4)


def test_pretrained_mean_averages_real_tokens_and_skips_rows():
    embedding = berm_layers.TokenEmbedding(6, 2, pretrained_dim=3)
    table = np.arange(18, dtype=np.float32).reshape(6, 3)
    embedding.set_pretrained(table)
    ids = tf.constant([[1, 2, 0], [0, 0, 0], [5, 0, 0], [3, 4, 5]])
    np.testing.assert_allclose(embedding(ids, pretrained_mean=True).numpy(),
                               [table[[1, 2]].mean(0), [0, 0, 0], table[5], table[[3, 4, 5]].mean(0)])
    skipped = embedding(ids, pretrained_mean=True, skip_rows=tf.constant([True, False, False, True]))
    np.testing.assert_allclose(skipped.numpy(), [[0, 0, 0], [0, 0, 0], table[5], [0, 0, 0]])


def test_pretrained_mean_weighs_each_token_by_its_mean_weight():
    embedding = berm_layers.TokenEmbedding(6, 2, pretrained_dim=3)
    table = np.arange(18, dtype=np.float32).reshape(6, 3)
    embedding.set_pretrained(table)
    weights = np.array([1, 1, 3, 1, 0.5, 2], np.float32)
    embedding.set_mean_weights(weights)
    ids = tf.constant([[1, 2, 0], [0, 0, 0], [4, 5, 0]])
    np.testing.assert_allclose(
        embedding(ids, pretrained_mean=True).numpy(),
        [(table[1] + 3 * table[2]) / 4, [0, 0, 0], (0.5 * table[4] + 2 * table[5]) / 2.5], rtol=1e-6)
    with pytest.raises(ValueError, match="6 positive numbers"):
        embedding.set_mean_weights(np.zeros(6))
    with pytest.raises(ValueError, match="6 positive numbers"):
        embedding.set_mean_weights(np.ones(5))


def test_letter_trigrams_hash_each_words_framed_trigrams():
    layer = berm_layers.LetterTrigrams(1 << 20, max_trigrams=8)
    ids = layer(tf.constant(["Vacume  cleaner", "", "a", "vacuum"])).numpy()
    assert ids.shape == (4, 8) and ids.dtype == np.int32
    hashed = lambda grams: set(tf.strings.to_hash_bucket_fast(grams, 1 << 20).numpy().tolist())
    # "#vacume#" and "#cleaner#" (lower-cased): 6 + 7 trigrams, cut to 8.
    assert set(ids[0].tolist()) <= hashed(["#va", "vac", "acu", "cum", "ume", "me#", "#cl", "cle"])
    assert len(set(ids[0].tolist())) == 8
    assert (ids[1] == -1).all()
    assert set(ids[2].tolist()) == hashed(["#a#"]) | {-1}
    # The misspelling shares 3 of its 6 trigrams with the right word ("#va", "vac", "acu").
    assert len((set(ids[0][:6].tolist()) & set(ids[3].tolist())) - {-1}) == 3
    assert layer(tf.constant([""])).shape == (1, 1)  # a trigram axis even when no text has one


def test_trigram_sums_weigh_each_trigram_by_one_over_root_count_as_the_bags_do():
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids = tf.constant([[0, 2, -1], [-1, -1, -1], [3, 3, 1]])
    got = berm_layers.trigram_sums(tf.constant(rows), ids).numpy()
    np.testing.assert_allclose(got, [(rows[0] + rows[2]) / np.sqrt(2), [0, 0, 0],
                                     (2 * rows[3] + rows[1]) / np.sqrt(3)], rtol=1e-6)
    # Texts without a trigram at the end, or only such texts, or none at all (every title known).
    np.testing.assert_array_equal(berm_layers.trigram_sums(
        tf.constant(rows), tf.constant([[1, -1], [-1, -1]])).numpy(), [rows[1], [0, 0, 0]])
    np.testing.assert_array_equal(berm_layers.trigram_sums(
        tf.constant(rows), tf.constant([[-1], [-1]])).numpy(), np.zeros([2, 3]))
    assert berm_layers.trigram_sums(tf.constant(rows), tf.zeros([0, 1], tf.int32)).shape == (0, 3)


def test_ridge_maps_with_sparse_bags_match_the_dense_fit():
    import scipy.sparse

    rng = np.random.default_rng(2)
    dense = rng.normal(size=(300, 4))
    bags = scipy.sparse.random(300, 10, density=0.3, random_state=3, format="csr")
    targets = rng.normal(size=(300, 2))
    dense_map, bag_map = sentence_vectors.fit_linear_maps_with_bags(dense, bags, targets, l2=0.5)
    both = sentence_vectors.fit_linear_map(np.hstack([dense, bags.toarray()]), targets, l2=0.5)
    np.testing.assert_allclose(np.vstack([dense_map, bag_map]), both, atol=1e-5)
    assert dense_map.shape == (4, 2) and bag_map.shape == (10, 2)


def test_sentence_match_adds_the_title_trigram_rows_to_the_fallback():
    rng = np.random.default_rng(4)
    layer = berm_layers.SentenceMatch(4, initial_scale=1.0, title_trigram_buckets=5)
    query, title_static = rng.normal(size=(3, 3)).astype(np.float32), rng.normal(size=(3, 3)).astype(np.float32)
    stored = rng.normal(size=(3, 4)).astype(np.float32)
    known = tf.constant([False, True, False])
    trigrams = tf.constant([[1, 4], [0, 2], [-1, -1]])  # the stored title's are not read
    inputs = (query, title_static, stored, known, trigrams)
    layer(inputs)
    query_map, fallback, trigram_map = (rng.normal(size=(3, 4)), rng.normal(size=(3, 4)),
                                        rng.normal(size=(5, 4)))
    with pytest.raises(ValueError, match="title_trigram_map"):
        layer.set_maps(query_map, fallback)
    layer.set_maps(query_map, fallback, trigram_map)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    title = np.stack([title_static[0] @ fallback + (trigram_map[1] + trigram_map[4]) / np.sqrt(2),
                      stored[1], title_static[2] @ fallback])
    np.testing.assert_allclose(layer(inputs).numpy(), np.sum(unit(query @ query_map) * unit(title), -1),
                               rtol=1e-5)
    assert sorted(w.name.split("/")[-1].split(":")[0] for w in layer.trainable_weights) == [
        "query_map", "scale"]


def test_letter_trigrams_cut_only_the_rows_not_skipped():
    layer = berm_layers.LetterTrigrams(1 << 20)
    texts = tf.constant(["drill", "hammer", "saw"])
    ids = layer(texts, skip_rows=tf.constant([True, False, True])).numpy()
    np.testing.assert_array_equal(ids[1], layer(tf.constant(["hammer"])).numpy()[0])
    assert (ids[[0, 2]] == -1).all()
    assert (layer(texts, skip_rows=tf.constant([True, True, True])).numpy() == -1).all()


def test_one_normalisation_serves_the_wordpiece_and_trigram_layers():
    """title_tokens_and_trigrams normalises a title once for both layers: their ids from the
    WordPiece layer's normalised text equal those from the raw text, accents and all."""
    from trainer import bert_checkpoint

    vocab = berm_layers.read_vocab(bert_checkpoint.vocab_file())
    wordpiece = berm_layers.WordPieceTokens(vocab, 16)
    trigrams = berm_layers.LetterTrigrams(1 << 20)
    texts = tf.constant(["Crème Brûlée TORCH", "DEWALT 20V\tdrill", "", "ÉCRAN  plat\x07 55in"])
    skip = tf.constant([False, True, False, False])
    normalized = wordpiece.normalize(texts)
    assert trigrams.normalizes_as(wordpiece)
    np.testing.assert_array_equal(wordpiece(normalized, normalized=True), wordpiece(texts))
    np.testing.assert_array_equal(trigrams(normalized, skip_rows=skip, normalized=True),
                                  trigrams(texts, skip_rows=skip))
    np.testing.assert_array_equal(trigrams(normalized, normalized=True), trigrams(texts))
    # Where the two would normalise differently, they do not share.
    assert not trigrams.normalizes_as(berm_layers.WordPieceTokens(vocab, 16, lower_case=False))
    assert not trigrams.normalizes_as(berm_layers.WordPieceTokens(vocab, 16, max_chars=64))
