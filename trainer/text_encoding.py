"""In-graph BERT input encoding of (query, item title) pairs for a cross-encoder.

The teacher scores `[CLS] query [SEP] title [SEP]`. Tokenisation lives in the
TF graph (TF Models' `BertTokenizer` and `BertPackInputs` layers, on
tensorflow_text), so an exported SavedModel takes raw strings and serving can
never drift from training.

Text is normalised the way the checkpoint's own (Hugging Face) tokenizer does
it, which differs from tensorflow_text's `lower_case=True` in ways that change
token ids:
  * control and format characters (\\p{C}: NUL, BEL, zero-width space...) are
    deleted, not turned into word breaks (`ctrl\\x07char` is one word);
  * lower-casing is plain Unicode lower-casing, not NFKC case folding (which
    would turn `ß` into `ss` and full-width letters into ASCII);
  * then NFD and removal of combining marks strips accents (`café` -> `cafe`).
Invalid UTF-8 is replaced (and so dropped) instead of failing the batch.

Truncation: the query keeps at most `query_max_tokens` WordPiece tokens and the
title fills the rest of `max_seq_length`, so a long title can never push the
query out; with `query_max_tokens=None` the two share the budget round-robin.
Inputs longer than `max_chars` characters are cut before tokenisation, which
bounds the work a pathological string can cause without changing the tokens
that fit in the sequence for any ordinary text.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import tensorflow as tf
import tensorflow_text as text  # noqa: F401  (registers the ops the layers use)
from official.nlp.modeling import layers

QUERY_KEY = "query"
TITLE_KEY = "item_title"
DEFAULT_MAX_SEQ_LENGTH = 128
DEFAULT_QUERY_MAX_TOKENS = 16
DEFAULT_MAX_CHARS = 4096

# Hugging Face BasicTokenizer._clean_text: whitespace (incl. \p{Zs}) becomes a
# space, then U+FFFD and all other "C*" categories are deleted.
_WHITESPACE_REGEX = r"[\t\n\r\p{Zs}]"
_DELETED_REGEX = r"[\x{FFFD}\p{C}]"
_COMBINING_MARK_REGEX = r"\p{Mn}"
_PRINTABLE_ASCII_REGEX = r"[ -~]*"

_TextInputs = Union[Mapping[str, tf.Tensor], Sequence[tf.Tensor]]


def sanitize_utf8(texts: tf.Tensor) -> tf.Tensor:
    """Replaces invalid UTF-8 with U+FFFD so that no later op can fail on it."""
    return tf.strings.unicode_transcode(
        texts, input_encoding="UTF-8", output_encoding="UTF-8",
        errors="replace", replacement_char=0xFFFD)


def normalize_text(texts: tf.Tensor, lower_case: bool = True,
                   max_chars: Optional[int] = DEFAULT_MAX_CHARS) -> tf.Tensor:
    """HF-BERT text normalisation of a string tensor (any shape), in the graph.

    Args:
      texts: tf.string tensor.
      lower_case: lower-case and strip accents (uncased checkpoints).
      max_chars: cut each string to this many characters first (None: never).
    """
    texts = tf.convert_to_tensor(texts, tf.string)
    flat = tf.reshape(texts, [-1])
    # Nearly all catalogue text is printable ASCII, for which every step of the Unicode path
    # but the cut and the lower-casing is the identity; those strings skip the regexes and NFD,
    # which were most of the student's time to tokenise a title.
    plain = tf.cast(tf.strings.regex_full_match(flat, _PRINTABLE_ASCII_REGEX), tf.int32)
    rows = tf.dynamic_partition(tf.range(tf.size(flat)), plain, 2)
    unicode_texts, ascii_texts = tf.dynamic_partition(flat, plain, 2)
    if max_chars is not None:
        ascii_texts = tf.strings.substr(ascii_texts, 0, max_chars)
    if lower_case:
        ascii_texts = tf.strings.lower(ascii_texts)
    normalized = tf.dynamic_stitch(rows, [_normalize_unicode(unicode_texts, lower_case, max_chars),
                                          ascii_texts])
    return tf.reshape(normalized, tf.shape(texts))


def _normalize_unicode(texts: tf.Tensor, lower_case: bool, max_chars: Optional[int]) -> tf.Tensor:
    texts = sanitize_utf8(texts)
    if max_chars is not None:
        texts = tf.strings.substr(texts, 0, max_chars, unit="UTF8_CHAR")
    texts = tf.strings.regex_replace(texts, _WHITESPACE_REGEX, " ")
    texts = tf.strings.regex_replace(texts, _DELETED_REGEX, "")
    if lower_case:
        texts = tf.strings.lower(texts, encoding="utf-8")
        texts = text.normalize_utf8(texts, "NFD")
        texts = tf.strings.regex_replace(texts, _COMBINING_MARK_REGEX, "")
    return texts


def _as_batch(texts: tf.Tensor) -> tf.Tensor:
    """[batch] or [batch, 1] (as tf.Example features come) -> [batch] strings."""
    texts = tf.convert_to_tensor(texts)
    if texts.dtype != tf.string:
        raise TypeError(f"expected a tf.string tensor, got {texts.dtype}")
    return tf.reshape(texts, [-1])


class QueryTitleEncoder(tf.keras.layers.Layer):
    """Raw `query` and `item_title` strings -> BERT cross-encoder inputs.

    Call with a dict `{"query": q, "item_title": t}` or a pair `(q, t)` of
    tf.string tensors of shape [batch] (or [batch, 1]). Returns a dict of int32
    tensors of shape [batch, max_seq_length]: `input_word_ids`, `input_mask`
    (1 for real tokens), `input_type_ids` (0 for [CLS] query [SEP], 1 for
    title [SEP]) - exactly the inputs of TF Models' BERT encoders.
    """

    def __init__(self,
                 vocab_file: str,
                 max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
                 query_max_tokens: Optional[int] = DEFAULT_QUERY_MAX_TOKENS,
                 lower_case: bool = True,
                 max_chars: Optional[int] = DEFAULT_MAX_CHARS,
                 **kwargs):
        """Initialises the layer.

        Args:
          vocab_file: WordPiece vocab of the checkpoint (one token a line).
          max_seq_length: output length, special tokens included (>= 3).
          query_max_tokens: cap on the query's tokens; the title gets the rest.
            None shares the budget round-robin between query and title.
          lower_case: whether the vocab is uncased (all-MiniLM-L6-v2 is).
          max_chars: strings are cut to this many characters before
            tokenisation (None: never).
          **kwargs: standard Layer arguments.
        """
        super().__init__(**kwargs)
        if max_seq_length < 3:
            raise ValueError(f"max_seq_length must be >= 3 ([CLS] and two [SEP]), "
                             f"got {max_seq_length}")
        if query_max_tokens is not None and query_max_tokens < 1:
            raise ValueError(f"query_max_tokens must be >= 1 or None, got {query_max_tokens}")
        self._vocab_file = vocab_file
        self._max_seq_length = max_seq_length
        self._query_max_tokens = query_max_tokens
        self._lower_case = lower_case
        self._max_chars = max_chars
        # Normalisation happens in normalize_text (HF-compatible); the wrapped
        # tensorflow_text tokenizer must not lower-case/case-fold again.
        self._tokenizer = layers.BertTokenizer(vocab_file=vocab_file, lower_case=False)
        self._special_tokens = self._tokenizer.get_special_tokens_dict()
        for key in ("start_of_sequence_id", "end_of_segment_id", "padding_id"):
            if key not in self._special_tokens:
                raise ValueError(f"vocab {vocab_file} lacks the token for {key}")

    @property
    def special_tokens(self) -> Dict[str, int]:
        """Ids of [CLS], [SEP], [PAD], [MASK], [UNK]... and the vocab size."""
        return dict(self._special_tokens)

    def tokenize(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """WordPiece ids of each string, no special tokens: int32 [batch, (tokens)]."""
        texts = normalize_text(_as_batch(texts), self._lower_case, self._max_chars)
        return self._tokenizer(texts).merge_dims(1, 2)

    def call(self, inputs: _TextInputs) -> Dict[str, tf.Tensor]:
        query, title = self._split_inputs(inputs)
        query_tokens = self.tokenize(query)
        title_tokens = self.tokenize(title)
        budget = self._max_seq_length - 3
        if self._query_max_tokens is None:
            truncator = "round_robin"
        else:
            # Cap the query; the left-to-right waterfall then gives the title
            # whatever the (capped) query left over.
            query_tokens = query_tokens[:, :min(self._query_max_tokens, budget)]
            truncator = "waterfall"
        return layers.BertPackInputs.bert_pack_inputs(
            [query_tokens, title_tokens], self._max_seq_length,
            start_of_sequence_id=self._special_tokens["start_of_sequence_id"],
            end_of_segment_id=self._special_tokens["end_of_segment_id"],
            padding_id=self._special_tokens["padding_id"],
            truncator=truncator)

    @staticmethod
    def _split_inputs(inputs: _TextInputs) -> Tuple[tf.Tensor, tf.Tensor]:
        if isinstance(inputs, Mapping):
            missing = [k for k in (QUERY_KEY, TITLE_KEY) if k not in inputs]
            if missing:
                raise KeyError(f"QueryTitleEncoder inputs lack {missing}; got {sorted(inputs)}")
            return inputs[QUERY_KEY], inputs[TITLE_KEY]
        query, title = inputs
        return query, title

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(vocab_file=self._vocab_file,
                      max_seq_length=self._max_seq_length,
                      query_max_tokens=self._query_max_tokens,
                      lower_case=self._lower_case,
                      max_chars=self._max_chars)
        return config


def encode_query_title(query: tf.Tensor, item_title: tf.Tensor, vocab_file: str,
                       max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
                       query_max_tokens: Optional[int] = DEFAULT_QUERY_MAX_TOKENS
                       ) -> Dict[str, tf.Tensor]:
    """One-off functional form of `QueryTitleEncoder` (builds a new vocab table).

    In a model, keep one `QueryTitleEncoder` instead, so that the vocab table
    is created once and saved once as an asset.
    """
    encoder = QueryTitleEncoder(vocab_file, max_seq_length=max_seq_length,
                                query_max_tokens=query_max_tokens)
    return encoder({QUERY_KEY: query, TITLE_KEY: item_title})
