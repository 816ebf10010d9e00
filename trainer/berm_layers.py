"""Keras layers of the student BERM (Liu et al., EMNLP 2022), one job per layer.

Like TF Models' `official.nlp.modeling.layers`, each layer does one thing and is
serialisable (`get_config`), so a saved student can be re-loaded with
`tf.keras.models.load_model` (see `trainer.berm_serving.load_scorer`):

  * `WordPieceTokens`: raw strings (any shape) -> WordPiece ids, in the graph.
  * `PaddingMask`: ids -> bool mask of real tokens (id 0 is [PAD]).
  * `TokenEmbedding`: ids -> vectors; a plain trainable table, or the teacher's
    frozen WordPiece embeddings through a trainable projection.
  * `MaskedMeanPooling`: the cheap text encoder (mean of real token vectors).
  * `UnitVectors`: L2 normalisation, done once per text for all its interactions.
  * `TermGating`: how much each token of a text counts (DRMM term gating).
  * `InteractionKernelPooling`: K-NRM kernel pooling of the cosine interaction
    matrix between a centre text and other texts -> relevance features.
  * `NeighbourAttention`: graph attention over a node's (padded) neighbours:
    learned score plus the log path weight, padding excluded.
  * `OrderFusion`: attention over the available orders' relevance logits.

Conventions: token id 0 is padding everywhere; a neighbour list is a dense
[batch, C] (texts, weights) pair plus its true `length` per row, so slots at
positions >= length are padding whatever they hold. Layers never let a
padded value reach their output (they use `tf.where`, not multiplication, so
even NaN or inf in padding is harmless).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_text as text

from trainer import text_encoding

PAD_ID = 0
_NEG_INF = -1e9


def _as_float_mask(mask: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
    return tf.cast(mask, dtype)


def masked_softmax(scores: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Softmax over the last axis restricted to `mask`; an all-masked row gives zeros."""
    scores = tf.where(mask, scores, tf.fill(tf.shape(scores), tf.constant(_NEG_INF, scores.dtype)))
    scores = scores - tf.stop_gradient(tf.reduce_max(scores, axis=-1, keepdims=True))
    exp = tf.where(mask, tf.exp(scores), tf.zeros_like(scores))
    total = tf.reduce_sum(exp, axis=-1, keepdims=True)
    return tf.math.divide_no_nan(exp, total)


def read_vocab(vocab_file: str) -> List[str]:
    """WordPiece vocab file -> tokens in id order."""
    with tf.io.gfile.GFile(vocab_file, "r") as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


_TOKENIZERS: Dict[Tuple[str, ...], text.FastBertTokenizer] = {}


def _fast_tokenizer(vocab: Tuple[str, ...]) -> text.FastBertTokenizer:
    """One FastBertTokenizer (and one model buffer) per vocab, shared by all layers."""
    if vocab not in _TOKENIZERS:
        _TOKENIZERS[vocab] = text.FastBertTokenizer(
            vocab=list(vocab), token_out_type=tf.int32, unknown_token="[UNK]",
            lower_case_nfd_strip_accents=False)
    return _TOKENIZERS[vocab]


@tf.keras.utils.register_keras_serializable(package="relkd")
class WordPieceTokens(tf.keras.layers.Layer):
    """Raw strings -> WordPiece ids, padded with 0: tf.string [...] -> int32 [..., T].

    Text is normalised as the teacher does it (`text_encoding.normalize_text`:
    HF-compatible lower-casing and accent stripping, control characters deleted,
    invalid UTF-8 replaced), then split by tensorflow_text's `FastBertTokenizer`
    (~15x faster than the classic `BertTokenizer` on short texts). No special
    tokens are added. `T` is the longest text of the batch, cut to `max_tokens`
    (and at least 1, so an all-empty batch still has a token axis).

    The vocabulary itself (not a path) is the layer's config, so a saved model
    re-loads without the original vocab file; layers with the same vocab share
    one tokenizer.
    """

    def __init__(self, vocab: Sequence[str], max_tokens: int = 32, lower_case: bool = True,
                 max_chars: Optional[int] = 1024, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self._vocab = tuple(vocab)
        if not self._vocab or self._vocab[PAD_ID] != "[PAD]" or "[UNK]" not in self._vocab:
            raise ValueError("vocab must hold [UNK] and have [PAD] at id 0 (a BERT WordPiece vocab)")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self._lower_case = lower_case
        self._max_chars = max_chars
        self._tokenizer = _fast_tokenizer(self._vocab)

    @classmethod
    def from_vocab_file(cls, vocab_file: str, **kwargs) -> "WordPieceTokens":
        return cls(read_vocab(vocab_file), **kwargs)

    @property
    def vocab(self) -> Tuple[str, ...]:
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def lower_case(self) -> bool:
        return self._lower_case

    @property
    def max_chars(self) -> Optional[int]:
        return self._max_chars

    def normalize(self, texts: tf.Tensor) -> tf.Tensor:
        """The texts as this layer normalises them before splitting (same shape)."""
        return text_encoding.normalize_text(texts, self._lower_case, self._max_chars)

    def call(self, texts: tf.Tensor, normalized: bool = False, return_normalized: bool = False):
        """With `normalized`, the texts are already this layer's `normalize` output. With
        `return_normalized`, returns (ids, the normalised texts), for a layer that cuts the
        same text (`LetterTrigrams.normalizes_as`) and need not normalise it again."""
        texts = tf.convert_to_tensor(texts)
        if texts.dtype != tf.string:
            raise TypeError(f"WordPieceTokens expects tf.string, got {texts.dtype}")
        shape = tf.shape(texts)
        flat = tf.reshape(texts, [-1])
        if not normalized:
            flat = text_encoding.normalize_text(flat, self._lower_case, self._max_chars)
        ids = self._tokenizer.tokenize(flat)[:, :self.max_tokens]
        dense = ids.to_tensor(default_value=PAD_ID)
        dense = tf.pad(dense, [[0, 0], [0, tf.maximum(0, 1 - tf.shape(dense)[1])]])
        out = tf.reshape(dense, tf.concat([shape, tf.shape(dense)[1:]], axis=0))
        out = tf.ensure_shape(out, texts.shape.concatenate([None]))
        if return_normalized:
            return out, tf.reshape(flat, shape)
        return out

    def get_config(self) -> Dict[str, Any]:
        return dict(super().get_config(), vocab=list(self._vocab), max_tokens=self.max_tokens,
                    lower_case=self._lower_case, max_chars=self._max_chars)


@tf.keras.utils.register_keras_serializable(package="relkd")
class LetterTrigrams(tf.keras.layers.Layer):
    """Raw strings [N] -> hashed letter trigrams of their words: int32 [N, L], padded with -1.

    Each word, normalised as `WordPieceTokens` does it and framed as "#word#",
    gives its letter trigrams (DSSM's word hashing: "#va", "vac", "acu", "cum",
    "ume", "me#" for "vacume"), each hashed into `num_buckets`. A misspelt or
    run-together word shares most of its trigrams with the right one, where its
    WordPiece pieces may share none. `L` is the batch's most, cut to
    `max_trigrams` (and at least 1). With the bool [N] `skip_rows`, only the
    texts where it is False are cut; the others' rows are all -1.
    """

    def __init__(self, num_buckets: int, max_trigrams: int = 64,
                 max_chars: Optional[int] = 1024, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        if num_buckets < 1 or max_trigrams < 1:
            raise ValueError(f"LetterTrigrams needs num_buckets >= 1 and max_trigrams >= 1, got "
                             f"{num_buckets}, {max_trigrams}")
        self.num_buckets, self.max_trigrams = int(num_buckets), int(max_trigrams)
        self._max_chars = max_chars

    def normalizes_as(self, wordpiece: WordPieceTokens) -> bool:
        """Whether `wordpiece.normalize` gives the text this layer cuts, so that one
        normalisation can serve both (`wordpiece(..., return_normalized=True)`, then
        `call(..., normalized=True)`)."""
        return wordpiece.lower_case and wordpiece.max_chars == self._max_chars

    def call(self, texts: tf.Tensor, skip_rows: Optional[tf.Tensor] = None,
             normalized: bool = False) -> tf.Tensor:
        """With `normalized`, the texts are already normalised as this layer would do it."""
        texts = tf.reshape(tf.convert_to_tensor(texts, tf.string), [-1])
        if skip_rows is None:
            return self._trigram_ids(texts, normalized)
        # Served titles are nearly all skipped (in the title table): then the string ops, which
        # cost about as much on an empty batch as on a few titles, do not run at all.
        return tf.cond(tf.reduce_all(skip_rows),
                       lambda: tf.fill(tf.stack([tf.shape(texts)[0], 1]), -1),
                       lambda: self._some_trigram_ids(texts, tf.where(tf.logical_not(skip_rows)),
                                                      normalized))

    def _some_trigram_ids(self, texts: tf.Tensor, cut: tf.Tensor, normalized: bool) -> tf.Tensor:
        ids = self._trigram_ids(tf.gather_nd(texts, cut), normalized)
        return tf.tensor_scatter_nd_update(
            tf.fill(tf.stack([tf.shape(texts)[0], tf.shape(ids)[1]]), -1), cut, ids)

    def _trigram_ids(self, texts: tf.Tensor, normalized: bool = False) -> tf.Tensor:
        if not normalized:
            texts = text_encoding.normalize_text(texts, True, self._max_chars)
        words = tf.strings.split(texts)
        framed = tf.strings.join(["#", words.flat_values, "#"])
        trigrams = tf.strings.ngrams(tf.strings.unicode_split(framed, "UTF-8"), 3, separator="")
        ids = tf.strings.to_hash_bucket_fast(trigrams.flat_values, self.num_buckets)
        per_text = words.with_flat_values(trigrams.with_flat_values(tf.cast(ids, tf.int32)))
        dense = per_text.merge_dims(1, 2)[:, :self.max_trigrams].to_tensor(default_value=-1)
        return tf.pad(dense, [[0, 0], [0, tf.maximum(0, 1 - tf.shape(dense)[1])]],
                      constant_values=-1)

    def get_config(self) -> Dict[str, Any]:
        return dict(super().get_config(), num_buckets=self.num_buckets,
                    max_trigrams=self.max_trigrams, max_chars=self._max_chars)


@tf.keras.utils.register_keras_serializable(package="relkd")
class PaddingMask(tf.keras.layers.Layer):
    """Token ids -> bool mask, True for real tokens (id != 0)."""

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.not_equal(ids, PAD_ID)


# What the frozen 384-wide tables (the teacher's WordPiece embeddings, the stored title vectors)
# may be stored as. They are most of a student's bytes; float16 halves them and keeps about three
# significant digits, far finer than what the student learns from them; int8 (each row scaled
# by its largest magnitude, the scale kept beside it in float32) quarters them with about two.
# Their rows are read as float32, so training and serving compute the same numbers from the same
# stored ones.
FROZEN_TABLE_DTYPES = ("float32", "float16", "int8")


def frozen_table_dtype(name: str) -> str:
    """`name` if it is one of FROZEN_TABLE_DTYPES, else a ValueError naming them."""
    if name not in FROZEN_TABLE_DTYPES:
        raise ValueError(f"a frozen table's dtype must be one of {FROZEN_TABLE_DTYPES}, got {name!r}")
    return name


def add_frozen_table(layer: tf.keras.layers.Layer, name: str, rows: int, width: int,
                     dtype: str) -> Tuple[tf.Variable, Optional[tf.Variable]]:
    """A layer's frozen [rows, width] table stored as `dtype`, and for int8 its rows' scales."""
    table = layer.add_weight(name, shape=[rows, width], dtype=dtype, initializer="zeros",
                             trainable=False)
    scale = None
    if dtype == "int8":
        scale = layer.add_weight(f"{name}_scale", shape=[rows], initializer="zeros",
                                 trainable=False)
    return table, scale


def stored_rows(matrix: np.ndarray, dtype: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """A float matrix [rows, width] as a table of `dtype` stores it: (values, int8's row scales
    or None). `read_rows` of them gives float32 within half a step (row max / 127) of each entry."""
    matrix = np.asarray(matrix, np.float32)
    if dtype != "int8":
        return matrix.astype(dtype), None
    scale = (np.abs(matrix).max(axis=1, initial=0.0) / 127.0).astype(np.float32)
    values = np.round(matrix / np.where(scale > 0, scale, 1.0)[:, np.newaxis])
    return values.astype(np.int8), scale


def _as_read(values: np.ndarray, scales: Optional[np.ndarray]) -> np.ndarray:
    values = values.astype(np.float32)
    return values if scales is None else values * scales[:, np.newaxis]


def assign_rows(table: tf.Variable, scale: Optional[tf.Variable], matrix: np.ndarray) -> np.ndarray:
    """Stores `matrix` in a frozen table (and its scales); returns it as read back, float32."""
    values, scales = stored_rows(matrix, table.dtype.name)
    table.assign(values)
    if scale is not None:
        scale.assign(scales)
    return _as_read(values, scales)


def table_values(table: tf.Variable, scale: Optional[tf.Variable]) -> np.ndarray:
    """A whole frozen table as read, float32 [rows, width]."""
    return _as_read(table.numpy(), None if scale is None else scale.numpy())


def read_rows(table: tf.Variable, ids: tf.Tensor, scale: Optional[tf.Variable] = None) -> tf.Tensor:
    """table[ids] as float32, whatever the table is stored as (int8 times its rows' `scale`)."""
    rows = tf.cast(tf.gather(table, ids), tf.float32)
    return rows if scale is None else rows * tf.gather(scale, ids)[..., tf.newaxis]


@tf.keras.utils.register_keras_serializable(package="relkd")
class TokenEmbedding(tf.keras.layers.Layer):
    """Token ids [...] -> vectors [..., embedding_dim].

    Two modes:
      * `pretrained_dim=None`: a plain trainable [vocab_size, embedding_dim] table.
      * `pretrained_dim=P`: a frozen [vocab_size, P] table (the teacher's WordPiece
        embeddings, loaded with `set_pretrained`) followed by a trainable affine
        projection to `embedding_dim`, initialised by `set_pretrained` to the
        table's top principal directions (centred), so that cosine similarities
        start close to the teacher's. Only the batch's distinct ids are projected.

    `table_dtype` is what the frozen table is stored as ("float32", "float16" for
    half the bytes, "int8" for a quarter and its rows' scales); its rows are read
    as float32 (`FROZEN_TABLE_DTYPES`).
    """

    def __init__(self, vocab_size: int, embedding_dim: int, pretrained_dim: Optional[int] = None,
                 table_dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.pretrained_dim = pretrained_dim
        self.table_dtype = frozen_table_dtype(table_dtype)

    def build(self, input_shape):
        if self.pretrained_dim is None:
            self.embeddings = self.add_weight(
                "embeddings", shape=[self.vocab_size, self.embedding_dim],
                initializer=tf.keras.initializers.RandomNormal(stddev=0.1), trainable=True)
        else:
            self.pretrained, self.pretrained_scale = add_frozen_table(
                self, "pretrained", self.vocab_size, self.pretrained_dim, self.table_dtype)
            self.kernel = self.add_weight(
                "projection_kernel", shape=[self.pretrained_dim, self.embedding_dim],
                initializer="glorot_uniform", trainable=True)
            self.bias = self.add_weight("projection_bias", shape=[self.embedding_dim],
                                        initializer="zeros", trainable=True)
            self.mean_weights = self.add_weight(
                "mean_weights", shape=[self.vocab_size], initializer="ones", trainable=False)
        super().build(input_shape)

    def set_pretrained(self, matrix: np.ndarray) -> None:
        """Loads the frozen table and sets the projection to its PCA directions."""
        if self.pretrained_dim is None:
            raise ValueError("this TokenEmbedding has no pretrained table (pretrained_dim=None)")
        matrix = np.asarray(matrix, np.float32)
        if matrix.shape != (self.vocab_size, self.pretrained_dim):
            raise ValueError(f"pretrained embeddings have shape {matrix.shape}, expected "
                             f"{(self.vocab_size, self.pretrained_dim)}")
        if not self.built:
            self.build(tf.TensorShape([None]))
        # The projection starts from the table as stored, so that it fits what training reads.
        matrix = assign_rows(self.pretrained, self.pretrained_scale, matrix)
        mean = matrix.mean(axis=0)
        _, _, vt = np.linalg.svd(matrix - mean, full_matrices=False)
        kernel = vt[:self.embedding_dim].T  # [P, D]; D <= P
        if kernel.shape[1] < self.embedding_dim:  # embedding_dim > P: pad with random directions
            extra = np.random.default_rng(0).normal(
                scale=1.0 / np.sqrt(self.pretrained_dim),
                size=(self.pretrained_dim, self.embedding_dim - kernel.shape[1]))
            kernel = np.concatenate([kernel, extra], axis=1)
        self.kernel.assign(kernel.astype(np.float32))
        self.bias.assign(-(mean @ kernel).astype(np.float32))

    def frozen_table(self) -> Optional[Tuple[tf.Variable, Optional[tf.Variable]]]:
        """(the pretrained table, its int8 row scales or None); None without one."""
        return None if self.pretrained_dim is None else (self.pretrained, self.pretrained_scale)

    def set_mean_weights(self, weights: np.ndarray) -> None:
        """Sets how much each token counts in `pretrained_mean` (frozen; all 1 at first)."""
        if self.pretrained_dim is None:
            raise ValueError("this TokenEmbedding has no pretrained table (pretrained_dim=None)")
        weights = np.asarray(weights, dtype=np.float32)
        if weights.shape != (self.vocab_size,) or not np.all(weights > 0):
            raise ValueError(f"mean weights must be {self.vocab_size} positive numbers, got shape "
                             f"{weights.shape}")
        if not self.built:
            self.build(tf.TensorShape([None]))
        self.mean_weights.assign(weights)

    def call(self, ids: tf.Tensor, pretrained_mean: bool = False,
             skip_rows: Optional[tf.Tensor] = None) -> tf.Tensor:
        """ids [..., T] -> [..., T, embedding_dim]; with `pretrained_mean`, ids [N, T] -> the mean
        of each row's real tokens' frozen pretrained vectors [N, P], each token weighed by its
        `mean_weights` entry (zeros for rows without a real token, and for rows where the bool
        [N] `skip_rows` is True)."""
        ids = tf.cast(ids, tf.int32)
        if pretrained_mean:
            return self._pretrained_mean(ids, skip_rows)
        if self.pretrained_dim is None:
            return tf.gather(self.embeddings, ids)
        flat = tf.reshape(ids, [-1])
        unique, index = tf.unique(flat)
        projected = tf.matmul(read_rows(self.pretrained, unique, self.pretrained_scale),
                              self.kernel) + self.bias
        out = tf.gather(projected, index)
        return tf.reshape(out, tf.concat([tf.shape(ids), [self.embedding_dim]], axis=0))

    def _pretrained_mean(self, ids: tf.Tensor, skip_rows: Optional[tf.Tensor]) -> tf.Tensor:
        if self.pretrained_dim is None:
            raise ValueError("this TokenEmbedding has no pretrained table (pretrained_dim=None)")
        # Only the real tokens of the wanted rows are gathered: padding the batch to its longest
        # text would otherwise gather (and average away) a 384-wide vector per padding slot.
        keep = tf.not_equal(ids, PAD_ID)
        if skip_rows is not None:
            keep = tf.logical_and(keep, tf.logical_not(skip_rows)[:, tf.newaxis])
        where = tf.where(keep)
        rows, count = where[:, 0], tf.shape(ids, out_type=tf.int64)[0]
        kept = tf.gather_nd(ids, where)
        weights = tf.gather(self.mean_weights, kept)
        sums = tf.math.unsorted_segment_sum(
            read_rows(self.pretrained, kept, self.pretrained_scale) * weights[:, tf.newaxis],
            rows, count)
        total = tf.math.unsorted_segment_sum(weights, rows, count)
        return tf.math.divide_no_nan(sums, total[:, tf.newaxis])

    def get_config(self) -> Dict[str, Any]:
        return dict(super().get_config(), vocab_size=self.vocab_size,
                    embedding_dim=self.embedding_dim, pretrained_dim=self.pretrained_dim,
                    table_dtype=self.table_dtype)


@tf.keras.utils.register_keras_serializable(package="relkd")
class MaskedMeanPooling(tf.keras.layers.Layer):
    """Mean of the real token vectors: ([..., T, D], mask [..., T]) -> [..., D] (0 if none)."""

    def call(self, inputs: Tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        vectors, mask = inputs
        mask = tf.expand_dims(mask, -1)
        # A scalar zero, not zeros_like: the select broadcasts it instead of filling a padded copy.
        total = tf.reduce_sum(tf.where(mask, vectors, tf.zeros([], vectors.dtype)), axis=-2)
        count = tf.reduce_sum(_as_float_mask(mask, vectors.dtype), axis=-2)
        return tf.math.divide_no_nan(total, count)


def text_fingerprints(texts: tf.Tensor) -> tf.Tensor:
    """Whitespace-stripped strings -> int64 FarmHash fingerprints in [0, 2^63 - 1)."""
    return tf.strings.to_hash_bucket_fast(tf.strings.strip(texts), _FINGERPRINT_RANGE)


_FINGERPRINT_RANGE = 2 ** 63 - 1
# Sorts after every fingerprint, so a search that runs past a table's keys lands on it.
NO_FINGERPRINT = _FINGERPRINT_RANGE
_FINGERPRINT_BATCH = 1 << 16


def fingerprint_array(texts: Sequence[Any]) -> np.ndarray:
    """Strings (str or bytes) -> int64 [len(texts)] `text_fingerprints`, a batch at a time."""
    return np.concatenate([np.zeros([0], np.int64)] + [
        text_fingerprints(tf.constant(list(texts[start:start + _FINGERPRINT_BATCH]), tf.string)).numpy()
        for start in range(0, len(texts), _FINGERPRINT_BATCH)])


def sorted_fingerprints(texts: Sequence[Any], what: str) -> Tuple[np.ndarray, np.ndarray]:
    """Strings -> (their `text_fingerprints`, sorted; each sorted key's index in `texts`).

    The sorted keys are what `search_fingerprints` looks strings up in. Raises ValueError, naming
    `what` and two of the strings, if two share a key (the same text after stripping whitespace,
    or a 64-bit collision: odds about n^2 / 2^64).
    """
    keys = fingerprint_array(texts)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    same = np.flatnonzero(keys[1:] == keys[:-1])
    if same.size:
        first, second = texts[order[same[0]]], texts[order[same[0] + 1]]
        raise ValueError(f"{what}: {first!r} and {second!r} repeat after stripping whitespace or "
                         f"share a fingerprint; pass each once")
    return keys, order


def search_fingerprints(sorted_keys: tf.Tensor, fingerprints: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """Each fingerprint's position in `sorted_keys` (int64 [K], K >= 1) and whether it is there.

    A binary search over a weight rather than a hash table over constants: the keys are saved and
    restored with the other weights, and no graph holds them (a GraphDef is limited to 2 GB).
    """
    # One dense read, and the gather from it: a gather on the variable itself would switch it
    # to copy-on-read, and every request would then copy all the keys (0.3 ms per million).
    sorted_keys = tf.convert_to_tensor(sorted_keys)
    position = tf.minimum(tf.searchsorted(sorted_keys, fingerprints), tf.size(sorted_keys, tf.int32) - 1)
    return position, tf.equal(tf.gather(sorted_keys, position), fingerprints)


@tf.keras.utils.register_keras_serializable(package="relkd")
class TitleVectorTable(tf.keras.layers.Layer):
    """Item titles [N] -> (their stored sentence vectors [N, dim], has one [N] bool).

    Unknown titles get zeros and False. The keys are the titles' 64-bit
    fingerprints, sorted, in a non-trainable weight searched with
    `tf.searchsorted`, rather than a hash table's constants: they are saved and
    restored with the other weights, so a layer rebuilt from its config (sizes
    only) gets its table back, and the config stays small however large the
    catalogue. Two titles sharing a fingerprint (odds about n^2 / 2^64) would
    share a vector; `set_table` refuses such a table. It may hold fewer titles
    than `size`: the free slots take a key no fingerprint can be (2^63 - 1).
    The vectors are stored as `table_dtype` and read as float32 (`FROZEN_TABLE_DTYPES`).
    """

    def __init__(self, size: int, dim: int, table_dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        if size < 1 or dim < 1:
            raise ValueError(f"TitleVectorTable needs size >= 1 and dim >= 1, got {size}, {dim}")
        self.size, self.dim = int(size), int(dim)
        self.table_dtype = frozen_table_dtype(table_dtype)

    def build(self, input_shape):
        self.keys = self.add_weight("keys", shape=[self.size], dtype=tf.int64,
                                    initializer="zeros", trainable=False)
        self.vectors, self.vectors_scale = add_frozen_table(self, "vectors", self.size, self.dim,
                                                            self.table_dtype)
        super().build(input_shape)

    def set_table(self, titles: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, np.float32)
        if (vectors.shape != (len(titles), self.dim)) or not 0 < len(titles) <= self.size:
            raise ValueError(f"expected 1 to {self.size} titles and vectors [titles, {self.dim}], "
                             f"got {len(titles)} and {list(vectors.shape)}")
        if not self.built:
            self.build(tf.TensorShape([None]))
        keys, order = sorted_fingerprints(titles, "TitleVectorTable: titles")
        # Free slots hold the one key no fingerprint takes, sorted last: a lookup that lands on
        # one compares unequal, as for any title not stored.
        free = self.size - len(titles)
        self.keys.assign(np.concatenate([keys, np.full([free], NO_FINGERPRINT, np.int64)]))
        assign_rows(self.vectors, self.vectors_scale,
                    np.concatenate([vectors[order], np.zeros([free, self.dim], np.float32)]))

    def frozen_table(self) -> Tuple[tf.Variable, Optional[tf.Variable]]:
        """(the vectors, their int8 row scales or None)."""
        return self.vectors, self.vectors_scale

    def call(self, titles: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        position, known = search_fingerprints(self.keys, text_fingerprints(titles))
        vectors = tf.where(known[:, tf.newaxis],
                           read_rows(self.vectors, position, self.vectors_scale),
                           tf.zeros([tf.shape(titles)[0], self.dim], tf.float32))
        return vectors, known

    def get_config(self) -> Dict[str, Any]:
        return dict(super().get_config(), size=self.size, dim=self.dim, table_dtype=self.table_dtype)


@tf.keras.utils.register_keras_serializable(package="relkd")
class SentenceMatch(tf.keras.layers.Layer):
    """scale * cos(query, title) in a sentence encoder's space -> [N].

    Inputs: (query_static [N, P], title_static [N, P], title_vector [N, S],
    title_known [N]); title_static is read only where title_known is False.
    The query's side is its pretrained WordPiece mean through
    a trainable map [P, S] (`query_map`, started by `set_maps` at a ridge fit
    onto the encoder's vectors of the train queries). The title's side is its
    stored encoder vector where it has one, else its own WordPiece mean through
    a frozen map (`fallback_map`, a ridge fit onto the stored title vectors), so
    an item outside the table is still matched. `scale` is trainable.

    With `title_trigram_buckets` B > 0 a fifth input, the titles' `LetterTrigrams`
    ids [N, L] (read only where title_known is False), adds to the fallback a
    frozen row per trigram bucket (`title_trigram_map` [B, S], fitted with the
    fallback map; `trigram_sums`: each of a title's n trigrams weighed 1 /
    sqrt(n)), so that the words' spelling counts where WordPiece pieces lose it.

    `fallback_l2` is the ridge penalty the fallback was fitted with; it is part of
    the config (saved with the model) so that a later refit on other titles
    (`student.fit_title_fallback`) fits it as the start did.
    """

    def __init__(self, sentence_dim: int, initial_scale: float = 2.0,
                 title_trigram_buckets: int = 0, fallback_l2: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.sentence_dim = int(sentence_dim)
        self.initial_scale = float(initial_scale)
        self.title_trigram_buckets = int(title_trigram_buckets)
        self.fallback_l2 = float(fallback_l2)

    def build(self, input_shape):
        static_dim = int(input_shape[0][-1])
        self.query_map = self.add_weight("query_map", shape=[static_dim, self.sentence_dim],
                                         initializer="glorot_uniform", trainable=True)
        self.fallback_map = self.add_weight("fallback_map", shape=[static_dim, self.sentence_dim],
                                            initializer="glorot_uniform", trainable=False)
        self.scale = self.add_weight(
            "scale", shape=[], trainable=True,
            initializer=tf.keras.initializers.Constant(self.initial_scale))
        if self.title_trigram_buckets:
            self.title_trigram_map = self.add_weight(
                "title_trigram_map", shape=[self.title_trigram_buckets, self.sentence_dim],
                initializer="zeros", trainable=False)
        super().build(input_shape)

    def set_maps(self, query_map: np.ndarray, fallback_map: np.ndarray,
                 title_trigram_map: Optional[np.ndarray] = None) -> None:
        self.set_fallback(fallback_map, title_trigram_map)
        self.query_map.assign(np.asarray(query_map, np.float32))

    def set_fallback(self, fallback_map: np.ndarray,
                     title_trigram_map: Optional[np.ndarray] = None) -> None:
        """Sets the frozen maps of titles outside the table (built layer)."""
        if (title_trigram_map is None) != (not self.title_trigram_buckets):
            raise ValueError("pass title_trigram_map exactly when title_trigram_buckets > 0")
        self.fallback_map.assign(np.asarray(fallback_map, np.float32))
        if title_trigram_map is not None:
            self.title_trigram_map.assign(np.asarray(title_trigram_map, np.float32))

    def call(self, inputs):
        query_static, title_static, title_vector, title_known = inputs[:4]
        query = tf.math.l2_normalize(tf.matmul(query_static, self.query_map), axis=-1)
        # Served titles are nearly all in the table: map only the others (a [P, S] product per
        # pair would cost as much as the query's).
        unknown = tf.where(tf.logical_not(title_known))
        fallback = tf.matmul(tf.gather_nd(title_static, unknown), self.fallback_map)
        if self.title_trigram_buckets:
            fallback += trigram_sums(self.title_trigram_map, tf.gather_nd(inputs[4], unknown))
        title = tf.tensor_scatter_nd_update(title_vector, unknown, fallback)
        title = tf.math.l2_normalize(title, axis=-1)
        return self.scale * tf.reduce_sum(query * title, axis=-1)

    def get_config(self) -> Dict[str, Any]:
        return dict(super().get_config(), sentence_dim=self.sentence_dim,
                    initial_scale=self.initial_scale,
                    title_trigram_buckets=self.title_trigram_buckets,
                    fallback_l2=self.fallback_l2)


def trigram_sums(rows: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
    """sum over each text's real (>= 0) trigram ids of rows[id] / sqrt(its count): [N, L] ->
    [N, dim] (zeros for a text without one). The ids' bag, so weighed, has unit L2 norm when no
    trigram repeats, which is what `trigram_bags` gives the maps' ridge fit."""
    # One fused op (sum / sqrt(count) per text) instead of a gather, a product and a segment sum:
    # a third of the time on 100 titles. tf.where lists the ids row by row, so the text
    # numbers are sorted, as the op needs.
    where = tf.where(ids >= 0)
    return tf.sparse.segment_sqrt_n(rows, tf.gather_nd(ids, where), tf.cast(where[:, 0], tf.int32),
                                    num_segments=tf.shape(ids)[0])


def kernel_centres(num_kernels: int) -> Tuple[List[float], List[float]]:
    """K-NRM kernels: an exact-match kernel (mu 1, sigma 1e-3) and K-1 soft ones.

    The soft kernels' centres split [-1, 1] into K-1 equal bins (11 kernels:
    0.9, 0.7, ..., -0.9) with sigma half a bin.
    """
    if num_kernels < 2:
        raise ValueError(f"num_kernels must be >= 2, got {num_kernels}")
    width = 2.0 / (num_kernels - 1)
    mus = [1.0] + [1.0 - width / 2 - i * width for i in range(num_kernels - 1)]
    sigmas = [1e-3] + [width / 2] * (num_kernels - 1)
    return mus, sigmas


@tf.keras.utils.register_keras_serializable(package="relkd")
class TermGating(tf.keras.layers.Layer):
    """How much each real token of a text counts: ([N, T, D], mask [N, T]) -> weights [N, T].

    DRMM's term gating (Guo et al., CIKM 2016): softmax over the real tokens of a
    learned linear score of each token vector, zero on padding. The score starts
    at zero, so the weights start as the plain mean's 1 / (real tokens).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._score = tf.keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros",
                                            name="score")

    def call(self, inputs: Tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        vectors, mask = inputs
        vectors = tf.where(mask[..., tf.newaxis], vectors, tf.zeros([], vectors.dtype))
        return masked_softmax(tf.squeeze(self._score(vectors), -1), mask)


@tf.keras.utils.register_keras_serializable(package="relkd")
class UnitVectors(tf.keras.layers.Layer):
    """Vectors [..., D] -> the same directions at unit L2 norm (zero vectors stay zero)."""

    def call(self, vectors: tf.Tensor) -> tf.Tensor:
        return tf.math.l2_normalize(vectors, axis=-1, epsilon=1e-12)


@tf.keras.utils.register_keras_serializable(package="relkd")
class InteractionKernelPooling(tf.keras.layers.Layer):
    """Word-level interaction of a centre text with other texts, read by RBF kernels.

    Inputs `(centre, centre_mask, other, other_mask)`:
      centre [N, Tc, D], centre_mask [N, Tc]; other [N, To, D] with mask [N, To]
      (one other text per row) or [N, M, To, D] with mask [N, M, To].
    Output [N, K] or [N, M, K]: for each kernel k, the mean over the centre's real
    tokens i of log1p(sum over the other's real tokens j of
    exp(-(cos(c_i, o_j) - mu_k)^2 / (2 sigma_k^2))) (K-NRM soft-TF, with log1p so
    that an empty other text gives 0 rather than log(0)).
    An optional fifth input, centre_weights [N, Tc] (e.g. `TermGating`'s), turns
    the mean into the weighted sum over the centre's real tokens.
    With `unit_vectors=True` the caller passes unit vectors (`UnitVectors`), so
    that a text matched against several others is normalised once, not per call.
    """

    def __init__(self, num_kernels: int = 11, unit_vectors: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_kernels = num_kernels
        self.unit_vectors = bool(unit_vectors)
        mus, sigmas = kernel_centres(num_kernels)
        self._mus = tf.constant(mus, tf.float32)
        self._negative_inverse_two_variances = tf.constant([-1.0 / (2.0 * s * s) for s in sigmas],
                                                           tf.float32)

    def call(self, inputs: Tuple[tf.Tensor, ...]) -> tf.Tensor:
        centre, centre_mask, other, other_mask = inputs[:4]
        centre_weights = inputs[4] if len(inputs) > 4 else None
        single = other.shape.rank == 3
        if single:
            other = other[:, tf.newaxis]
            other_mask = other_mask[:, tf.newaxis]
        if not self.unit_vectors:
            centre = tf.math.l2_normalize(centre, axis=-1, epsilon=1e-12)
            other = tf.math.l2_normalize(other, axis=-1, epsilon=1e-12)
        if other.shape[2] == 1:
            return self._one_token_others(centre, centre_mask, other[:, :, 0], other_mask[:, :, 0],
                                          centre_weights)
        other_shape = tf.shape(other, out_type=tf.int64)  # [N, M, To, D]
        n, m = other_shape[0], other_shape[1]
        tc = tf.shape(centre, out_type=tf.int64)[1]
        # One batched matmul against the other texts' tokens side by side, laid out
        # [N, Tc, M, To]: an einsum to [N, M, Tc, To] cost a transpose per call, which was
        # most of the time of a neighbour list (To = 1).
        cosine = tf.reshape(
            tf.matmul(centre, tf.reshape(other, tf.stack([n, m * other_shape[2], other_shape[3]])),
                      transpose_b=True),
            tf.stack([n, tc, m, other_shape[2]]))
        # The kernels cost K times the interaction, and most of it is padding: texts are padded to
        # the batch's longest (up to 16 query and 32 title tokens) and most neighbour slots are
        # empty. So everything below runs on the real (centre token, other token)
        # pairs only; padding never enters the arithmetic.
        real = tf.where(tf.logical_and(centre_mask[:, :, tf.newaxis, tf.newaxis],
                                       other_mask[:, tf.newaxis]))  # [P, 4]: (n, i, m, j)
        kernels = tf.exp(tf.math.squared_difference(tf.gather_nd(cosine, real)[:, tf.newaxis],
                                                    self._mus)
                         * self._negative_inverse_two_variances)  # [P, K]
        # tf.where lists coordinates in row-major order, so the pairs of each (centre token,
        # other text) are consecutive: number the runs and sum the kernels per run (soft-TF).
        centre_token = (real[:, 0] * tc + real[:, 1]) * m + real[:, 2]
        starts = tf.not_equal(centre_token, tf.concat([[-1], centre_token], 0)[:-1])
        soft_tf = tf.math.segment_sum(kernels, tf.cumsum(tf.cast(starts, tf.int64)) - 1)  # [U, K]
        # A centre token with no real partner would add log1p(0) = 0: leaving it out is the same.
        total = self._mean_over_centre_tokens(tf.math.log1p(soft_tf), tf.boolean_mask(real, starts),
                                              n, m, centre_mask, centre_weights)
        return total[:, 0] if single else total

    def _one_token_others(self, centre, centre_mask, other, other_mask, centre_weights):
        """Others of one token each ([N, M, D], mask [N, M]; a neighbour list): soft-TF is then
        a single kernel value, so the runs of the general case need no summing."""
        shape = tf.shape(other, out_type=tf.int64)
        cosine = tf.matmul(centre, other, transpose_b=True)  # [N, Tc, M]
        real = tf.where(tf.logical_and(centre_mask[:, :, tf.newaxis],
                                       other_mask[:, tf.newaxis]))  # [P, 3]: (n, i, m)
        log_tf = tf.math.log1p(tf.exp(
            tf.math.squared_difference(tf.gather_nd(cosine, real)[:, tf.newaxis], self._mus)
            * self._negative_inverse_two_variances))  # [P, K]
        return self._mean_over_centre_tokens(log_tf, real, shape[0], shape[1], centre_mask,
                                             centre_weights)

    def _mean_over_centre_tokens(self, log_tf, pairs, n, m, centre_mask, centre_weights):
        """log_tf [P, K] of pairs whose first coordinates are (n, i, m) -> [N, M, K]: per other
        text, the mean over the centre's real tokens, or the sum weighted by centre_weights."""
        if centre_weights is not None:
            log_tf *= tf.gather_nd(centre_weights, pairs[:, :2])[:, tf.newaxis]
        total = tf.reshape(tf.math.unsorted_segment_sum(log_tf, pairs[:, 0] * m + pairs[:, 2], n * m),
                           tf.stack([n, m, tf.constant(self.num_kernels, tf.int64)]))
        if centre_weights is None:
            count = tf.reduce_sum(tf.cast(centre_mask, total.dtype), axis=1)
            total = tf.math.divide_no_nan(total, count[:, tf.newaxis, tf.newaxis])
        return total

    def get_config(self) -> Dict[str, Any]:
        return dict(super().get_config(), num_kernels=self.num_kernels,
                    unit_vectors=self.unit_vectors)


@tf.keras.utils.register_keras_serializable(package="relkd")
class NeighbourAttention(tf.keras.layers.Layer):
    """Graph attention over a node's neighbours; padding never takes part.

    Inputs `(centre, neighbours, values, weights, lengths)`:
      centre [N, Dc] (the pair's own text, encoded), neighbours [N, C, Dn] (each
      neighbour text, encoded), values [N, C, F] (what is aggregated, e.g. the
      kernel features of centre vs neighbour), weights [N, C] (path weights from
      the graph component), lengths [N] (real neighbours; slots >= length are
      padding).
    Score of neighbour j: v^T tanh(W_c c + W_n n_j + W_v f_j + b) + lambda *
    log(max(w_j, weight_floor)), lambda trainable (starts at 1). Softmax over
    the real neighbours only.
    Outputs `(attended [N, F], has_context [N, 1])`: the attention-weighted sum
    of values (zeros for a node without neighbours) and 1.0 iff length > 0.
    With `return_attention=True` the attention weights [N, C] come third.
    """

    def __init__(self, attention_dim: int = 32, weight_floor: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.attention_dim = attention_dim
        self.weight_floor = weight_floor
        self._centre = tf.keras.layers.Dense(attention_dim, use_bias=True, name="centre")
        self._neighbour = tf.keras.layers.Dense(attention_dim, use_bias=False, name="neighbour")
        self._value = tf.keras.layers.Dense(attention_dim, use_bias=False, name="value")
        self._score = tf.keras.layers.Dense(1, use_bias=False, name="score")

    def build(self, input_shape):
        self.log_weight_scale = self.add_weight("log_weight_scale", shape=[],
                                                initializer="ones", trainable=True)
        super().build(input_shape)

    def call(self, inputs, return_attention: bool = False):
        centre, neighbours, values, weights, lengths = inputs
        slots = tf.shape(weights)[1]
        mask = tf.sequence_mask(tf.reshape(tf.cast(lengths, tf.int32), [-1]), slots)  # [N, C]
        # Padding is replaced before any arithmetic, so no value of it can leak.
        mask3 = mask[..., tf.newaxis]
        neighbours = tf.where(mask3, neighbours, tf.zeros_like(neighbours))
        values = tf.where(mask3, values, tf.zeros_like(values))
        weights = tf.where(mask, weights, tf.ones_like(weights))
        hidden = tf.tanh(self._centre(centre)[:, tf.newaxis, :] + self._neighbour(neighbours)
                         + self._value(values))
        scores = tf.squeeze(self._score(hidden), -1)
        scores += self.log_weight_scale * tf.math.log(tf.maximum(weights, self.weight_floor))
        attention = masked_softmax(scores, mask)
        attended = tf.reduce_sum(attention[..., tf.newaxis] * values, axis=1)
        has_context = tf.cast(tf.reduce_any(mask, axis=1, keepdims=True), attended.dtype)
        if return_attention:
            return attended, has_context, attention
        return attended, has_context

    def get_config(self) -> Dict[str, Any]:
        return dict(super().get_config(), attention_dim=self.attention_dim,
                    weight_floor=self.weight_floor)


@tf.keras.utils.register_keras_serializable(package="relkd")
class OrderFusion(tf.keras.layers.Layer):
    """Attention over relevance orders: one logit from the available orders' logits.

    Inputs `(vectors, logits, context_available)`: vectors, a list of M tensors
    [N, H] (component 0 is the 0-order query-title relevance, the others the
    k-order components); logits [N, M], each component's own relevance logit;
    context_available [N, M - 1], 1.0 where context component c >= 1 has at
    least one neighbour (omitted when M == 1). Component 0 is always available.
    Gate score of component c: u^T tanh(W [v_c; v_0] + b) + prior_c; the
    fused logit [N] is the sum of the logits weighted by the softmax of the
    gate scores over the available components. A pair without any context
    (cold start) therefore gets exactly component 0's logit: the 0-order path.
    With `return_gates=True` the gates [N, M] come second.
    """

    def __init__(self, gate_dim: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.gate_dim = gate_dim
        self._hidden = tf.keras.layers.Dense(gate_dim, activation="tanh", name="gate_hidden")
        self._score = tf.keras.layers.Dense(1, use_bias=False, name="gate_score")

    def build(self, input_shape):
        num_components = len(input_shape[0])
        self.prior = self.add_weight("prior", shape=[num_components], initializer="zeros",
                                     trainable=True)
        super().build(input_shape)

    def call(self, inputs, return_gates: bool = False):
        vectors, logits = inputs[0], inputs[1]
        base = vectors[0]
        pairs = tf.stack([tf.concat([v, base], axis=-1) for v in vectors], axis=1)  # [N, M, 2H]
        scores = tf.squeeze(self._score(self._hidden(pairs)), -1) + self.prior  # [N, M]
        always = tf.ones_like(logits[:, :1], dtype=tf.bool)
        available = (tf.concat([always, tf.cast(inputs[2], tf.bool)], axis=1)
                     if len(inputs) > 2 else always)
        gates = masked_softmax(scores, available)
        fused = tf.reduce_sum(tf.where(available, gates * logits, tf.zeros_like(logits)), axis=1)
        if return_gates:
            return fused, gates
        return fused

    def get_config(self) -> Dict[str, Any]:
        return dict(super().get_config(), gate_dim=self.gate_dim)
