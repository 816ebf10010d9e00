"""trainer.text_encoding: in-graph (query, title) -> BERT inputs, checked against the HF tokenizer.

Token ids in fixtures/minilm_reference.npz come from the Hugging Face tokenizer
of all-MiniLM-L6-v2 (see fixtures/make_minilm_reference.py).
"""
import os

import numpy as np
import pytest

import tensorflow as tf  # noqa: E402

from trainer import bert_checkpoint  # noqa: E402
from trainer import text_encoding as te  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.npz")
VOCAB = bert_checkpoint.vocab_file()
# The weights package (and its vocab) is pinned in requirements.txt: absent means a broken install.
assert VOCAB is not None, f"{bert_checkpoint.PRETRAINED_PIP_NAME} (the vocab) is not installed (make install)"

CLS, SEP, PAD, UNK = 101, 102, 0, 100
SEQ = 48


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE))


@pytest.fixture(scope="module")
def encoder():
    return te.QueryTitleEncoder(VOCAB, max_seq_length=SEQ)


def _encode(layer, queries, titles):
    out = layer({te.QUERY_KEY: tf.constant(queries), te.TITLE_KEY: tf.constant(titles)})
    return {k: v.numpy() for k, v in out.items()}


def _assert_well_formed(out, batch, seq_length, vocab_size=30522):
    """Shapes, dtypes and the [CLS] a [SEP] b [SEP] [PAD]... structure of every row."""
    for name in ("input_word_ids", "input_mask", "input_type_ids"):
        assert out[name].shape == (batch, seq_length), name
        assert out[name].dtype == np.int32, name
    ids, mask, types = out["input_word_ids"], out["input_mask"], out["input_type_ids"]
    assert ((ids >= 0) & (ids < vocab_size)).all()
    for row_ids, row_mask, row_types in zip(ids, mask, types):
        n = int(row_mask.sum())
        assert 3 <= n <= seq_length
        np.testing.assert_array_equal(row_mask, np.arange(seq_length) < n)  # A prefix of ones.
        assert row_ids[0] == CLS and row_ids[n - 1] == SEP
        assert (row_ids[:n] == SEP).sum() == 2
        assert (row_ids[n:] == PAD).all() and (row_types[n:] == 0).all()
        first_sep = int(np.argmax(row_ids == SEP))
        assert (row_types[:first_sep + 1] == 0).all() and (row_types[first_sep + 1:n] == 1).all()


# --- Parity with the checkpoint's own tokenizer ---------------------------------------

@pytest.mark.parametrize("prefix", ["pair", "tok_pair"])
def test_pairs_match_hf_tokenizer(encoder, reference, prefix):
    out = _encode(encoder, reference[f"{prefix}_query"].tolist(), reference[f"{prefix}_title"].tolist())
    width = reference[f"{prefix}_input_word_ids"].shape[1]
    for name in ("input_word_ids", "input_mask", "input_type_ids"):
        np.testing.assert_array_equal(out[name][:, :width], reference[f"{prefix}_{name}"], err_msg=name)
        assert (out[name][:, width:] == 0).all(), name


def test_single_texts_match_hf_tokenizer(encoder, reference):
    tokens = encoder.tokenize(tf.constant(reference["tok_single_text"].tolist()))
    assert tokens.dtype == tf.int32
    np.testing.assert_array_equal(tokens.row_lengths().numpy(), reference["tok_single_mask"].sum(1))
    np.testing.assert_array_equal(
        tokens.to_tensor(shape=reference["tok_single_ids"].shape).numpy(), reference["tok_single_ids"])


def test_normalisation_follows_hf_not_nfkc_casefold():
    got = te.normalize_text(tf.constant(["Straße CAFÉ", "a\x07b\u200bc\td", b"ok\xff"])).numpy()
    assert [g.decode() for g in got] == ["straße cafe", "abc d", "ok"]


def test_printable_ascii_shortcut_gives_what_the_unicode_path_gives():
    texts = ["Cordless DRILL 18V", "Straße CAFÉ", "tab\there", "a\x07b", "", " lead  space ",
             "x" * 5_000, "1/2 in. x 10 ft. ~{PVC}", "ÉÉ", "plain"]
    batch = tf.constant([texts, texts[::-1]])  # any shape, ASCII and not interleaved
    got = te.normalize_text(batch, max_chars=4_000).numpy()
    assert got.shape == (2, len(texts))
    for lower_case in (True, False):
        reference = te._normalize_unicode(tf.constant(texts), lower_case, 4_000).numpy()
        np.testing.assert_array_equal(
            te.normalize_text(tf.constant(texts), lower_case, 4_000).numpy(), reference)
    np.testing.assert_array_equal(got[1], got[0][::-1])
    assert got[0][0] == b"cordless drill 18v" and len(got[0][6]) == 4_000
    assert te.normalize_text(tf.constant("ONE")).numpy() == b"one"  # a scalar stays a scalar


# --- Truncation -----------------------------------------------------------------------

def test_query_is_capped_and_title_fills_the_rest(encoder):
    long_query, long_title = "alpha " * 40, "beta " * 200
    out = _encode(encoder, [long_query, "red shoes"], [long_title, long_title])
    _assert_well_formed(out, 2, SEQ)
    type0 = (out["input_type_ids"] == 0) & (out["input_mask"] == 1)
    assert type0.sum(1).tolist() == [1 + te.DEFAULT_QUERY_MAX_TOKENS + 1, 1 + 2 + 1]
    assert out["input_mask"].sum(1).tolist() == [SEQ, SEQ]


def test_round_robin_shares_the_budget():
    layer = te.QueryTitleEncoder(VOCAB, max_seq_length=23, query_max_tokens=None)
    out = _encode(layer, ["alpha " * 40, "alpha"], ["beta " * 40, "beta " * 40])
    _assert_well_formed(out, 2, 23)
    type0 = ((out["input_type_ids"] == 0) & (out["input_mask"] == 1)).sum(1)
    assert type0.tolist() == [1 + 10 + 1, 1 + 1 + 1]


# --- Odd text -------------------------------------------------------------------------

def test_odd_text_gives_valid_inputs(encoder):
    odd = [
        "", " ", "\x00\x01\x02", "\u200b\ufeff", "naïve café Ω≈ç√",
        "東京タワー 한국어 中文", "😀🎉👍🏽 emoji", "x" * 10_000, "word " * 2_000,
        "é" * 10_000, "tab\tnew\nline\r\n", "[CLS] [SEP] [PAD] [MASK]",
    ]
    queries = odd + odd[::-1] + [""]
    titles = odd[::-1] + odd + [""]
    out = _encode(encoder, queries, titles)
    # Also: text spelling "[SEP]" never yields a real [SEP] (unlike the HF tokenizer).
    _assert_well_formed(out, len(queries), SEQ)
    assert out["input_mask"][-1].sum() == 3  # Both empty: [CLS] [SEP] [SEP].
    # A 10,000-char word is one [UNK]; 2,000 words are cut to the remaining budget.
    row = queries.index("x" * 10_000)
    assert out["input_word_ids"][row, 1] == UNK
    row = titles.index("word " * 2_000)
    assert out["input_mask"][row].sum() == SEQ


def test_invalid_utf8_and_column_shaped_inputs(encoder):
    queries = tf.constant([[b"\xff\xfe broken"], [b"fine"]])  # [batch, 1], as tf.Example gives.
    titles = tf.constant([[b"title \xc3"], [b""]])
    out = {k: v.numpy() for k, v in encoder((queries, titles)).items()}
    _assert_well_formed(out, 2, SEQ)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_seq_length must be >= 3"):
        te.QueryTitleEncoder(VOCAB, max_seq_length=2)
    with pytest.raises(KeyError, match="item_title"):
        te.QueryTitleEncoder(VOCAB)({te.QUERY_KEY: tf.constant(["q"])})


# --- In the graph: SavedModel on raw strings ------------------------------------------

def test_saved_model_takes_raw_strings(tmp_path, encoder):
    module = tf.Module()
    module.encoder = encoder
    spec = tf.TensorSpec([None], tf.string)
    module.serve = tf.function(
        lambda query, item_title: encoder({te.QUERY_KEY: query, te.TITLE_KEY: item_title}),
        input_signature=[spec, spec])
    path = str(tmp_path / "model")
    tf.saved_model.save(module, path)
    assert "vocab.txt" in os.listdir(os.path.join(path, "assets"))

    loaded = tf.saved_model.load(path)
    queries, titles = ["café crème", ""], ["Crème brûlée torch", "x" * 10_000]
    got = {k: v.numpy() for k, v in loaded.serve(tf.constant(queries), tf.constant(titles)).items()}
    want = _encode(encoder, queries, titles)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_config_round_trip():
    layer = te.QueryTitleEncoder(VOCAB, max_seq_length=32, query_max_tokens=8)
    clone = te.QueryTitleEncoder.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    out = te.encode_query_title(tf.constant(["usb c"]), tf.constant(["Anker USB-C cable"]), VOCAB, 32, 8)
    assert out["input_word_ids"].shape == (1, 32)
