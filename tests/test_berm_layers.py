"""trainer.berm_layers: each layer of the student BERM on its own (shapes, masks, padding)."""
import numpy as np
import pytest

import tensorflow as tf  # noqa: E402

from trainer import berm_layers  # noqa: E402
from trainer import bert_checkpoint  # noqa: E402

VOCAB_FILE = bert_checkpoint.vocab_file()
assert VOCAB_FILE is not None, f"{bert_checkpoint.PRETRAINED_PIP_NAME} (the vocab) is not installed"


@pytest.fixture(scope="module")
def vocab():
    return berm_layers.read_vocab(VOCAB_FILE)


def test_wordpiece_tokens_pad_truncate_and_keep_the_leading_shape(vocab):
    layer = berm_layers.WordPieceTokens(vocab, max_tokens=3)
    ids = layer(tf.constant([["Steel DRILL", ""], ["café-au-lait lamp with a shade", "x"]])).numpy()
    assert ids.shape == (2, 2, 3) and ids.dtype == np.int32
    index = {token: i for i, token in enumerate(vocab)}
    np.testing.assert_array_equal(ids[0, 0], [index["steel"], index["drill"], 0])
    np.testing.assert_array_equal(ids[0, 1], [0, 0, 0])  # Empty text: all padding.
    assert ids[1, 0, 0] == index["cafe"] and (ids[1, 0] != 0).all()  # Cut at 3 tokens.
    # An all-empty batch still has a token axis (of 1 padding token).
    assert layer(tf.constant(["", ""])).shape == (2, 1)
    # The config carries the vocab itself, not a path.
    clone = berm_layers.WordPieceTokens.from_config(layer.get_config())
    np.testing.assert_array_equal(clone(tf.constant(["cordless drill"])), layer(tf.constant(["cordless drill"])))


def test_kernel_pooling_counts_exact_matches_and_ignores_padding():
    pooling = berm_layers.InteractionKernelPooling(num_kernels=5)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 8)).astype(np.float32)
    centre = tf.constant(table[[1, 2, 0]][None])  # tokens 1, 2 and a padding slot
    centre_mask = tf.constant([[True, True, False]])
    other = tf.constant(table[[[1, 5, 7], [3, 4, 6]]][None])  # [1, M=2, To=3, D]
    other_mask = tf.constant([[[True, True, True], [True, True, False]]])
    features = pooling((centre, centre_mask, other, other_mask)).numpy()
    assert features.shape == (1, 2, 5)
    # Exact-match kernel: token 1 matches once in text 0, token 2 nowhere -> mean(log 2, log 1).
    assert features[0, 0, 0] == pytest.approx(np.log(2.0) / 2, abs=1e-4)
    assert features[0, 1, 0] == pytest.approx(0.0, abs=1e-4)
    # Padding (centre slot 2, other slot 2 of text 1) holds garbage: no change.
    noisy_centre = tf.concat([centre[:, :2], tf.fill([1, 1, 8], 1e6)], axis=1)
    noisy_other = tf.tensor_scatter_nd_update(other, [[0, 1, 2]], tf.fill([1, 8], 5.0))
    noisy = pooling((noisy_centre, centre_mask, noisy_other, other_mask)).numpy()
    np.testing.assert_allclose(noisy, features, atol=1e-6)
    # One other text per row: [N, To, D] -> [N, K]; an empty text gives zeros.
    single = pooling((centre, centre_mask, other[:, 0], tf.zeros_like(other_mask[:, 0]))).numpy()
    assert single.shape == (1, 5)
    np.testing.assert_array_equal(single, 0.0)


def test_kernel_pooling_of_one_token_texts_equals_the_general_case():
    # Neighbour lists reach the layer as texts of one token ([N, M, 1, D]), which take a path of
    # their own; it must give what the general path gives with a padding token beside each.
    rng = np.random.default_rng(1)
    centre = tf.constant(rng.normal(size=(5, 4, 8)), tf.float32)
    centre_mask = tf.constant(rng.random((5, 4)) > 0.3)
    other = tf.constant(rng.normal(size=(5, 3, 1, 8)), tf.float32)
    other_mask = tf.constant(rng.random((5, 3, 1)) > 0.4)
    padded = tf.concat([other, tf.fill([5, 3, 1, 8], 7.0)], axis=2)
    padded_mask = tf.concat([other_mask, tf.zeros([5, 3, 1], tf.bool)], axis=2)
    pooling = berm_layers.InteractionKernelPooling(num_kernels=5)
    for weights in ((), (tf.constant(rng.random((5, 4)), tf.float32),)):
        one = pooling((centre, centre_mask, other, other_mask) + weights).numpy()
        assert one.shape == (5, 3, 5)
        np.testing.assert_allclose(
            one, pooling((centre, centre_mask, padded, padded_mask) + weights).numpy(), atol=1e-6)
    # Unit vectors given: the layer leaves the normalising to the caller.
    unit = berm_layers.UnitVectors()
    normalised = berm_layers.InteractionKernelPooling(num_kernels=5, unit_vectors=True)
    np.testing.assert_allclose(
        normalised((unit(centre), centre_mask, unit(other), other_mask)).numpy(),
        pooling((centre, centre_mask, other, other_mask)).numpy(), atol=1e-6)


def test_kernel_pooling_weighs_centre_tokens():
    pooling = berm_layers.InteractionKernelPooling(num_kernels=5)
    table = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    centre = tf.constant(table[[1, 2, 0]][None])
    centre_mask = tf.constant([[True, True, False]])
    other = tf.constant(table[[1, 5, 7]][None])  # one other text: token 1 matches, token 2 not
    other_mask = tf.ones([1, 3], tf.bool)
    plain = pooling((centre, centre_mask, other, other_mask)).numpy()
    # Equal weights are the plain mean; weight 0.8 on the matching token gives 0.8 * log 2.
    half = pooling((centre, centre_mask, other, other_mask, tf.constant([[0.5, 0.5, 0.0]])))
    np.testing.assert_allclose(half.numpy(), plain, atol=1e-6)
    skewed = pooling((centre, centre_mask, other, other_mask, tf.constant([[0.8, 0.2, 9.0]])))
    assert skewed.numpy()[0, 0] == pytest.approx(0.8 * np.log(2.0), abs=1e-4)


def test_term_gating_starts_uniform_and_ignores_padding():
    gating = berm_layers.TermGating()
    vectors = tf.constant(np.random.default_rng(1).normal(size=(2, 4, 8)).astype(np.float32))
    mask = tf.constant([[True, True, True, False], [False, False, False, False]])
    weights = gating((vectors, mask)).numpy()
    np.testing.assert_allclose(weights, [[1 / 3, 1 / 3, 1 / 3, 0.0], [0.0] * 4], atol=1e-6)
    # Once trained the weights differ per token, still sum to one over real tokens, and no
    # value in a padding slot (even inf) reaches them.
    gating.set_weights([np.arange(8, dtype=np.float32)[:, None] / 8])
    noisy = tf.tensor_scatter_nd_update(vectors, [[0, 3]], tf.fill([1, 8], np.inf))
    weights = gating((noisy, mask)).numpy()
    assert weights[0, 3] == 0.0 and weights[0, :3].sum() == pytest.approx(1.0)
    assert len(set(np.round(weights[0, :3], 6))) == 3


def test_kernel_centres_follow_knrm():
    mus, sigmas = berm_layers.kernel_centres(11)
    np.testing.assert_allclose(mus, [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, -0.1, -0.3, -0.5, -0.7, -0.9], atol=1e-9)
    assert sigmas[0] == 1e-3 and all(s == pytest.approx(0.1) for s in sigmas[1:])


def _attention_inputs(lengths, slots=4, seed=0):
    rng = np.random.default_rng(seed)
    n = len(lengths)
    return (tf.constant(rng.normal(size=(n, 6)), tf.float32),
            tf.constant(rng.normal(size=(n, slots, 6)), tf.float32),
            tf.constant(rng.normal(size=(n, slots, 3)), tf.float32),
            tf.constant(rng.uniform(0.01, 1.0, size=(n, slots)), tf.float32),
            tf.constant(lengths, tf.int32))


def test_neighbour_attention_masks_shapes_and_empty_nodes():
    layer = berm_layers.NeighbourAttention(attention_dim=5)
    inputs = _attention_inputs([2, 0, 4])
    attended, has_context, attention = layer(inputs, return_attention=True)
    assert attended.shape == (3, 3) and has_context.shape == (3, 1) and attention.shape == (3, 4)
    np.testing.assert_array_equal(has_context.numpy()[:, 0], [1.0, 0.0, 1.0])
    attention = attention.numpy()
    np.testing.assert_allclose(attention.sum(axis=1), [1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(attention[0, 2:], 0.0)
    np.testing.assert_array_equal(attended.numpy()[1], 0.0)  # Cold start: a zero vector.


def test_neighbour_attention_ignores_padding_values():
    layer = berm_layers.NeighbourAttention(attention_dim=5)
    centre, neighbours, values, weights, lengths = _attention_inputs([2, 0, 3])
    reference = [t.numpy() for t in layer((centre, neighbours, values, weights, lengths))]
    pad = ~tf.sequence_mask(lengths, 4)
    garbage = lambda t, v: tf.where(pad[..., None] if t.shape.rank == 3 else pad, tf.fill(tf.shape(t), v), t)
    for value in (0.0, 1e6, np.nan, np.inf):
        got = layer((centre, garbage(neighbours, value), garbage(values, value),
                     garbage(weights, value), lengths))
        for a, b in zip(got, reference):
            np.testing.assert_array_equal(a.numpy(), b)


def test_neighbour_attention_uses_the_path_weight():
    layer = berm_layers.NeighbourAttention(attention_dim=5)
    centre, neighbours, values, _, lengths = _attention_inputs([2])
    same = tf.constant([[0.5, 0.5, 0.0, 0.0]])
    skewed = tf.constant([[0.9, 0.1, 0.0, 0.0]])
    _, _, a_same = layer((centre, neighbours, values, same, lengths), return_attention=True)
    _, _, a_skew = layer((centre, neighbours, values, skewed, lengths), return_attention=True)
    # log-weight term: the odds ratio of the two neighbours grows by exactly 9 (lambda = 1 at init).
    ratio = (a_skew[0, 0] / a_skew[0, 1]) / (a_same[0, 0] / a_same[0, 1])
    assert float(ratio) == pytest.approx(9.0, rel=1e-4)


def test_order_fusion_falls_back_to_component_zero():
    fusion = berm_layers.OrderFusion(gate_dim=4)
    rng = np.random.default_rng(1)
    vectors = [tf.constant(rng.normal(size=(3, 6)), tf.float32) for _ in range(5)]
    logits = tf.constant(rng.normal(size=(3, 5)), tf.float32)
    available = tf.constant([[0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], tf.float32)
    fused, gates = fusion((vectors, logits, available), return_gates=True)
    gates = gates.numpy()
    np.testing.assert_array_equal(gates[0], [1, 0, 0, 0, 0])
    assert fused.numpy()[0] == logits.numpy()[0, 0]  # Exactly the 0-order logit.
    np.testing.assert_array_equal(gates[1, [2, 4]], 0.0)
    np.testing.assert_allclose(gates.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(fused.numpy()[1:], (gates * logits.numpy()).sum(axis=1)[1:], atol=1e-6)
    # A lone 0-order component (max_order = 0) is passed through.
    assert fusion.__class__(gate_dim=4)(([vectors[0]], logits[:, :1])).numpy().tolist() == \
        logits.numpy()[:, 0].tolist()


def test_token_embedding_pretrained_projection_starts_at_principal_directions():
    rng = np.random.default_rng(2)
    matrix = (rng.normal(size=(50, 12)) @ np.diag(np.linspace(3, 0.1, 12)) + 2.0).astype(np.float32)
    layer = berm_layers.TokenEmbedding(50, 4, pretrained_dim=12)
    layer.set_pretrained(matrix)
    assert [w.name.split("/")[-1].split(":")[0] for w in layer.trainable_weights] == \
        ["projection_kernel", "projection_bias"]
    assert layer.non_trainable_weights[0].shape == (50, 12)
    ids = tf.constant([[3, 7, 3], [0, 49, 7]])
    out = layer(ids).numpy()
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(out[0, 0], out[0, 2])  # Same id, same vector (unique-id path).
    centred = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(out[0, 1]), np.abs(centred[7] @ vt[:4].T), atol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        layer.set_pretrained(matrix[:, :5])
    plain = berm_layers.TokenEmbedding(50, 4)
    assert plain(ids).shape == (2, 3, 4) and len(plain.trainable_weights) == 1
