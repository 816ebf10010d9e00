"""trainer.student and trainer.berm_serving: the distilled student BERM and its BERM-O export.

The synthetic shop: 40 queries of 3 words over 26 words; each query has 10
logged items, 3 made for it (sharing 1, 2 or 3 of its words) and 7 drawn from
a shared pool, so items recur across queries and the click graph is connected.
The "teacher" is a deterministic function of word overlap. Graph contexts
(orders 1 and 2, random-walk weights, top 5) are computed here exactly as the
GraphContexts component defines them, joined onto the examples and written as
neighbour tables with `metapaths.neighbour_record_to_tf_example`.
"""
import json
import os
import random
import shutil
from collections import defaultdict

import numpy as np
import pytest

import tensorflow as tf  # noqa: E402
from scipy import stats  # noqa: E402
from tfx.components.trainer.fn_args_utils import FnArgs  # noqa: E402

from components import example_codec  # noqa: E402
from components.graph import metapaths  # noqa: E402
from trainer import berm_layers  # noqa: E402
from trainer import berm_serving  # noqa: E402
from trainer import bert_checkpoint  # noqa: E402
from trainer import student  # noqa: E402

VOCAB_FILE = bert_checkpoint.vocab_file()
assert VOCAB_FILE is not None, f"{bert_checkpoint.PRETRAINED_PIP_NAME} (the vocab) is not installed"

WORDS = ("red blue green black white steel wood cordless drill hammer lamp chair table "
         "paint brush door window garden hose saw screw nail light fan sink tile").split()
TOP_N = 5
TINY = dict(max_order=2, list_size=10, embedding_dim=16, hidden_dim=16, init_from_teacher_embeddings=False,
            max_query_tokens=8, max_title_tokens=12, max_context_texts=TOP_N, max_context_tokens=8)
EPOCHS = 5


@pytest.fixture(scope="module")
def vocab():
    return berm_layers.read_vocab(VOCAB_FILE)


def _tiny_student(vocab, **overrides):
    config = student.StudentConfig.from_custom_config(dict(TINY, **overrides))
    tf.keras.utils.set_random_seed(0)
    return student.build_student(vocab, config.max_order, config.max_context_texts, config.max_query_tokens,
                                 config.max_title_tokens, config.max_context_tokens, config.embedding_dim,
                                 None, config.num_kernels, config.hidden_dim, config.term_gating)


# --- A tiny shop, its click graph and its teacher ------------------------------------

def _shared(query, title):
    return len(set(query.split()) & set(title.split()))


def teacher_score(query, title):
    return 0.05 + 0.9 * _shared(query, title) / 3


def _top(weights):
    """{node: weight} -> [(node, weight)] by weight desc, id asc, top N."""
    return sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_N]


def make_world(seed=3, num_queries=40):
    rng = random.Random(seed)
    titles = {f"B{i:03d}": " ".join(rng.sample(WORDS, 4)) for i in range(20)}
    queries = []
    while len(queries) < num_queries:
        query = " ".join(rng.sample(WORDS, 3))
        if query not in queries:
            queries.append(query)
    pool, pairs = list(titles), []
    for qi, query in enumerate(queries):
        words = query.split()
        own = []
        for shared in (1, 2, 3):
            others = rng.sample([w for w in WORDS if w not in words], 4 - min(shared, 2))
            item_words = words[:shared] + others
            rng.shuffle(item_words)
            item_id = f"Q{qi:02d}S{shared}"
            titles[item_id] = " ".join(item_words)
            own.append(item_id)
        for item_id in own + rng.sample(pool, 7):
            pairs.append((query, item_id))
        pool += own
    edge = {(q, i): 0.1 + _shared(q, titles[i]) + rng.uniform(0, 0.2) for q, i in pairs}
    by_query, by_item = defaultdict(dict), defaultdict(dict)
    for (q, i), w in edge.items():
        by_query[q][i], by_item[i][q] = w, w
    p_item = {q: {i: w / sum(ws.values()) for i, w in ws.items()} for q, ws in by_query.items()}
    p_query = {i: {q: w / sum(ws.values()) for q, w in ws.items()} for i, ws in by_item.items()}
    contexts = {}  # (side, node, order) -> [(neighbour id, text, weight)]
    for q in by_query:
        o2 = defaultdict(float)
        for i, p in p_item[q].items():
            for q2, p2 in p_query[i].items():
                if q2 != q:
                    o2[q2] += p * p2
        contexts["query", q, 1] = [(i, titles[i], w) for i, w in _top(p_item[q])]
        contexts["query", q, 2] = [(q2, q2, w) for q2, w in _top(o2)]
    for i in by_item:
        o2 = defaultdict(float)
        for q, p in p_query[i].items():
            for i2, p2 in p_item[q].items():
                if i2 != i:
                    o2[i2] += p * p2
        contexts["item", i, 1] = [(q, q, w) for q, w in _top(p_query[i])]
        contexts["item", i, 2] = [(i2, titles[i2], w) for i2, w in _top(o2)]
    return {"titles": titles, "queries": queries, "pairs": pairs, "contexts": contexts}


def pair_record(world, query, item_id, contexts=True, judged=False, served_query=None, served_item=None):
    """A logged pair with its contexts joined as JoinContexts does: the pair is not its own
    order-1 neighbour. `served_query` / `served_item` name the pair that is actually scored
    when only one side's contexts are borrowed from (query, item_id)."""
    title = world["titles"][item_id]
    record = {"query": query, "item_id": item_id, "item_title": title, "impressions": 10, "clicks": 1,
              "purchases": 0, "period": "", "teacher_score": teacher_score(query, title),
              "relevance": 1.0 + 2.0 * _shared(query, title) / 3 if judged else -1.0}
    others = {"query": served_item or item_id, "item": served_query or query}
    for side, letter, node in (("query", "q", query), ("item", "i", item_id)):
        for order in (1, 2):
            neighbours = world["contexts"].get((side, node, order), []) if contexts else []
            if order == 1:
                neighbours = [n for n in neighbours if n[0] != others[side]]
            record[f"{letter}_o{order}_ids"] = [n for n, _, _ in neighbours]
            record[f"{letter}_o{order}_texts"] = [t for _, t, _ in neighbours]
            record[f"{letter}_o{order}_weights"] = [w for _, _, w in neighbours]
    return record


def serialize(record):
    return example_codec.to_example(record).SerializeToString()


def write_records(path, serialized):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path, tf.io.TFRecordOptions(compression_type="GZIP")) as writer:
        for record in serialized:
            writer.write(record)


def write_tables(world, directory):
    records = []
    for (side, node, order), neighbours in sorted(world["contexts"].items()):
        if neighbours:
            records.append(metapaths.neighbour_record_to_tf_example({
                "side": side, "node_id": node, "metapath": metapaths.metapath_name(side, order),
                "order": order, "neighbour_ids": [n for n, _, _ in neighbours],
                "neighbour_texts": [t for _, t, _ in neighbours],
                "neighbour_weights": [w for _, _, w in neighbours]}).SerializeToString())
    write_records(os.path.join(directory, "tables-00000-of-00001.gz"), records)
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump({"graph_config": {"max_order": 2, "top_n": TOP_N}}, f)
    return len(records)


@pytest.fixture(scope="module")
def world():
    return make_world()


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, world):
    """run_fn once on the tiny shop (30 train / 10 eval queries); the tables copy is then deleted."""
    root = tmp_path_factory.mktemp("student")
    train_queries = set(world["queries"][:30])
    rng = random.Random(5)
    split = {"train": [], "eval": []}
    for query, item_id in world["pairs"]:
        record = pair_record(world, query, item_id, judged=rng.random() < 0.4)
        split["train" if query in train_queries else "eval"].append(record)
    for name, records in split.items():
        write_records(str(root / f"Split-{name}" / "data.gz"), [serialize(r) for r in records])
    tables = str(root / "tables_copy")
    num_tables = write_tables(world, tables)
    fn_args = FnArgs(
        train_files=[str(root / "Split-train" / "*")], eval_files=[str(root / "Split-eval" / "*")],
        serving_model_dir=str(root / "serving_model"), model_run_dir=str(root / "model_run"),
        custom_config=dict(TINY, learning_rate=1e-2, epochs=EPOCHS, patience=EPOCHS, batch_size=4, seed=1,
                           human_loss_weight=0.5, neighbour_tables_dir=tables))
    history = student.run_fn(fn_args)
    shutil.rmtree(tables)  # The exported model must not need them any more.
    loaded = tf.saved_model.load(fn_args.serving_model_dir)
    return {"fn_args": fn_args, "history": history, "loaded": loaded, "eval": split["eval"],
            "num_tables": num_tables, "tables": tables}


# --- Settings -----------------------------------------------------------------------

def test_custom_config_defaults_and_typos():
    config = student.StudentConfig.from_custom_config(None)
    assert (config.max_order, config.list_size, config.embedding_dim, config.num_kernels) == (2, 20, 64, 11)
    assert (config.max_query_tokens, config.max_title_tokens, config.max_context_texts,
            config.max_context_tokens) == (16, 32, 10, 16)
    assert config.init_from_teacher_embeddings and config.ranking_loss == "softmax_loss"
    assert (config.human_loss_weight, config.relevance_min, config.relevance_max) == (0.0, 1.0, 3.0)
    assert config.neighbour_tables_dir is None
    assert student.StudentConfig.from_custom_config({"ndcg_topn": [3]}).ndcg_topn == (3,)
    with pytest.raises(ValueError, match=r"'max_ordr' \(did you mean 'max_order'\?\)"):
        student.StudentConfig.from_custom_config({"max_ordr": 1})
    with pytest.raises(ValueError, match="ranking_loss"):
        student.StudentConfig.from_custom_config({"ranking_loss": "hinge"})
    with pytest.raises(ValueError, match="max_order"):
        student.StudentConfig.from_custom_config({"max_order": 4})
    # Values that convert exactly are read as the field holds them (JSON and YAML write 4.0 for
    # some 4s); others name the setting (more cases: test_configs.py).
    config = student.StudentConfig.from_custom_config({"epochs": 4.0, "learning_rate": 1, "ndcg_topn": 10})
    assert (config.epochs, config.learning_rate, config.ndcg_topn) == (4, 1.0, (10,))
    assert isinstance(config.epochs, int) and isinstance(config.learning_rate, float)
    with pytest.raises(ValueError, match="student setting 'max_order' must be a whole number, got '2'"):
        student.StudentConfig.from_custom_config({"max_order": "2"})


# --- Shapes, masks, padding, cold start -----------------------------------------------

def _parsed(queries, titles, lists):
    """Parsed-example dict; `lists[prefix]` is a list (per pair) of (text, weight) lists."""
    parsed = {"query": tf.constant(queries), "item_title": tf.constant(titles)}
    for prefix in student.context_prefixes(2):
        rows = lists.get(prefix, [[] for _ in queries])
        parsed[f"{prefix}_texts"] = tf.ragged.constant([[t for t, _ in r] for r in rows], tf.string)
        parsed[f"{prefix}_weights"] = tf.ragged.constant([[w for _, w in r] for r in rows], tf.float32,
                                                         ragged_rank=1)
    return parsed


RAGGED = {
    "q_o1": [[], [("red steel drill", 0.5), ("blue lamp", 0.2)],
             [(f"title {i}", 1.0 / (i + 1)) for i in range(8)]],
    "i_o1": [[("red drill", 0.9)], [], [("lamp", 0.3), ("garden hose", 0.1), ("saw", 0.05)]],
}


def test_shapes_and_masks_with_ragged_neighbour_lists(vocab):
    scorer = _tiny_student(vocab, max_context_texts=3)
    features = student.string_features(
        _parsed(["red drill", "blue lamp", "garden hose"], ["red steel drill", "lamp", "hose"], RAGGED), 2, 3)
    assert features["q_o1_texts"].shape == (3, 3) and features["q_o1_weights"].shape == (3, 3)
    np.testing.assert_array_equal(features["q_o1_length"], [0, 2, 3])  # 8 neighbours cut to C = 3.
    np.testing.assert_array_equal(features["i_o1_length"], [1, 0, 3])
    np.testing.assert_array_equal(features["q_o2_length"], [0, 0, 0])
    assert features["q_o1_texts"].numpy()[1, 2] == b"" and features["q_o1_weights"].numpy()[1, 2] == 0.0
    tokens = student.tokenize_features(scorer, features)
    assert tokens["query_tokens"].shape[0] == 3 and tokens["query_tokens"].dtype == tf.int32
    t = tokens["q_o1_tokens"].numpy()
    assert t.shape[:2] == (3, 3) and (t[0] == 0).all() and (t[1, 2] == 0).all() and (t[1, :2, 0] != 0).all()
    logits = scorer(features)
    assert logits.shape == (3,) and logits.dtype == tf.float32 and np.isfinite(logits.numpy()).all()
    # Serialized examples without any context feature parse to empty contexts.
    example = example_codec.to_example({"query": "red drill", "item_title": "drill"}).SerializeToString()
    parsed = tf.io.parse_example(tf.constant([example]), student.serving_feature_spec(2))
    empty = student.string_features(parsed, 2, 3)
    assert all(int(empty[f"{p}_length"][0]) == 0 for p in student.context_prefixes(2))


def test_attention_ignores_padding(vocab):
    scorer = _tiny_student(vocab, max_context_texts=4)
    features = student.string_features(
        _parsed(["red drill", "blue lamp", "garden hose"], ["red steel drill", "lamp", "hose"], RAGGED), 2, 4)
    reference = scorer(features).numpy()
    noisy = dict(features)
    for prefix in student.context_prefixes(2):
        pad = ~tf.sequence_mask(features[f"{prefix}_length"], 4)
        noisy[f"{prefix}_texts"] = tf.where(pad, tf.constant("screw nail window tile paint brush"),
                                            features[f"{prefix}_texts"])
        noisy[f"{prefix}_weights"] = tf.where(pad, 1e6, features[f"{prefix}_weights"])
    np.testing.assert_allclose(scorer(noisy).numpy(), reference, rtol=0, atol=1e-6)
    # Whereas a real neighbour does count.
    changed = dict(features, i_o1_texts=tf.tensor_scatter_nd_update(
        features["i_o1_texts"], [[0, 0]], tf.constant(["paint brush"])))
    assert abs(scorer(changed).numpy()[0] - reference[0]) > 1e-6


def test_cold_start_pair_gets_the_zero_order_score(vocab):
    scorer = _tiny_student(vocab)
    token_scorer = scorer.get_layer(student.TOKEN_SCORER)
    zero_order = student.zero_order_scorer(token_scorer)
    queries, titles = ["red drill", "garden hose", "café lámpara"], ["red steel drill", "blue lamp", ""]
    cold = student.tokenize_features(scorer, student.string_features(_parsed(queries, titles, {}), 2, TOP_N))
    centre = {k: cold[k] for k in ("query_tokens", "title_tokens")}
    untrained_gate = zero_order(centre).numpy()
    # A trained term gate no longer weighs the query's tokens equally; the 0-order path uses it.
    gate = token_scorer.get_layer(student.VECTOR_SCORER).get_layer(student.QUERY_TERM_GATE)
    gate.set_weights([np.random.default_rng(0).normal(size=w.shape).astype(np.float32)
                      for w in gate.get_weights()])
    expected = zero_order(centre).numpy()
    assert np.abs(expected - untrained_gate).max() > 1e-4
    np.testing.assert_allclose(token_scorer(cold).numpy(), expected, rtol=0, atol=1e-6)
    # The same pairs with context score differently (so the comparison above means something).
    warm = student.string_features(_parsed(queries, titles, {"i_o1": [[("red drill", 0.9)]] * 3}), 2, TOP_N)
    assert np.abs(scorer(warm).numpy() - expected).max() > 1e-4
    # max_order = 0 (the k = 0 ablation) is exactly the 0-order path: its only inputs are the texts.
    ablation = _tiny_student(vocab, max_order=0)
    assert sorted(ablation.input) == ["item_title", "query"]
    assert ablation(student.string_features(_parsed(queries, titles, {}), 0, TOP_N)).shape == (3,)
    serving = berm_serving.build_serving_model(ablation, None)
    ablation_tokens = student.tokenize_features(ablation, {"query": tf.constant(queries),
                                                           "item_title": tf.constant(titles)})
    np.testing.assert_allclose(
        serving.serve_raw(tf.constant(queries), tf.constant(["P1"] * 3), tf.constant(titles))["score"],
        tf.sigmoid(ablation.get_layer(student.TOKEN_SCORER)(ablation_tokens)), rtol=0, atol=1e-6)
    assert serving.manifest["max_order"] == 0


def test_term_gating_can_be_switched_off(vocab):
    def layer_names(scorer):
        token_scorer = scorer.get_layer(student.TOKEN_SCORER)
        return [layer.name for layer in token_scorer.get_layer(student.VECTOR_SCORER).layers]

    assert student.QUERY_TERM_GATE in layer_names(_tiny_student(vocab))
    plain = _tiny_student(vocab, term_gating=False)
    assert student.QUERY_TERM_GATE not in layer_names(plain)
    # Without the gate the cold-start path is still exactly the 0-order scorer.
    token_scorer = plain.get_layer(student.TOKEN_SCORER)
    cold = student.tokenize_features(plain, student.string_features(
        _parsed(["red drill", "garden hose"], ["red steel drill", "blue lamp"], {}), 2, TOP_N))
    np.testing.assert_allclose(
        token_scorer(cold).numpy(),
        student.zero_order_scorer(token_scorer)(
            {k: cold[k] for k in ("query_tokens", "title_tokens")}).numpy(), rtol=0, atol=1e-6)


# --- Grouping per query and the ranking loss -----------------------------------------

def test_group_by_query_makes_single_query_lists():
    queries = ["red drill", "blue lamp"] * 7  # Interleaved.
    examples = tf.data.Dataset.from_tensor_slices({
        "query": tf.constant(queries), "_teacher_label": tf.linspace(0.0, 1.0, 14),
        "_human_label": tf.fill([14], -1.0), "x": tf.range(14)})
    lists = list(student.group_by_query(examples, list_size=4).as_numpy_iterator())
    assert len(lists) == 4  # 7 per query -> a full list of 4 and a padded one of 3, twice.
    seen = []
    for lst in lists:
        assert lst["query"].shape == (4,)
        real = lst["_teacher_label"] >= 0
        assert len(set(lst["query"][real])) == 1
        assert (lst["query"][~real] == b"").all()
        seen += list(lst["x"][real])
    assert sorted(seen) == list(range(14))
    assert sorted(int((lst["_teacher_label"] >= 0).sum()) for lst in lists) == [3, 3, 4, 4]


def test_training_batches_hold_one_query_per_list(tmp_path, vocab, world):
    q1, q2 = world["queries"][:2]
    items = {q: [i for qq, i in world["pairs"] if qq == q] for q in (q1, q2)}
    interleaved = [pair_record(world, q, items[q][k]) for k in range(6) for q in (q1, q2)]
    write_records(str(tmp_path / "data.gz"), [serialize(r) for r in interleaved])
    scorer = _tiny_student(vocab)
    config = student.StudentConfig.from_custom_config(dict(TINY, list_size=4, batch_size=8))
    features, labels = next(iter(student.make_dataset([str(tmp_path / "*")], scorer, config, training=True)))
    teacher = labels["teacher"].numpy()
    assert teacher.shape == (4, 4) and features["q_o1_tokens"].shape[:3] == (4, 4, TOP_N)
    tokens = features["query_tokens"].numpy()
    by_query = {}
    for lst in range(4):
        real = teacher[lst] >= 0
        assert len({tuple(t) for t in tokens[lst][real]}) == 1  # One query per list.
        assert (tokens[lst][~real] == 0).all()
        by_query.setdefault(tuple(tokens[lst][real][0]), []).extend(sorted(teacher[lst][real]))
    expected = {q: sorted(r["teacher_score"] for r in interleaved if r["query"] == q) for q in (q1, q2)}
    np.testing.assert_allclose(sorted(sorted(v) for v in by_query.values()), sorted(expected.values()), atol=1e-6)
    # The listwise loss is a mean over lists, padding ignored: per-list losses average to the batch loss.
    logits = tf.random.stateless_normal(teacher.shape, seed=[1, 2])
    for name in student.RANKING_LOSSES:
        loss = student.ranking_loss(name)
        per_list = [float(loss(teacher[i:i + 1], logits[i:i + 1])) for i in range(4)]
        assert float(loss(teacher, logits)) == pytest.approx(np.mean(per_list), rel=1e-5), name


# --- Distillation through run_fn ------------------------------------------------------

def _ndcg(gains, scores, k=5):
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    ideal = np.sort(gains)[::-1][:k]
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    return (np.asarray(gains)[order] * discount[:len(order)]).sum() / (ideal * discount[:len(ideal)]).sum()


def test_tiny_student_distils_the_teacher(distilled):
    history = distilled["history"].history
    assert len(history["loss"]) == EPOCHS
    assert history["loss"][-1] < history["loss"][0]
    assert {"teacher_ndcg_5", "teacher_ndcg_10", "teacher_auc", "human_auc", "val_teacher_ndcg_5",
            "val_loss", "teacher_pointwise_loss", "human_loss"} <= set(history)
    with open(os.path.join(distilled["fn_args"].model_run_dir, student.HISTORY_FILE)) as f:
        assert json.load(f)["loss"] == pytest.approx(history["loss"])
    records = distilled["eval"]
    scores = distilled["loaded"].signatures["serving_default"](
        examples=tf.constant([serialize(r) for r in records]))["score"].numpy()
    teacher = np.array([r["teacher_score"] for r in records])
    rho = stats.spearmanr(scores, teacher).correlation
    assert rho > 0.5, rho
    rng = np.random.default_rng(0)
    ndcg, shuffled = [], []
    for query in {r["query"] for r in records}:
        idx = [i for i, r in enumerate(records) if r["query"] == query]
        ndcg.append(_ndcg(teacher[idx], scores[idx]))
        shuffled.append(np.mean([_ndcg(teacher[idx], rng.permutation(len(idx))) for _ in range(20)]))
    assert np.mean(ndcg) > np.mean(shuffled) + 0.1, (np.mean(ndcg), np.mean(shuffled))


# --- The export -------------------------------------------------------------------------

def test_export_signatures_and_manifest(distilled, world):
    loaded, model_dir = distilled["loaded"], distilled["fn_args"].serving_model_dir
    assert set(loaded.signatures) == {"serving_default", student.RAW_SIGNATURE}
    default = loaded.signatures["serving_default"]
    assert list(default.structured_input_signature[1]) == ["examples"]
    assert default.structured_input_signature[1]["examples"].dtype == tf.string
    raw = loaded.signatures[student.RAW_SIGNATURE]
    assert sorted(raw.structured_input_signature[1]) == ["item_id", "item_title", "query"]
    assert all(spec.dtype == tf.string and spec.shape.as_list() == [None]
               for spec in raw.structured_input_signature[1].values())
    assert list(raw.structured_outputs) == ["score"] and raw.structured_outputs["score"].dtype == tf.float32
    manifest = berm_serving.read_manifest(model_dir)
    assert manifest["max_order"] == 2 and manifest["max_context_texts"] == TOP_N
    tables = manifest["tables"]
    assert tables["nodes"] == {"query": len(world["queries"]), "item": len({i for _, i in world["pairs"]})}
    assert sum(tables["records"].values()) == distilled["num_tables"]
    assert len(tables["source_files"]) == 1 and len(tables["source_files"][0]["sha256"]) == 64
    assert manifest["student_config"]["neighbour_tables_dir"] == distilled["tables"]
    # The token embedding ships evaluated for the whole vocabulary (serving gathers its rows).
    assert manifest["token_vectors_shape"] == [len(berm_layers.read_vocab(VOCAB_FILE)),
                                               TINY["embedding_dim"]]
    # The tables are weights, not constants of the graph, which a GraphDef's 2 GB would cap.
    with open(os.path.join(model_dir, "saved_model.pb"), "rb") as f:
        graph = f.read()
    node_ids = world["queries"] + [i for _, i in world["pairs"] if i.startswith("Q")]
    assert [n for n in node_ids if n.encode() in graph] == []


def test_serve_raw_answers_raw_strings_and_unknown_ids(distilled, world):
    loaded = distilled["loaded"]
    serve_raw, serve_examples = loaded.signatures[student.RAW_SIGNATURE], loaded.signatures["serving_default"]
    records = distilled["eval"][:40] + [pair_record(world, q, i) for q, i in world["pairs"][:20]]
    raw = serve_raw(query=tf.constant([r["query"] for r in records]),
                    item_id=tf.constant([r["item_id"] for r in records]),
                    item_title=tf.constant([r["item_title"] for r in records]))["score"].numpy()
    by_example = serve_examples(examples=tf.constant([serialize(r) for r in records]))["score"].numpy()
    assert raw.shape == (60,) and ((raw > 0) & (raw < 1)).all()
    # Known pairs: the in-model tables give exactly the contexts the examples carry.
    np.testing.assert_allclose(raw, by_example, rtol=0, atol=1e-5)

    known_query, known_item = records[0]["query"], records[0]["item_id"]
    title = records[0]["item_title"]
    queries = ["never seen query", known_query, "never seen query", f"  {known_query} ", "", "café ñandú 💡"]
    item_ids = ["NO-SUCH-ITEM", "NO-SUCH-ITEM", known_item, known_item, "", "NO-SUCH-ITEM"]
    got = serve_raw(query=tf.constant(queries), item_id=tf.constant(item_ids),
                    item_title=tf.constant([title] * 6))["score"].numpy()
    assert got.shape == (6,) and np.isfinite(got).all()
    # Unknown query and item: the cold-start path = an example without any context.
    cold = [pair_record(world, q, known_item, contexts=False) | {"item_title": title, "query": q}
            for q in (queries[0], queries[4], queries[5])]
    partial = pair_record(world, known_query, known_item, served_item=item_ids[1])
    for key in ("i_o1_texts", "i_o1_weights", "i_o2_texts", "i_o2_weights"):
        partial[key] = []  # Known query, unknown item: only the query's contexts.
    item_only = pair_record(world, known_query, known_item, served_query=queries[2])
    for key in ("q_o1_texts", "q_o1_weights", "q_o2_texts", "q_o2_weights"):
        item_only[key] = []
    item_only["query"] = queries[0]
    expected = serve_examples(examples=tf.constant(
        [serialize(r) for r in (cold[0], partial, item_only, cold[1], cold[2])]))["score"].numpy()
    np.testing.assert_allclose(got[[0, 1, 2, 4, 5]], expected, rtol=0, atol=1e-5)
    assert got[3] == pytest.approx(by_example[0], abs=1e-5)  # Surrounding spaces are stripped.


def test_separate_component_rebuilds_berm_o_from_the_export(distilled, world, tmp_path):
    """A later component: re-load the exported scorer, build BERM-O with (new) tables, export."""
    scorer = berm_serving.load_scorer(distilled["fn_args"].serving_model_dir)
    tables = str(tmp_path / "tables")
    write_tables(world, tables)
    serving = berm_serving.build_serving_model(scorer, tables)
    records = distilled["eval"][:10]
    args = [tf.constant([r[k] for r in records]) for k in ("query", "item_id", "item_title")]
    expected = distilled["loaded"].signatures[student.RAW_SIGNATURE](
        query=args[0], item_id=args[1], item_title=args[2])["score"].numpy()
    np.testing.assert_allclose(serving.serve_raw(*args)["score"].numpy(), expected, rtol=0, atol=1e-5)
    assert serving.manifest["tables"]["fingerprint"] == \
        berm_serving.read_manifest(distilled["fn_args"].serving_model_dir)["tables"]["fingerprint"]


def table_record(side, node, order, ids, texts, weights, metapath=None):
    return metapaths.neighbour_record_to_tf_example({
        "side": side, "node_id": node, "order": order, "neighbour_ids": ids, "neighbour_texts": texts,
        "neighbour_weights": weights,
        "metapath": metapaths.metapath_name(side, order) if metapath is None else metapath,
    }).SerializeToString()


def test_neighbour_tables_read_into_arrays(tmp_path, monkeypatch):
    write_records(str(tmp_path / "tables-0.gz"), [
        table_record("query", "drill", 1, ["P1", "P2", "P3", "P4"],
                     ["cordless drill", "hammer drill", "drill bit", "saw"], [0.9, 0.8, 0.7, 0.6]),
        table_record("item", "P1", 1, ["drill", "driver"], ["drill", "driver"], [0.5, 0.25]),
        table_record("query", "drill", 2, ["driver", "saw", "bit"], ["driver", "saw", "bit"],
                     [0.3, 0.2, 0.1], metapath=""),
    ])
    with tf.io.TFRecordWriter(str(tmp_path / "tables-1")) as writer:  # not gzipped
        for record in (
                table_record("query", "café", 1, ["P2"], ["hammer drill", "extra"], [1.0]),
                table_record("query", "bob", 3, ["x"], ["never"], [1.0]),  # above max_order
                table_record("item", "P2", 2, [], [], [])):
            writer.write(record)
    data = berm_serving.read_neighbour_tables(str(tmp_path), max_order=2, max_context_texts=2)

    assert data.keys == {"query": ["café", "drill"], "item": ["P1", "P2"]}  # row = place + 1
    assert data.records == {"query_o1": 2, "query_o2": 1, "item_o1": 1, "item_o2": 1}
    # Texts are numbered from 1 in the order they are first met: side, order, then records read.
    assert data.texts == ["cordless drill", "hammer drill", "drill bit", "driver", "saw", "drill"]
    # Order 1 keeps one entry more than served (the lookup may drop the pair itself); a record
    # keeps no more entries than its shortest list.
    np.testing.assert_array_equal(data.neighbours["query_o1"], [[0, 0, 0], [2, 0, 0], [1, 2, 3]])
    np.testing.assert_array_equal(data.weights["query_o1"],
                                  np.array([[0, 0, 0], [1.0, 0, 0], [0.9, 0.8, 0.7]], np.float32))
    np.testing.assert_array_equal(data.neighbour_ids["query_o1"],
                                  [[b"", b"", b""], [b"P2", b"", b""], [b"P1", b"P2", b"P3"]])
    np.testing.assert_array_equal(data.neighbours["query_o2"], [[0, 0], [0, 0], [4, 5]])
    np.testing.assert_array_equal(data.weights["query_o2"], np.array([[0, 0], [0, 0], [0.3, 0.2]], np.float32))
    np.testing.assert_array_equal(data.neighbours["item_o1"], [[0, 0, 0], [6, 4, 0], [0, 0, 0]])
    np.testing.assert_array_equal(data.neighbour_ids["item_o1"],
                                  [[b"", b"", b""], [b"drill", b"driver", b""], [b"", b"", b""]])
    np.testing.assert_array_equal(data.neighbours["item_o2"], np.zeros([3, 2]))
    assert sorted(data.neighbour_ids) == ["item_o1", "query_o1"]
    assert [f["name"] for f in data.source_files] == ["tables-0.gz", "tables-1"]
    assert data.fingerprint() == berm_serving.read_neighbour_tables(str(tmp_path), 2, 2).fingerprint()

    # Texts and nodes are made distinct by their fingerprints; were every fingerprint the same,
    # the check behind them would fall back to comparing the strings themselves.
    monkeypatch.setattr(tf.strings, "to_hash_bucket_fast", lambda strings, _: tf.zeros_like(strings, tf.int64))
    collided = berm_serving.read_neighbour_tables(str(tmp_path), max_order=2, max_context_texts=2)
    assert collided.texts == data.texts and collided.keys == data.keys
    assert collided.fingerprint() == data.fingerprint()


def test_neighbour_tables_reject_inconsistent_records(tmp_path):
    def read(name, *files):
        for i, records in enumerate(files):
            write_records(str(tmp_path / name / f"tables-{i}.gz"), records)
        return berm_serving.read_neighbour_tables(str(tmp_path / name), 2, 5)

    good = table_record("query", "drill", 1, ["P1"], ["red drill"], [1.0])
    with pytest.raises(ValueError, match="metapath 'q-i' does not match side query and order 2"):
        read("metapath", [good, table_record("query", "red drill", 2, ["P1"], ["red drill"], [1.0], "q-i")])
    with pytest.raises(ValueError, match="unknown side 'shop' for node 'P1'"):
        read("side", [good, table_record("shop", "P1", 1, ["q"], ["q"], [1.0], "")])
    with pytest.raises(ValueError, match="order 4 outside 1..3 for item 'P1'"):
        read("order", [table_record("item", "P1", 4, ["q"], ["q"], [1.0], "")])
    with pytest.raises(ValueError, match=r"tables-1.gz: query node 'drill' has two order-1 records"):
        read("twice", [good], [table_record("query", "other", 1, ["P2"], ["t"], [1.0]), good])
    with pytest.raises(FileNotFoundError):
        berm_serving.read_neighbour_tables(str(tmp_path / "missing"), 2, 5)


def test_berm_o_refuses_node_ids_that_share_a_fingerprint(tmp_path, vocab, monkeypatch):
    """Its lookup knows a node by its id's 64-bit fingerprint, so two ids must not share one."""
    scorer = _tiny_student(vocab)
    write_records(str(tmp_path / "spaces" / "tables-0.gz"), [
        table_record("query", "drill", 1, ["P1"], ["red drill"], [1.0]),
        table_record("query", " drill ", 1, ["P2"], ["blue drill"], [1.0])])
    with pytest.raises(ValueError, match="BERM-O's query ids: ' drill ' and 'drill' repeat after "
                                         "stripping whitespace"):
        berm_serving.build_serving_model(scorer, str(tmp_path / "spaces"))
    write_records(str(tmp_path / "collide" / "tables-0.gz"), [
        table_record("item", "P1", 1, ["drill"], ["drill"], [1.0]),
        table_record("item", "P2", 1, ["saw"], ["saw"], [1.0])])
    berm_serving.build_serving_model(scorer, str(tmp_path / "collide"))
    monkeypatch.setattr(berm_layers, "text_fingerprints", lambda texts: tf.zeros_like(texts, tf.int64))
    with pytest.raises(ValueError, match="BERM-O's item ids: 'P1' and 'P2' .* share a fingerprint"):
        berm_serving.build_serving_model(scorer, str(tmp_path / "collide"))


# --- The pretrained-embedding path ------------------------------------------------------

def test_student_with_teacher_embeddings_builds_and_scores():
    # The weights package is pinned in requirements.txt: its absence is a broken install.
    assert bert_checkpoint.find_pretrained_dir() is not None, f"{bert_checkpoint.PRETRAINED_PIP_NAME} is not installed"
    config = student.StudentConfig.from_custom_config(dict(TINY, init_from_teacher_embeddings=True))
    scorer = student.student_from_config(config)
    embedding = scorer.get_layer(student.TOKEN_SCORER).get_layer(student.EMBEDDING_LAYER)
    assert embedding.pretrained.shape == (30522, 384) and not embedding.pretrained.trainable
    assert embedding.kernel.shape == (384, 16) and embedding.kernel.trainable
    assert float(tf.reduce_max(tf.abs(embedding.pretrained))) > 0  # The teacher's weights, loaded.
    params = student.count_params(scorer)
    # The table, each row's int8 scale (the default frozen_table_dtype) and each token's mean weight.
    assert embedding.pretrained.dtype == tf.int8
    assert params["non_trainable"] == 30522 * 384 + 30522 + 30522
    logits = scorer(student.string_features(_parsed(["cordless drill"], ["dewalt cordless drill"], {}), 2, TOP_N))
    assert logits.shape == (1,) and np.isfinite(logits.numpy()).all()


# --- The title-vector path --------------------------------------------------------------

def test_student_with_title_vectors_trains_exports_and_serves(tmp_path, world):
    """run_fn with the TitleEncoder's vectors: the table travels in BERM-O, both signatures and a
    re-loaded scorer agree, unknown titles take the fallback, and cold start is still 0-order."""
    from trainer import sentence_vectors

    titles = sorted(set(world["titles"].values()))
    train_queries = world["queries"][:30]
    encoder = sentence_vectors.SentenceEncoder()
    vectors_dir = tmp_path / "title_vectors"
    os.makedirs(vectors_dir)
    with tf.io.TFRecordWriter(str(vectors_dir / "vectors-00000-of-00001.gz"), "GZIP") as writer:
        for kind, texts in (("title", titles), ("query", train_queries)):
            for text, vector in zip(texts, encoder.encode(texts)):
                writer.write(sentence_vectors.to_tf_example(text, kind, vector).SerializeToString())
    split = {"train": [], "eval": []}
    for query, item_id in world["pairs"]:
        split["train" if query in train_queries else "eval"].append(pair_record(world, query, item_id))
    for name, records in split.items():
        write_records(str(tmp_path / f"Split-{name}" / "data.gz"), [serialize(r) for r in records])
    tables = str(tmp_path / "tables")
    write_tables(world, tables)
    fn_args = FnArgs(
        train_files=[str(tmp_path / "Split-train" / "*")], eval_files=[str(tmp_path / "Split-eval" / "*")],
        serving_model_dir=str(tmp_path / "serving_model"), model_run_dir=str(tmp_path / "model_run"),
        custom_config=dict(TINY, init_from_teacher_embeddings=True, max_order=1, epochs=2, batch_size=4,
                           neighbour_tables_dir=tables, title_vectors_dir=str(vectors_dir)))
    student.run_fn(fn_args)
    model_dir = fn_args.serving_model_dir
    assert berm_serving.read_manifest(model_dir)["title_vectors"] == len(titles)

    loaded = tf.saved_model.load(model_dir)
    serve_raw, serve_examples = loaded.signatures[student.RAW_SIGNATURE], loaded.signatures["serving_default"]
    records = split["eval"][:30]
    unknown = dict(records[0], item_title="a title the encoder never saw")
    records.append(unknown)
    raw = serve_raw(query=tf.constant([r["query"] for r in records]),
                    item_id=tf.constant([r["item_id"] for r in records]),
                    item_title=tf.constant([r["item_title"] for r in records]))["score"].numpy()
    by_example = serve_examples(examples=tf.constant([serialize(r) for r in records]))["score"].numpy()
    assert np.isfinite(raw).all()
    np.testing.assert_allclose(raw, by_example, rtol=0, atol=1e-5)
    assert abs(raw[-1] - raw[0]) > 1e-4  # The unknown title is matched through the fallback map.

    # The table is part of the scorer's weights: a re-loaded scorer rebuilds the same BERM-O.
    scorer = berm_serving.load_scorer(model_dir)
    assert scorer.get_layer(student.TOKEN_SCORER).get_layer(
        student.EMBEDDING_LAYER).mean_weights.numpy().min() < 1.0  # title_map_sif's weights
    rebuilt = berm_serving.build_serving_model(scorer, tables)
    args = [tf.constant([r[k] for r in records]) for k in ("query", "item_id", "item_title")]
    np.testing.assert_allclose(rebuilt.serve_raw(*args)["score"].numpy(), raw, rtol=0, atol=1e-5)

    # A pair without context still gets exactly the 0-order score, the title path included.
    token_scorer = scorer.get_layer(student.TOKEN_SCORER)
    cold = student.tokenize_features(scorer, student.string_features(
        _parsed([r["query"] for r in records], [r["item_title"] for r in records], {}), 1, TOP_N))
    zero_order = student.zero_order_scorer(token_scorer)
    np.testing.assert_allclose(token_scorer(cold).numpy(), zero_order(
        {k: cold[k] for k in zero_order.input}).numpy(), rtol=0, atol=1e-5)
    match = token_scorer.get_layer(student.VECTOR_SCORER).get_layer(student.SENTENCE_MATCH)
    assert match.query_map.trainable and not match.fallback_map.trainable
    # The fallback reads the unknown title's letter trigrams (title_trigram_buckets, default on).
    assert student.title_trigrams_layer(scorer) is not None and not match.title_trigram_map.trainable
    assert np.abs(match.title_trigram_map.numpy()).sum() > 0


def test_smooth_inverse_frequency_weighs_common_tokens_down_in_the_title_paths_means(vocab):
    """title_map_sif: the WordPiece means that stand in for sentence vectors weigh each token by
    a / (a + its share of the logged texts' tokens), so a token in every text counts least."""
    from trainer import sentence_vectors

    titles = ["steel hammer", "steel saw", "steel door", "wood chair"]
    queries = ["steel drill"]
    rng = np.random.default_rng(0)
    vectors = sentence_vectors.SentenceVectors(titles, rng.normal(size=(4, 5)).astype(np.float32),
                                               queries, rng.normal(size=(1, 5)).astype(np.float32))
    scorer = student.build_student(vocab, 0, pretrained_embeddings=rng.normal(
        size=(len(vocab), 6)).astype(np.float32), embedding_dim=4, hidden_dim=4,
        title_table=(titles, vectors.title_vectors))
    embed = scorer.get_layer(student.TOKEN_SCORER).get_layer(student.EMBEDDING_LAYER)
    fits = student.init_title_vector_path(scorer, vectors, sif=0.1)
    weights = embed.mean_weights.numpy()
    index = {token: i for i, token in enumerate(vocab)}
    # 10 tokens: "steel" 4 (share 0.4), "hammer" 1 (0.1); "lamp" never seen.
    np.testing.assert_allclose(weights[[index["steel"], index["hammer"], index["lamp"]]],
                               [0.1 / 0.5, 0.1 / 0.2, 1.0], rtol=1e-6)
    ids = scorer.get_layer(student.TITLE_WORDPIECE)(tf.constant(["steel hammer"]))
    table = embed.pretrained.numpy()
    np.testing.assert_allclose(
        embed(ids, pretrained_mean=True).numpy()[0],
        (0.2 * table[index["steel"]] + 0.5 * table[index["hammer"]]) / 0.7, rtol=1e-5)
    assert fits["titles"] == 4 and fits["queries"] == 1
    # 0 keeps the plain mean.
    plain = student.build_student(vocab, 0, pretrained_embeddings=table, embedding_dim=4, hidden_dim=4,
                                  title_table=(titles, vectors.title_vectors))
    student.init_title_vector_path(plain, vectors, sif=0.0)
    np.testing.assert_array_equal(
        plain.get_layer(student.TOKEN_SCORER).get_layer(student.EMBEDDING_LAYER).mean_weights.numpy(), 1.0)


def _variable_bytes(model_dir):
    """{variable name: (dtype, bytes)} of a SavedModel's checkpoint."""
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "variables", "variables"))
    dtypes = reader.get_variable_to_dtype_map()
    return {name: (dtypes[name], tf.TensorShape(shape).num_elements() * dtypes[name].size)
            for name, shape in reader.get_variable_to_shape_map().items()}


def _frozen_table_students(vocab, tmp_path, dtypes, seed):
    """Tiny 0-order students with title vectors, one per frozen table dtype (the same seed),
    each exported to tmp_path / dtype; and the titles, embeddings and vectors they hold."""
    rng = np.random.default_rng(seed)
    titles = ["steel hammer", "wood chair", "garden hose"]
    pretrained = rng.normal(size=(len(vocab), 6)).astype(np.float32)
    title_vectors = rng.normal(size=(3, 5)).astype(np.float32)
    models = {}
    for dtype in dtypes:
        tf.keras.utils.set_random_seed(0)
        models[dtype] = student.build_student(
            vocab, 0, pretrained_embeddings=pretrained, embedding_dim=4, hidden_dim=4,
            title_table=(titles, title_vectors), frozen_table_dtype=dtype)
        berm_serving.export_serving_model(models[dtype], str(tmp_path / dtype))
    return models, titles, pretrained, title_vectors


def _assert_tables_read_as(scorer, dtype, titles, pretrained, title_vectors, read):
    """The scorer's two frozen tables are stored as `dtype` and read as float32 `read(rows)`:
    the title table's lookups (an unknown title: zeros) and the pretrained means."""
    embed = scorer.get_layer(student.TOKEN_SCORER).get_layer(student.EMBEDDING_LAYER)
    table = student.title_vector_table(scorer)
    assert embed.pretrained.dtype == dtype and table.vectors.dtype == dtype
    got, known = table(tf.constant(titles[::-1] + ["no such title"]))
    assert got.dtype == tf.float32 and known.numpy().tolist() == [True, True, True, False]
    np.testing.assert_array_equal(got.numpy()[:3], read(title_vectors[::-1]))
    ids = scorer.get_layer(student.TITLE_WORDPIECE)(tf.constant(["steel hammer"]))
    real = ids.numpy()[0][ids.numpy()[0] != 0]
    np.testing.assert_allclose(embed(ids, pretrained_mean=True).numpy()[0],
                               read(pretrained)[real].mean(0), rtol=1e-6)
    return embed, table


def test_frozen_tables_are_stored_as_float16_and_read_as_float32(vocab, tmp_path):
    """student.frozen_table_dtype: the teacher's WordPiece embeddings and the title vectors take
    half the bytes in the student and in BERM-O, are read back as float32 in both (serve_raw
    scores as the scorer does), and stay float16 through a reload; `with_frozen_table_dtype`
    copies a scorer with them stored the other way. A model saved before the setting (no
    table_dtype in its layers' configs) keeps float32 tables."""
    models, titles, pretrained, title_vectors = _frozen_table_students(
        vocab, tmp_path, ("float32", "float16"), seed=0)
    scorer = models["float16"]
    embed, table = _assert_tables_read_as(scorer, tf.float16, titles, pretrained, title_vectors,
                                          lambda x: x.astype(np.float16).astype(np.float32))
    # Half the bytes of the two tables, nothing else changed.
    full, half = _variable_bytes(str(tmp_path / "float32")), _variable_bytes(str(tmp_path / "float16"))
    assert sorted(full) == sorted(half)
    changed = {name for name in half if half[name] != full[name]}
    assert {half[name][0] for name in changed} == {tf.float16} and len(changed) == 2
    assert sum(full[n][1] - half[n][1] for n in changed) == (pretrained.size + title_vectors.size) * 2
    # BERM-O scores what the scorer does, with the tables as stored; so does a reloaded scorer.
    queries, items = ["steel saw", "hose", "chair"], ["steel hammer", "garden hose", "new title"]
    direct = tf.sigmoid(scorer({student.QUERY_KEY: tf.constant(queries),
                                student.TITLE_KEY: tf.constant(items)})).numpy()
    loaded = tf.saved_model.load(str(tmp_path / "float16"))
    served = loaded.signatures[student.RAW_SIGNATURE](
        query=tf.constant(queries), item_id=tf.constant(["a", "b", "c"]),
        item_title=tf.constant(items))["score"].numpy()
    np.testing.assert_allclose(served, direct, rtol=0, atol=1e-6)
    reloaded = berm_serving.load_scorer(str(tmp_path / "float16"))
    assert student.title_vector_table(reloaded).vectors.dtype == tf.float16
    for dtype in ("float32", "float16"):
        assert berm_serving.read_manifest(str(tmp_path / dtype))["frozen_table_dtypes"] == {
            "pretrained_token_embeddings": dtype, "title_vectors": dtype}
    # Copies with the tables stored the other way: to float32 exact, to float16 rounded.
    widened = student.with_frozen_table_dtype(reloaded, "float32")
    assert student.title_vector_table(widened).vectors.dtype == tf.float32
    np.testing.assert_array_equal(tf.sigmoid(widened({student.QUERY_KEY: tf.constant(queries),
                                                      student.TITLE_KEY: tf.constant(items)})), direct)
    halved = student.with_frozen_table_dtype(models["float32"], "float16")
    for copied, built in ((student.title_vector_table(halved).vectors, table.vectors),
                          (halved.get_layer(student.TOKEN_SCORER).get_layer(student.EMBEDDING_LAYER)
                           .pretrained, embed.pretrained)):
        assert copied.dtype == tf.float16
        np.testing.assert_array_equal(copied.numpy(), built.numpy())
    # Before the setting existed the layers' configs had no table_dtype.
    old_table = berm_layers.TitleVectorTable.from_config({"name": "t", "size": 2, "dim": 3})
    old_embedding = berm_layers.TokenEmbedding.from_config(
        {"name": "e", "vocab_size": 6, "embedding_dim": 2, "pretrained_dim": 3})
    old_table.build(tf.TensorShape([None]))
    old_embedding.build(tf.TensorShape([None]))
    assert old_table.vectors.dtype == tf.float32 and old_embedding.pretrained.dtype == tf.float32
    with pytest.raises(ValueError, match="one of .'float32', 'float16'.*'bfloat16'"):
        student.StudentConfig(frozen_table_dtype="bfloat16")


def test_int8_frozen_tables_keep_a_scale_per_row(vocab, tmp_path):
    """frozen_table_dtype "int8": each row of the two frozen tables is stored as int8 times its
    own float32 scale (largest magnitude / 127), within half a step of the float32 row; training
    and BERM-O read the same dequantized rows; the tables take a quarter of the float32 bytes
    plus 4 bytes a row; copies to float32 score exactly as the int8 scorer, and an int8 copy of a
    float32 scorer holds what a scorer built int8 does."""
    rows = np.array([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0], [1e-3, 3e-3, -2e-3]], np.float32)
    values, scale = berm_layers.stored_rows(rows, "int8")
    assert values.dtype == np.int8 and scale.dtype == np.float32
    np.testing.assert_allclose(scale, [2.0 / 127, 0.0, 3e-3 / 127], rtol=1e-6)
    dequantized = values.astype(np.float32) * scale[:, np.newaxis]
    assert np.all(np.abs(dequantized - rows) <= scale[:, np.newaxis] / 2 + 1e-9)
    assert np.abs(values).max(axis=1).tolist() == [127, 0, 127]  # each row's largest is exact
    assert berm_layers.stored_rows(rows, "float16")[1] is None

    models, titles, pretrained, title_vectors = _frozen_table_students(
        vocab, tmp_path, ("float32", "int8"), seed=1)
    scorer = models["int8"]
    embed, table = _assert_tables_read_as(
        scorer, tf.int8, titles, pretrained, title_vectors,
        lambda x: (lambda v, s: v.astype(np.float32) * s[:, np.newaxis])(
            *berm_layers.stored_rows(x, "int8")))
    full, small = _variable_bytes(str(tmp_path / "float32")), _variable_bytes(str(tmp_path / "int8"))
    added = set(small) - set(full)
    assert len(added) == 2 and {small[name][0] for name in added} == {tf.float32}
    assert sum(small[name][1] for name in added) == 4 * (len(vocab) + len(titles))
    changed = {name for name in full if small[name] != full[name]}
    assert {small[name][0] for name in changed} == {tf.int8} and len(changed) == 2
    assert sum(small[n][1] for n in changed) * 4 == sum(full[n][1] for n in changed)
    queries, items = ["steel saw", "hose", "chair"], ["steel hammer", "garden hose", "new title"]
    features = {student.QUERY_KEY: tf.constant(queries), student.TITLE_KEY: tf.constant(items)}
    direct = tf.sigmoid(scorer(features)).numpy()
    served = tf.saved_model.load(str(tmp_path / "int8")).signatures[student.RAW_SIGNATURE](
        query=tf.constant(queries), item_id=tf.constant(["a", "b", "c"]),
        item_title=tf.constant(items))["score"].numpy()
    np.testing.assert_allclose(served, direct, rtol=0, atol=1e-6)
    assert berm_serving.read_manifest(str(tmp_path / "int8"))["frozen_table_dtypes"] == {
        "pretrained_token_embeddings": "int8", "title_vectors": "int8"}
    reloaded = berm_serving.load_scorer(str(tmp_path / "int8"))
    widened = student.with_frozen_table_dtype(reloaded, "float32")
    assert student.title_vector_table(widened).vectors.dtype == tf.float32
    np.testing.assert_array_equal(tf.sigmoid(widened(features)).numpy(), direct)
    narrowed = student.with_frozen_table_dtype(models["float32"], "int8")
    for copied, built in (
            (student.title_vector_table(narrowed), table),
            (narrowed.get_layer(student.TOKEN_SCORER).get_layer(student.EMBEDDING_LAYER), embed)):
        for copied_part, built_part in zip(copied.frozen_table(), built.frozen_table()):
            assert copied_part.dtype == built_part.dtype
            np.testing.assert_array_equal(copied_part.numpy(), built_part.numpy())


def _trigram_scorer(vocab, titles, rng):
    """A tiny 0-order string scorer whose title table holds `titles` (random vectors, also
    returned) and whose fallback reads letter trigrams."""
    from trainer import sentence_vectors

    vectors = sentence_vectors.SentenceVectors(
        titles, rng.normal(size=(len(titles), 5)).astype(np.float32), [], np.zeros([0, 5], np.float32))
    scorer = student.build_student(vocab, 0, pretrained_embeddings=rng.normal(
        size=(len(vocab), 6)).astype(np.float32), embedding_dim=4, hidden_dim=4,
        title_table=(titles, vectors.title_vectors), title_trigram_buckets=32)
    return scorer, vectors


def test_title_trigram_bags_are_what_the_fallback_reads(vocab, tmp_path):
    """The ridge fit's trigram bags give each title the sum the serving path computes, and the
    fallback can be fitted again on fewer titles, with the ridge penalty it was started with
    (also in a reloaded model)."""
    from trainer import sentence_vectors

    titles = ["steel hammer", "steel saw 1/2 in.", "wood chair", "x"]
    rng = np.random.default_rng(0)
    scorer, vectors = _trigram_scorer(vocab, titles, rng)
    fits = student.init_title_vector_path(scorer, vectors, l2=0.5)
    assert fits["titles"] == 4 and fits["queries"] == 0
    scorer.save(str(tmp_path / "scorer"))
    scorer = tf.keras.models.load_model(str(tmp_path / "scorer"), compile=False)
    bags = student.trigram_bags(scorer, titles)
    assert bags.shape == (4, 32)
    rows = rng.normal(size=(32, 3)).astype(np.float32)
    ids = student.title_trigrams_layer(scorer)(tf.constant(titles))
    np.testing.assert_allclose(bags @ rows, berm_layers.trigram_sums(tf.constant(rows), ids).numpy(),
                               rtol=1e-5, atol=1e-6)
    # Fitted again on fewer titles (items never logged), the fallback is their ridge fit alone
    # and the query map stays as it was.
    match = scorer.get_layer(student.TOKEN_SCORER).get_layer(student.VECTOR_SCORER).get_layer(
        student.SENTENCE_MATCH)
    query_map = match.query_map.numpy()
    student.fit_title_fallback(scorer, titles[:3], vectors.title_vectors[:3])
    fallback, trigram_map = sentence_vectors.fit_linear_maps_with_bags(
        student.static_means(scorer, titles[:3], student.TITLE_WORDPIECE), bags[:3],
        vectors.title_vectors[:3], l2=0.5)
    np.testing.assert_allclose(match.fallback_map.numpy(), fallback, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(match.title_trigram_map.numpy(), trigram_map, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(match.query_map.numpy(), query_map)


def test_string_scorer_normalises_a_title_once_and_scores_as_training_tokenises(
        vocab, tmp_path, monkeypatch):
    """The string scorer's own graph (BERM-O's `serving_default`) hands the title WordPiece
    layer's normalised text to the trigram layer instead of normalising it again, and scores
    as the tokenisation training uses (`tokenize_features`), also after a reload."""
    flags = []
    trigram_ids = berm_layers.LetterTrigrams._trigram_ids
    monkeypatch.setattr(berm_layers.LetterTrigrams, "_trigram_ids",
                        lambda self, texts, normalized=False: flags.append(normalized)
                        or trigram_ids(self, texts, normalized))
    scorer, vectors = _trigram_scorer(vocab, ["steel hammer", "wood chair"],
                                      np.random.default_rng(0))
    assert flags and all(flags)
    student.init_title_vector_path(scorer, vectors)
    # Known titles, and unknown ones (the trigrams are cut) with accents, case and control
    # characters that normalisation changes.
    queries = ["steel hammer", "chair", "crème brûlée torch", "drill"]
    pairs = ["steel hammer", "Wood Chair", "Crème Brûlée TORCH", "DEWALT 20V\tdrill\x07"]
    features = student.string_features(_parsed(queries, pairs, {}), 0, TOP_N)
    scorer.save(str(tmp_path / "scorer"))
    reloaded = tf.keras.models.load_model(str(tmp_path / "scorer"), compile=False)
    for model in (scorer, reloaded):
        by_training = model.get_layer(student.TOKEN_SCORER)(
            student.tokenize_features(model, features)).numpy()
        np.testing.assert_allclose(model(features).numpy(), by_training, rtol=0, atol=1e-6)
        assert len(set(np.round(by_training, 6))) == len(pairs)


def test_title_vectors_need_the_teacher_embeddings(tmp_path):
    config = student.StudentConfig.from_custom_config(dict(TINY, title_vectors_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="title-vector path needs them"):
        student.student_from_config(config)
