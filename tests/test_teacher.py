"""trainer.teacher: graded targets, a tiny teacher trained through run_fn, its SavedModel.

The tiny teacher is a randomly initialised 2-layer encoder (hidden 32) on the
real WordPiece vocab, trained on synthetic judged pairs whose relevance is the
word overlap of query and title. Its vocab is a temporary copy that is deleted
before the exported model is loaded, so the test also proves the vocab is an
asset of the SavedModel.
"""
import json
import os
import random
import shutil

import numpy as np
import pytest

import tensorflow as tf  # noqa: E402
from tfx.components.trainer.fn_args_utils import FnArgs  # noqa: E402

from trainer import bert_checkpoint  # noqa: E402
from trainer import teacher  # noqa: E402
from trainer import training  # noqa: E402

VOCAB = bert_checkpoint.vocab_file()
assert VOCAB is not None, f"{bert_checkpoint.PRETRAINED_PIP_NAME} (the vocab) is not installed (make install)"

WORDS = ("red blue green black white steel wood cordless drill hammer lamp chair table "
         "paint brush door window garden hose saw screw nail light fan sink").split()
TINY_ENCODER = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
EPOCHS = 20  # About 0.2 s each; a random tiny encoder needs ~10 to learn word overlap.


# --- Graded targets -----------------------------------------------------------------

def test_graded_relevance_becomes_soft_target():
    got = teacher.relevance_to_target(tf.constant([1.0, 2.33, 2.0, 3.0, 1.33]), 1.0, 3.0).numpy()
    np.testing.assert_allclose(got, [0.0, 0.665, 0.5, 1.0, 0.165], atol=1e-6)


def test_out_of_scale_relevance_is_clipped():
    got = teacher.relevance_to_target(tf.constant([0.0, -5.0, 3.5, 100.0]), 1.0, 3.0).numpy()
    np.testing.assert_array_equal(got, [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(teacher.relevance_to_target(tf.constant([2.0]), 0.0, 4.0), [0.5])
    with pytest.raises(ValueError, match="must exceed"):
        teacher.relevance_to_target(tf.constant([1.0]), 3.0, 3.0)


def test_custom_config_defaults_profiles_and_typos():
    config = teacher.TeacherConfig.from_custom_config(None)
    assert (config.relevance_min, config.relevance_max, config.max_seq_length) == (1.0, 3.0, 48)
    assert (config.batch_size, config.learning_rate, config.epochs, config.patience) == (32, 3e-5, 3, 1)
    assert config.pretrained and config.num_layers is None and config.seed == 42
    for profile in teacher.PROFILES.values():
        teacher.TeacherConfig.from_custom_config(profile)
    with pytest.raises(ValueError, match=r"'learning_rat' \(did you mean 'learning_rate'\?\)"):
        teacher.TeacherConfig.from_custom_config({"learning_rat": 1e-3})
    # Vertex AI's own keys ride along in a Trainer's custom_config; they are not settings.
    assert teacher.TeacherConfig.from_custom_config({"ai_platform_training_args": {}}).epochs == 3
    with pytest.raises(ValueError, match="relevance_max"):
        teacher.TeacherConfig.from_custom_config({"relevance_min": 3, "relevance_max": 1})


# --- A tiny teacher through run_fn --------------------------------------------------

def _bytes(*values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in values]))


def _example(query, title, relevance=None, item_id="P0", extra=False):
    feature = {"query": _bytes(query), "item_title": _bytes(title), "item_id": _bytes(item_id)}
    if relevance is not None:
        feature["relevance"] = tf.train.Feature(float_list=tf.train.FloatList(value=[relevance]))
    if extra:  # Graph context of the student's inputs, which the teacher ignores.
        feature["neighbor_queries"] = _bytes("blue lamp", "garden hose")
        feature["clicks"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[3, 4]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _judged_pairs(rng, n):
    """Relevance 1..3 in thirds = 1 + 2 * (share of the query's words in the title)."""
    pairs = []
    for _ in range(n):
        query = rng.sample(WORDS, 3)
        shared = rng.choice([0, 0, 1, 2, 3])  # Mostly irrelevant, as in real judgments.
        others = [w for w in WORDS if w not in query]
        title = query[:shared] + rng.sample(others, 4 - min(shared, 2))
        rng.shuffle(title)
        pairs.append((" ".join(query), " ".join(title), round(1 + 2 * shared / 3, 2)))
    return pairs


def _write_split(root, split, pairs):
    directory = os.path.join(root, f"Split-{split}")
    os.makedirs(directory)
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    with tf.io.TFRecordWriter(os.path.join(directory, "data.gz"), options) as writer:
        for i, (query, title, relevance) in enumerate(pairs):
            writer.write(_example(query, title, relevance, f"P{i}", extra=i % 2 == 0)
                         .SerializeToString())
    return os.path.join(directory, "*")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Runs run_fn once on a tiny teacher; the vocab copy it used is deleted afterwards."""
    root = tmp_path_factory.mktemp("teacher")
    rng = random.Random(7)
    examples = str(root / "examples")
    train_files = [_write_split(examples, "train", _judged_pairs(rng, 200))]
    eval_files = [_write_split(examples, "eval", _judged_pairs(rng, 40))]
    vocab_copy = str(root / "vocab_copy.txt")
    shutil.copyfile(VOCAB, vocab_copy)
    fn_args = FnArgs(
        train_files=train_files, eval_files=eval_files,
        serving_model_dir=str(root / "serving_model"), model_run_dir=str(root / "model_run"),
        custom_config=dict(tiny_encoder=TINY_ENCODER, vocab_file=vocab_copy, max_seq_length=24,
                           query_max_tokens=8, batch_size=16, learning_rate=3e-3, epochs=EPOCHS,
                           patience=EPOCHS, dropout=0.0, seed=1))
    history = teacher.run_fn(fn_args)
    os.remove(vocab_copy)
    return fn_args, history, tf.saved_model.load(fn_args.serving_model_dir)


def test_training_loss_falls(trained):
    fn_args, history, _ = trained
    losses = history.history["loss"]
    assert len(losses) == EPOCHS
    assert losses[-1] < losses[0] - 0.1, losses
    assert {"mse", "auc", "val_loss", "val_mse", "val_auc"} <= set(history.history)
    with open(os.path.join(fn_args.model_run_dir, teacher.HISTORY_FILE)) as f:
        assert json.load(f)["loss"] == pytest.approx(losses)
    assert tf.io.gfile.glob(os.path.join(fn_args.model_run_dir, "train", "events.out.tfevents*"))


def test_export_has_both_signatures_and_vocab_asset(trained):
    fn_args, _, loaded = trained
    assert set(loaded.signatures) == {"serving_default", teacher.RAW_SIGNATURE}
    default = loaded.signatures["serving_default"]
    assert list(default.structured_input_signature[1]) == ["examples"]
    assert default.structured_input_signature[1]["examples"].dtype == tf.string
    assert list(default.structured_outputs) == ["score"]
    raw = loaded.signatures[teacher.RAW_SIGNATURE]
    assert sorted(raw.structured_input_signature[1]) == ["item_title", "query"]
    assert raw.structured_outputs["score"].dtype == tf.float32
    assets = os.listdir(os.path.join(fn_args.serving_model_dir, "assets"))
    assert "vocab_copy.txt" in assets  # The (deleted) source vocab travels with the model.


def test_signatures_score_in_unit_interval_and_agree(trained):
    _, _, loaded = trained
    queries = ["red cordless drill", "", "café lámpara 💡", "garden hose", "steel hammer"]
    titles = ["cordless drill red steel", "blue lamp", "Lampe für den Garten", "", "x" * 500]
    serialized = [_example(q, t, extra=i % 2 == 0).SerializeToString()
                  for i, (q, t) in enumerate(zip(queries, titles))]
    # An example without item_title gets the empty title.
    no_title = tf.train.Example()
    no_title.features.feature["query"].bytes_list.value.append(b"garden hose")
    serialized.append(no_title.SerializeToString())

    by_example = loaded.signatures["serving_default"](
        examples=tf.constant(serialized))["score"].numpy()
    by_raw = loaded.signatures[teacher.RAW_SIGNATURE](
        query=tf.constant(queries + ["garden hose"]),
        item_title=tf.constant(titles + [""]))["score"].numpy()
    assert by_example.shape == by_raw.shape == (6,)
    assert by_example.dtype == np.float32
    assert ((by_example >= 0) & (by_example <= 1)).all()
    np.testing.assert_allclose(by_example, by_raw, atol=1e-6)
    np.testing.assert_allclose(by_raw[3], by_raw[5], atol=1e-6)  # Missing title == "".


def test_trained_teacher_prefers_overlapping_titles(trained):
    _, _, loaded = trained
    raw = loaded.signatures[teacher.RAW_SIGNATURE]
    rng = random.Random(11)
    queries, good, bad = [], [], []
    for _ in range(32):
        query = rng.sample(WORDS, 3)
        others = [w for w in WORDS if w not in query]
        queries.append(" ".join(query))
        good.append(" ".join(query + rng.sample(others, 1)))
        bad.append(" ".join(rng.sample(others, 4)))
    score = lambda titles: raw(query=tf.constant(queries), item_title=tf.constant(titles))["score"]
    assert float(tf.reduce_mean(score(good))) > float(tf.reduce_mean(score(bad)))


def test_best_epoch_is_restored_without_early_stop():
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(1,))])
    callback = training.RestoreBestEarlyStopping(monitor="val_loss", patience=5,
                                                restore_best_weights=True)
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, val_loss in enumerate([1.0, 0.5, 0.7]):
        model.layers[0].kernel.assign([[float(epoch)]])
        callback.on_epoch_end(epoch, {"val_loss": val_loss})
    callback.on_train_end()
    assert float(model.layers[0].kernel[0, 0]) == 1.0  # Epoch 2's weights, not the last.


def test_records_that_fit_the_limit_are_read_in_one_order_however_written(tmp_path):
    records = [f"record {i}".encode() for i in (3, 1, 4, 0, 2)]

    def write(name, order):
        os.makedirs(tmp_path / name)
        for j, part in enumerate((order[:2], order[2:])):  # two files, as Beam may write them
            with tf.io.TFRecordWriter(str(tmp_path / name / f"data-{j}.gz"), "GZIP") as writer:
                for record in part:
                    writer.write(record)
        return str(tmp_path / name / "*")

    read = lambda pattern, limit: list(training.record_dataset(pattern, limit).as_numpy_iterator())
    written, rewritten = write("a", records), write("b", records[::-1])
    assert read(written, 5) == read(rewritten, 5) == sorted(records)
    assert read(written, 100) == sorted(records)
    # More records than the limit: as written, since a canonical order would need them all.
    assert read(written, 4) == read(written, 0) == records
    assert read(rewritten, 4) == records[::-1]


def test_the_teacher_reads_its_examples_in_an_order_set_by_the_features_it_reads(tmp_path):
    def example(query, title, relevance, context):
        ex = tf.train.Example()
        ex.features.feature["query"].bytes_list.value.append(query.encode())
        ex.features.feature["item_title"].bytes_list.value.append(title.encode())
        ex.features.feature["relevance"].float_list.value.append(relevance)
        ex.features.feature["q_o1_ids"].bytes_list.value.extend(c.encode() for c in context)
        return ex.SerializeToString()

    judged = [("drill", "cordless drill", 3.0), ("drill", "hammer", 1.0), ("hose", "garden hose", 2.5),
              ("saw", "band saw", 3.0)]

    def write(name, contexts):
        """The same judgments, with other graph contexts, in another order."""
        os.makedirs(tmp_path / name)
        with tf.io.TFRecordWriter(str(tmp_path / name / "data.gz"), "GZIP") as writer:
            for (query, title, relevance), context in zip(judged, contexts):
                writer.write(example(query, title, relevance, context))
        return str(tmp_path / name / "*")

    one = write("one", [["z"], [], ["a", "b"], ["x"]])
    other = write("other", [[], ["q"], ["zz"], ["a"]])
    def ordered(pattern, order_by=None):
        return [(f["query"].bytes_list.value[0], f["item_title"].bytes_list.value[0])
                for f in (tf.train.Example.FromString(r).features.feature for r in
                          training.record_dataset(pattern, 10, order_by).as_numpy_iterator())]

    by_text = ordered(one, ["query", "item_title"])
    assert by_text == ordered(other, ["query", "item_title"])
    assert sorted(by_text) == sorted((q.encode(), t.encode()) for q, t, _ in judged)
    # In byte order the contexts would set the order; the teacher's batches are the same.
    assert ordered(one) != ordered(other)
    config = teacher.TeacherConfig(batch_size=2)
    batches = [list(teacher.make_dataset([pattern], config, training=True).take(2).as_numpy_iterator())
               for pattern in (one, other)]
    for (features_a, target_a), (features_b, target_b) in zip(*batches):
        assert list(features_a["query"]) == list(features_b["query"])
        assert list(features_a["item_title"]) == list(features_b["item_title"])
        np.testing.assert_array_equal(target_a, target_b)


# --- The pretrained path ------------------------------------------------------------

def test_pretrained_teacher_builds_and_scores():
    encoder = bert_checkpoint.load_pretrained_encoder(num_layers=1, max_sequence_length=32)
    model = teacher.build_teacher(encoder, VOCAB, max_seq_length=32, query_max_tokens=8)
    scores = model({"query": tf.constant(["cordless drill", "", "lipstick"]),
                    "item_title": tf.constant(["DeWalt 20V cordless drill", "lamp", "Ruby Woo ✨"])},
                   training=False).numpy()
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert ((scores > 0) & (scores < 1)).all()
    with pytest.raises(ValueError, match="positions"):
        teacher.build_teacher(encoder, VOCAB, max_seq_length=64)


# --- Pooling and head calibration ---------------------------------------------------

def test_sequence_pooling_ignores_padding():
    sequence = tf.constant([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                            [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = tf.constant([[1, 1, 0], [1, 1, 1]], tf.int32)
    mean = teacher.SequencePooling("mean")(sequence, mask).numpy()
    np.testing.assert_allclose(mean, [[2.0, 3.0], [7.0, 8.0]])
    cls = teacher.SequencePooling("cls")(sequence, mask).numpy()
    np.testing.assert_allclose(cls, [[1.0, 2.0], [5.0, 6.0]])
    np.testing.assert_allclose(teacher.SequencePooling("mean")(sequence, tf.zeros_like(mask)), 0.0)
    with pytest.raises(ValueError, match="mode"):
        teacher.SequencePooling("max")


def test_segment_pair_features_compare_query_and_title_means():
    # [CLS] q [SEP] | t [SEP] | pad: u = mean of type-0 tokens, v = of type-1 tokens.
    sequence = tf.constant([[[1.0, 0.0], [1.0, 2.0], [1.0, 1.0], [0.0, 3.0], [0.0, 1.0], [9.0, 9.0]]])
    mask = tf.constant([[1, 1, 1, 1, 1, 0]], tf.int32)
    type_ids = tf.constant([[0, 0, 0, 1, 1, 1]], tf.int32)
    got = teacher.SegmentPairFeatures()(sequence, mask, type_ids).numpy()
    u, v = np.array([1.0, 1.0]), np.array([0.0, 2.0])
    cosine = u @ v / np.linalg.norm(u) / np.linalg.norm(v)
    np.testing.assert_allclose(got[0], np.concatenate([[cosine], u * v, np.abs(u - v)]), atol=1e-6)


def test_pooling_option_is_validated_and_every_pooling_builds():
    assert teacher.TeacherConfig().pooling == "mean"
    with pytest.raises(ValueError, match="pooling"):
        teacher.TeacherConfig.from_custom_config({"pooling": "max"})
    texts = {"query": tf.constant(["red drill", "lamp"]),
             "item_title": tf.constant(["red cordless drill", "garden hose"])}
    for pooling in teacher.POOLINGS:
        config = teacher.TeacherConfig(tiny_encoder=TINY_ENCODER, max_seq_length=16,
                                       query_max_tokens=8, pooling=pooling, dropout=0.0)
        model = teacher.teacher_from_config(config, head_bias=0.5)
        assert model.get_layer(teacher.HEAD_LAYER).get_weights()[1][0] == pytest.approx(0.5)
        scores = model(texts, training=False).numpy()
        assert scores.shape == (2,) and ((scores > 0) & (scores < 1)).all(), pooling
        has_pooling_layer = any(layer.name == f"{pooling}_pooling" for layer in model.layers)
        assert has_pooling_layer == (pooling != "pooler"), pooling
        # The pooler trains only where its output is read; elsewhere it is kept, frozen.
        pooler_names = {v.name for v in model.trainable_variables if "pooler_transform" in v.name}
        assert bool(pooler_names) == (pooling == "pooler"), pooling
        assert any("pooler_transform" in v.name for v in model.variables), pooling


def test_head_calibration_predicts_the_mean_target():
    rng = random.Random(3)
    pairs = _judged_pairs(rng, 64)
    features = {"query": tf.constant([q for q, _, _ in pairs]),
                "item_title": tf.constant([t for _, t, _ in pairs])}
    dataset = tf.data.Dataset.from_tensor_slices(
        (features, tf.zeros([len(pairs)]))).batch(16)
    for pooling in ("mean", "segments"):
        config = teacher.TeacherConfig(tiny_encoder=TINY_ENCODER, max_seq_length=16,
                                       query_max_tokens=8, pooling=pooling, dropout=0.0)
        model = teacher.teacher_from_config(config)
        got = teacher.calibrate_head(model, dataset, mean_target=0.7, batches=4)
        logits = tf.keras.Model(model.input, model.get_layer(teacher.HEAD_LAYER).output)
        mean_logit = float(tf.reduce_mean(logits(features, training=False)))
        assert mean_logit == pytest.approx(teacher.target_logit(0.7), abs=1e-4), pooling
        assert ("cosine_weight" in got) == (pooling == "segments")
        if pooling == "segments":
            kernel = model.get_layer(teacher.HEAD_LAYER).get_weights()[0]
            assert kernel[0, 0] == pytest.approx(got["cosine_weight"]) and got["cosine_weight"] > 1


def test_target_stats_and_logit(tmp_path):
    pattern = _write_split(str(tmp_path), "train", [("a", "b", 1.0), ("c", "d", 3.0), ("e", "f", 2.5)])
    stats = teacher.target_stats([pattern], 1.0, 3.0)
    assert stats["count"] == 3 and stats["mean_target"] == pytest.approx((0.0 + 1.0 + 0.75) / 3)
    assert teacher.target_logit(0.5) == pytest.approx(0.0)
    assert teacher.target_logit(1.0) == pytest.approx(np.log(0.999 / 0.001))


def test_segment_pair_dropout_spares_the_cosine():
    sequence = tf.random.stateless_normal([4, 6, 8], seed=[1, 2])
    mask = tf.ones([4, 6], tf.int32)
    type_ids = tf.constant([[0, 0, 0, 1, 1, 1]] * 4, tf.int32)
    layer = teacher.SegmentPairFeatures(dropout=0.5)
    clean = layer(sequence, mask, type_ids, training=False).numpy()
    noisy = layer(sequence, mask, type_ids, training=True).numpy()
    np.testing.assert_allclose(noisy[:, 0], clean[:, 0], atol=1e-6)
    assert (noisy[:, 1:] == 0).any() and not np.allclose(noisy[:, 1:], clean[:, 1:])
