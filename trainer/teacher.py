"""TFX Trainer module for the BERT cross-encoder teacher (Liu et al., EMNLP 2022).

The teacher reads `[CLS] query [SEP] item_title [SEP]` and predicts the human
relevance judgment. It is TF Models' `BertEncoderV2` (all-MiniLM-L6-v2 weights,
see `trainer.bert_checkpoint`) with tokenisation in the graph
(`trainer.text_encoding.QueryTitleEncoder`) and a sigmoid head on a pooled
vector of the last layer, so the exported model takes raw strings.

Pooling (`TeacherConfig.pooling`):

  * `mean` (default): the mean of the last layer's token vectors over the real
    (unpadded) tokens, special tokens included. all-MiniLM-L6-v2 is a
    sentence-transformers model trained with exactly this pooling, so its mean
    vector is the representation the checkpoint was tuned to produce.
  * `cls`: the last layer's [CLS] token vector (no pooler).
  * `pooler`: BERT's `pooled_output`, tanh(dense([CLS])). The checkpoint's pooler
    was never trained for all-MiniLM-L6-v2 (sentence-transformers ignore it);
    on Home Depot (2 layers, 12,000 training pairs) this head stayed near chance.

  * `segments`: [cos(u, v), u * v, |u - v|] of u, v the mean vectors of the query
    and the title segments of the joint encoding: the model's own sentence
    similarity inside the cross-encoder, so the untrained teacher already ranks
    (see `SegmentPairFeatures`).

Before training the head is calibrated on a few training batches
(`init_head_bias`, `calibrate_head`): its bias is set so that the mean initial
logit is the logit of the mean training target, so the untrained model already
predicts the label mean (judgments are skewed: mean relevance 2.38 of 1..3) and
the gradient goes into ranking pairs rather than into finding the mean (Adam
moves a bias by about the learning rate a step, far too slowly to find it); with
`segments` the cosine's weight starts at 1 / its standard deviation.

Labels are graded, not classes: a judgment r on the declared scale
[relevance_min, relevance_max] becomes the soft target
(r - relevance_min) / (relevance_max - relevance_min), clipped into [0, 1]
(2.33 on 1..3 is 0.665), and the teacher is trained with binary cross-entropy
on these targets, so its score estimates the normalised relevance.

Use as the `module_file` of a TFX Trainer; `run_fn(fn_args)` trains on
`fn_args.train_files`, early-stops on `fn_args.eval_files` (eval loss,
restoring the best epoch's weights) and exports to `fn_args.serving_model_dir`
a SavedModel with two signatures:

  * `serving_default`: `examples` tf.string [None] (serialized tf.Example with
    bytes features `query` and, optionally, `item_title`; other features are
    ignored) -> `{"score": tf.float32 [None]}`. This is what BulkInferrer
    (predict_output `score` -> `teacher_score`) and TFMA call.
  * `serve_raw`: `query`, `item_title` tf.string [None] -> `{"score": ...}`.

The WordPiece vocab is an asset of the SavedModel.

Settings come from `fn_args.custom_config` (see `TeacherConfig`; every key is
optional). Profiles are just values of these keys (`PROFILES`):

  * quick: num_layers=2, max_seq_length=48, epochs=4, learning_rate=1e-4,
    pooling=mean (a 2-layer teacher trains 2x and scores 3x faster than 6 layers; on
    the embedded data's 2,200 judged pairs the default 3e-5 over 2 epochs stayed at eval
    AUC 0.5, 1e-4 over 4 epochs on the pooler reached 0.81, and with mean pooling and
    the calibrated head 0.87);
  * full: num_layers=6 (all of all-MiniLM-L6-v2), max_seq_length=40, epochs=3,
    learning_rate=5e-5, pooling=segments. The sentence similarity of
    all-MiniLM-L6-v2 needs all 6 layers: zero-shot on the Home Depot eval split, the
    mean-pooled cosine of query and title encoded apart has AUC 0.70 with 6 layers
    and 0.58 with 2. 40 tokens hold 96% of Home Depot's pairs whole (48: 99%).

Quality and speed on Home Depot, each figure with the command that measured it and the
machine it ran on: README, *Teacher on Home Depot* and *Student on Home Depot*.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Dict, Mapping, Optional, Sequence

from absl import logging
import tensorflow as tf
from official.nlp import optimization

from trainer import bert_checkpoint
from trainer import text_encoding
from trainer import training
from trainer.training import record_dataset  # by name: make_dataset has a `training` flag

QUERY_KEY = text_encoding.QUERY_KEY
TITLE_KEY = text_encoding.TITLE_KEY
LABEL_KEY = "relevance"
SCORE_KEY = "score"
EXAMPLES_KEY = "examples"
RAW_SIGNATURE = "serve_raw"
HISTORY_FILE = training.HISTORY_FILE
HEAD_LAYER = "relevance_logit"
CALIBRATION_BATCHES = 8
CONFIG_FILE = "teacher_config.json"

# Parsed at serving time; any other feature of the examples is ignored.
SERVING_FEATURE_SPEC = {
    QUERY_KEY: tf.io.FixedLenFeature([], tf.string),
    TITLE_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
}
TRAINING_FEATURE_SPEC = dict(SERVING_FEATURE_SPEC,
                             **{LABEL_KEY: tf.io.FixedLenFeature([], tf.float32)})

POOLINGS = ("mean", "cls", "pooler", "segments")

PROFILES: Dict[str, Dict[str, Any]] = {
    "quick": dict(num_layers=2, max_seq_length=48, epochs=4, learning_rate=1e-4,
                  pooling="mean"),
    "full": dict(num_layers=6, max_seq_length=40, epochs=3, learning_rate=5e-5,
                 pooling="segments"),
}

@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Teacher settings; `from_custom_config` reads them from a TFX custom_config.

    Attributes:
      relevance_min, relevance_max: the declared judgment scale.
      num_layers: transformer layers kept from the checkpoint (None: all).
      max_seq_length: tokens of `[CLS] query [SEP] title [SEP]`.
      query_max_tokens: cap on the query's tokens (the title gets the rest).
      batch_size: training and evaluation batch size.
      learning_rate: peak learning rate of AdamW (linear warm-up, then linear
        decay to 0 over all planned steps).
      warmup_fraction: fraction of the planned steps used for warm-up.
      epochs: maximum number of epochs.
      steps_per_epoch: None for one full pass over the train files per epoch.
      eval_steps: None for a full pass over the eval files after each epoch.
      patience: epochs without eval-loss improvement before stopping; the best
        epoch's weights are restored in every case.
      pretrained: start from the pretrained checkpoint (falls back, with a loud
        warning, to random initialisation when the weights are not installed).
      checkpoint_dir: HF BERT checkpoint folder (None: the installed package).
      vocab_file: WordPiece vocab (None: the checkpoint's).
      dropout: dropout of the encoder and of the head.
      pooling: how the head reads the encoder: "mean" (masked mean of the last
        layer's tokens, how all-MiniLM-L6-v2 was trained), "cls" (the last
        layer's [CLS] vector) or "pooler" (BERT's pooled_output; see the module
        docstring).
      init_head_bias: calibrate the head before training (`calibrate_head`: the
        bias from the mean training target, one extra pass over the labels, and
        a few forward batches) instead of starting its bias at 0.
      seed: seeds Python, NumPy, TF and the shuffling.
      tiny_encoder: `BertCheckpointConfig` fields of a small randomly
        initialised encoder (tests only; vocab_size must match the vocab).
      log_every_steps: training progress is logged every this many steps.
      shuffle_buffer: examples in the shuffle buffer; a split no larger is read in one
        canonical order of the features the teacher reads (`training.record_dataset`), so the
        same judgments train the same model, whatever graph contexts their examples carry.
    """

    relevance_min: float = 1.0
    relevance_max: float = 3.0
    num_layers: Optional[int] = None
    max_seq_length: int = 48
    query_max_tokens: Optional[int] = 16
    batch_size: int = 32
    learning_rate: float = 3e-5
    warmup_fraction: float = 0.1
    epochs: int = 3
    steps_per_epoch: Optional[int] = None
    eval_steps: Optional[int] = None
    patience: int = 1
    pretrained: bool = True
    checkpoint_dir: Optional[str] = None
    vocab_file: Optional[str] = None
    dropout: float = 0.1
    pooling: str = "mean"
    init_head_bias: bool = True
    seed: int = 42
    tiny_encoder: Optional[Mapping[str, Any]] = None
    log_every_steps: int = 50
    shuffle_buffer: int = 10000

    def __post_init__(self):
        if not self.relevance_max > self.relevance_min:
            raise ValueError(f"relevance_max={self.relevance_max} must exceed "
                             f"relevance_min={self.relevance_min}")
        for name in ("batch_size", "epochs", "log_every_steps", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps_per_epoch", "eval_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    @classmethod
    def from_custom_config(cls, custom_config: Optional[Mapping[str, Any]]
                           ) -> "TeacherConfig":
        """Reads a TFX custom_config; unknown keys are an error (typos)."""
        values = training.known_settings(cls, custom_config, "teacher")
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        values = dataclasses.asdict(self)
        if self.tiny_encoder is not None:
            values["tiny_encoder"] = dict(self.tiny_encoder)
        return values


# --- Labels -------------------------------------------------------------------------

def relevance_to_target(relevance: tf.Tensor, relevance_min: float = 1.0,
                        relevance_max: float = 3.0) -> tf.Tensor:
    """Graded judgment -> soft target in [0, 1] (clipped if off the scale)."""
    if not relevance_max > relevance_min:
        raise ValueError(f"relevance_max={relevance_max} must exceed "
                         f"relevance_min={relevance_min}")
    relevance = tf.cast(relevance, tf.float32)
    target = (relevance - relevance_min) / (relevance_max - relevance_min)
    return tf.clip_by_value(target, 0.0, 1.0)


@tf.keras.utils.register_keras_serializable(package="relkd")
def soft_binary_crossentropy(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Per-example BCE of scores [B] against soft targets [B]."""
    return tf.keras.losses.binary_crossentropy(y_true[..., tf.newaxis],
                                               y_pred[..., tf.newaxis])


@tf.keras.utils.register_keras_serializable(package="relkd")
def squared_error(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Per-example squared error (Keras' `mse` would average over the batch axis)."""
    return tf.square(tf.cast(y_true, y_pred.dtype) - y_pred)


@tf.keras.utils.register_keras_serializable(package="relkd")
class BinarizedAUC(tf.keras.metrics.AUC):
    """ROC AUC with soft targets binarised: relevant iff target > threshold."""

    def __init__(self, threshold: float = 0.5, name: str = "auc", **kwargs):
        super().__init__(name=name, **kwargs)
        self._label_threshold = threshold

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(y_true > self._label_threshold, y_pred, sample_weight)

    def get_config(self):
        return dict(super().get_config(), threshold=self._label_threshold)


# --- Data ---------------------------------------------------------------------------

def count_records(file_patterns: Sequence[str]) -> int:
    """Number of records in the files (a cheap pass: no parsing)."""
    dataset = record_dataset(file_patterns)
    return int(dataset.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1).numpy())


def target_stats(file_patterns: Sequence[str], relevance_min: float = 1.0,
                 relevance_max: float = 3.0) -> Dict[str, float]:
    """`{"count", "mean_target"}` of the files' judgments (a pass parsing only labels)."""
    spec = {LABEL_KEY: TRAINING_FEATURE_SPEC[LABEL_KEY]}
    dataset = record_dataset(file_patterns).batch(1024).map(
        lambda serialized: relevance_to_target(
            tf.io.parse_example(serialized, spec)[LABEL_KEY], relevance_min, relevance_max))
    count, total = dataset.reduce(
        (tf.constant(0, tf.int64), tf.constant(0.0, tf.float64)),
        lambda acc, t: (acc[0] + tf.size(t, out_type=tf.int64),
                        acc[1] + tf.reduce_sum(tf.cast(t, tf.float64))))
    count = int(count.numpy())
    return {"count": count, "mean_target": float(total.numpy()) / count if count else math.nan}


def target_logit(mean_target: float, eps: float = 1e-3) -> float:
    """logit of a mean target, clipped into [eps, 1 - eps] (a finite head bias)."""
    p = min(max(float(mean_target), eps), 1.0 - eps)
    return math.log(p / (1.0 - p))


def make_dataset(file_patterns: Sequence[str], config: TeacherConfig,
                 training: bool) -> tf.data.Dataset:
    """(`{"query", "item_title"}`, soft target) batches of tf.Example files.

    Training data is shuffled (seeded, reshuffled every epoch) and repeated
    when `config.steps_per_epoch` is set.
    """
    dataset = record_dataset(file_patterns, config.shuffle_buffer,
                             order_by=sorted(TRAINING_FEATURE_SPEC))
    if training:
        dataset = dataset.shuffle(config.shuffle_buffer, seed=config.seed,
                                  reshuffle_each_iteration=True)
        if config.steps_per_epoch is not None:
            dataset = dataset.repeat()
    dataset = dataset.batch(config.batch_size)

    def parse(serialized):
        features = tf.io.parse_example(serialized, TRAINING_FEATURE_SPEC)
        target = relevance_to_target(features.pop(LABEL_KEY), config.relevance_min,
                                     config.relevance_max)
        return features, target

    return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True).prefetch(tf.data.AUTOTUNE)


# --- Model --------------------------------------------------------------------------

def masked_mean(sequence: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean of [B, T, H] over the T positions where mask [B, T] is 1 (zeros if none)."""
    mask = tf.cast(mask, sequence.dtype)[:, :, tf.newaxis]
    total = tf.reduce_sum(sequence * mask, axis=1)
    return total / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)


@tf.keras.utils.register_keras_serializable(package="relkd")
class SegmentPairFeatures(tf.keras.layers.Layer):
    """Token vectors, input mask, type ids -> [cos(u, v), u * v, |u - v|] of width 1 + 2H.

    u is the mean of the query segment (`[CLS] query [SEP]`, type 0), v of the
    title segment (`title [SEP]`, type 1): sentence-transformers' mean pooling
    applied to each side of the cross-encoder, and their cosine, which is how
    all-MiniLM-L6-v2 was trained to compare texts. Column 0 is the cosine.
    `dropout` applies to the other columns only: dropping the cosine, which the
    calibrated head weighs by 1 / its (small) standard deviation, would swing
    the logit by tens.
    """

    def __init__(self, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self._dropout_rate = dropout
        self._dropout = tf.keras.layers.Dropout(dropout)

    def get_config(self) -> Dict[str, Any]:
        return dict(super().get_config(), dropout=self._dropout_rate)

    def call(self, sequence: tf.Tensor, mask: tf.Tensor, type_ids: tf.Tensor,
             training: Optional[bool] = None) -> tf.Tensor:
        mask = tf.cast(mask, sequence.dtype)
        title = mask * tf.cast(type_ids, sequence.dtype)
        u = masked_mean(sequence, mask - title)
        v = masked_mean(sequence, title)
        cosine = tf.reduce_sum(tf.math.l2_normalize(u, axis=-1) * tf.math.l2_normalize(v, axis=-1),
                               axis=-1, keepdims=True)
        others = self._dropout(tf.concat([u * v, tf.abs(u - v)], axis=-1), training=training)
        return tf.concat([cosine, others], axis=-1)


@tf.keras.utils.register_keras_serializable(package="relkd")
class SequencePooling(tf.keras.layers.Layer):
    """[B, T, H] token vectors and [B, T] input mask -> [B, H].

    mode "mean": mean over the tokens whose mask is 1 (sentence-transformers'
    mean pooling; an all-padding row gives zeros); mode "cls": the first token.
    """

    def __init__(self, mode: str = "mean", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("mean", "cls"):
            raise ValueError(f"SequencePooling mode must be 'mean' or 'cls', got {mode!r}")
        self._mode = mode

    def call(self, sequence: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        if self._mode == "cls":
            return sequence[:, 0, :]
        return masked_mean(sequence, mask)

    def get_config(self) -> Dict[str, Any]:
        return dict(super().get_config(), mode=self._mode)


def build_teacher(encoder: tf.keras.layers.Layer, vocab_file: str,
                  max_seq_length: int = 48, query_max_tokens: Optional[int] = 16,
                  dropout: float = 0.1, pooling: str = "mean", head_bias: float = 0.0,
                  name: str = "teacher") -> tf.keras.Model:
    """Cross-encoder: `{"query", "item_title"}` tf.string [B] -> score [B] in [0, 1].

    Args:
      encoder: a TF Models BERT encoder (dict in, dict with `sequence_output`
        and `pooled_output` out) whose position table covers `max_seq_length`
        and whose vocab is `vocab_file`.
      vocab_file: WordPiece vocab; becomes an asset of an exported model.
      max_seq_length, query_max_tokens: see `QueryTitleEncoder`.
      dropout: dropout on the pooled vector before the head.
      pooling: "mean", "cls", "pooler" or "segments" (see `TeacherConfig.pooling`).
      head_bias: initial bias of the head's logit.
      name: Keras name of the model.
    """
    encoder_length = encoder.get_config().get("max_sequence_length")
    if encoder_length is not None and encoder_length < max_seq_length:
        raise ValueError(f"encoder has {encoder_length} positions, fewer than "
                         f"max_seq_length={max_seq_length}")
    inputs = {key: tf.keras.Input(shape=(), dtype=tf.string, name=key)
              for key in (QUERY_KEY, TITLE_KEY)}
    packed = text_encoding.QueryTitleEncoder(
        vocab_file, max_seq_length=max_seq_length, query_max_tokens=query_max_tokens,
        name="query_title_encoder")(inputs)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    outputs = encoder(packed)
    pooler = getattr(encoder, "pooler_layer", None)
    if pooling != "pooler" and pooler is not None:
        # Its output is not read, so it would get no gradient; frozen, Keras does not warn
        # about that on every training trace. Its weights stay in the model as they are.
        pooler.trainable = False
    if pooling == "pooler":
        pooled = outputs["pooled_output"]
    elif pooling == "segments":
        pooled = SegmentPairFeatures(dropout, name="segments_pooling")(
            outputs["sequence_output"], packed["input_mask"], packed["input_type_ids"])
    else:
        pooled = SequencePooling(pooling, name=f"{pooling}_pooling")(
            outputs["sequence_output"], packed["input_mask"])
        pooled = tf.keras.layers.Dropout(dropout, name="head_dropout")(pooled)
    logit = tf.keras.layers.Dense(
        1, kernel_initializer=tf.keras.initializers.TruncatedNormal(stddev=0.02),
        bias_initializer=tf.keras.initializers.Constant(head_bias),
        name=HEAD_LAYER)(pooled)
    score = tf.keras.layers.Activation("sigmoid", dtype=tf.float32, name="score")(logit)
    score = tf.keras.layers.Reshape((), name="squeeze_score")(score)
    return tf.keras.Model(inputs=inputs, outputs=score, name=name)


def _encoder_from_config(config: TeacherConfig) -> tf.keras.layers.Layer:
    """The pretrained encoder, or a random one (tiny_encoder / not pretrained)."""
    if config.tiny_encoder is not None or not config.pretrained:
        shape = bert_checkpoint.BertCheckpointConfig(**dict(config.tiny_encoder or {}))
        shape = dataclasses.replace(shape, hidden_dropout_prob=config.dropout,
                                    attention_probs_dropout_prob=config.dropout)
        return bert_checkpoint.encoder_from_scratch(
            shape, num_layers=config.num_layers, max_sequence_length=config.max_seq_length)
    checkpoint_dir = config.checkpoint_dir or bert_checkpoint.find_pretrained_dir()
    if checkpoint_dir is None:
        # encoder_from_scratch warns loudly about what this means.
        return bert_checkpoint.encoder_from_scratch(
            dataclasses.replace(bert_checkpoint.BertCheckpointConfig(),
                                hidden_dropout_prob=config.dropout,
                                attention_probs_dropout_prob=config.dropout),
            num_layers=config.num_layers, max_sequence_length=config.max_seq_length)
    return bert_checkpoint.load_pretrained_encoder(
        checkpoint_dir, num_layers=config.num_layers,
        max_sequence_length=config.max_seq_length, dropout_rate=config.dropout)


def _vocab_from_config(config: TeacherConfig) -> str:
    vocab = config.vocab_file or bert_checkpoint.vocab_file(config.checkpoint_dir)
    if vocab is None:
        raise FileNotFoundError(
            "no WordPiece vocab: set custom_config['vocab_file'] or install "
            f"{bert_checkpoint.PRETRAINED_PIP_NAME}")
    return vocab


def teacher_from_config(config: TeacherConfig, head_bias: float = 0.0) -> tf.keras.Model:
    """The (untrained) teacher that `config` describes, its head's bias at `head_bias`."""
    return build_teacher(_encoder_from_config(config), _vocab_from_config(config),
                         max_seq_length=config.max_seq_length,
                         query_max_tokens=config.query_max_tokens, dropout=config.dropout,
                         pooling=config.pooling, head_bias=head_bias)


def calibrate_head(model: tf.keras.Model, dataset: tf.data.Dataset, mean_target: float,
                   batches: int = CALIBRATION_BATCHES) -> Dict[str, float]:
    """Sets the head so the untrained teacher predicts the mean target on average.

    On `batches` batches of `dataset` (features, target), without dropout: with
    a `segments_pooling` layer, the cosine's weight (kernel row 0) becomes 1 / the
    standard deviation of the cosine; then the bias is shifted so that the mean
    logit equals `target_logit(mean_target)`. Returns what it set.
    """
    head = model.get_layer(HEAD_LAYER)
    features = [f for f, _ in dataset.take(batches)]
    if not features:
        raise ValueError("no batches to calibrate the head on")
    kernel, bias = head.get_weights()
    result: Dict[str, float] = {}
    if any(layer.name == "segments_pooling" for layer in model.layers):
        pooled = tf.keras.Model(model.input, model.get_layer("segments_pooling").output)
        cosine = tf.concat([pooled(f, training=False)[:, 0] for f in features], axis=0)
        kernel[0, 0] = 1.0 / max(float(tf.math.reduce_std(cosine)), 1e-3)
        result["cosine_weight"] = float(kernel[0, 0])
        result["cosine_mean"] = float(tf.reduce_mean(cosine))
        head.set_weights([kernel, bias])
    logits = tf.keras.Model(model.input, head.output)
    mean_logit = float(tf.reduce_mean(tf.concat([logits(f, training=False)[:, 0]
                                                 for f in features], axis=0)))
    bias[0] += target_logit(mean_target) - mean_logit
    head.set_weights([kernel, bias])
    result["bias"] = float(bias[0])
    return result


def compile_teacher(model: tf.keras.Model, config: TeacherConfig, total_steps: int) -> None:
    """AdamW with linear warm-up and decay (TF Models' BERT recipe), BCE on soft targets."""
    optimizer = optimization.create_optimizer(
        init_lr=config.learning_rate, num_train_steps=max(total_steps, 1),
        num_warmup_steps=int(config.warmup_fraction * total_steps))
    model.compile(optimizer=optimizer, loss=soft_binary_crossentropy,
                  metrics=[tf.keras.metrics.MeanMetricWrapper(squared_error, name="mse"),
                           BinarizedAUC(name="auc")])


# --- Training -----------------------------------------------------------------------

class ProgressLogger(tf.keras.callbacks.Callback):
    """absl-logs steps and epochs: losses, metrics and training pairs/s."""

    def __init__(self, examples_per_epoch: int, epochs: int, log_every_steps: int):
        super().__init__()
        self._examples_per_epoch = examples_per_epoch
        self._epochs = epochs
        self._log_every_steps = log_every_steps
        self._epoch = 0
        self._epoch_start = self._train_seconds = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = time.perf_counter()
        self._train_seconds = 0.0

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self._log_every_steps == 0:
            seconds = time.perf_counter() - self._epoch_start
            steps = self.params.get("steps") or "?"
            logging.info("teacher: epoch %d step %d/%s loss %.4f (%.1f s)",
                         self._epoch + 1, batch + 1, steps, (logs or {}).get("loss", math.nan),
                         seconds)

    def on_test_begin(self, logs=None):
        if not self._train_seconds:
            self._train_seconds = time.perf_counter() - self._epoch_start

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = time.perf_counter() - self._epoch_start
        train_seconds = self._train_seconds or seconds
        metrics = " ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items())
                           if isinstance(v, (int, float)))
        logging.info("teacher: epoch %d/%d %s | %.1f train pairs/s, %.1f s",
                     epoch + 1, self._epochs, metrics,
                     self._examples_per_epoch / max(train_seconds, 1e-9), seconds)


def train(model: tf.keras.Model, config: TeacherConfig, train_files: Sequence[str],
          eval_files: Sequence[str], examples_per_epoch: int,
          log_dir: Optional[str] = None) -> tf.keras.callbacks.History:
    """Fits a compiled teacher; early stopping on eval loss restores the best epoch.

    `examples_per_epoch` is only used to log the training speed.
    """
    train_data = make_dataset(train_files, config, training=True)
    eval_data = make_dataset(eval_files, config, training=False)
    callbacks = [
        ProgressLogger(examples_per_epoch, config.epochs, config.log_every_steps),
        training.RestoreBestEarlyStopping(monitor="val_loss", patience=config.patience,
                                 restore_best_weights=True),
    ]
    if log_dir:
        callbacks.append(tf.keras.callbacks.TensorBoard(
            log_dir=log_dir, update_freq="epoch", write_graph=False, profile_batch=0))
    return model.fit(train_data, validation_data=eval_data, epochs=config.epochs,
                     steps_per_epoch=config.steps_per_epoch, validation_steps=config.eval_steps,
                     callbacks=callbacks, verbose=0)


# --- Export -------------------------------------------------------------------------

def serving_signatures(model: tf.keras.Model) -> Dict[str, tf.types.experimental.ConcreteFunction]:
    """`serving_default` (serialized tf.Examples) and `serve_raw` (strings)."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_KEY)])
    def serve_examples(examples):
        features = tf.io.parse_example(examples, SERVING_FEATURE_SPEC)
        return {SCORE_KEY: model(features, training=False)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=QUERY_KEY),
                                  tf.TensorSpec([None], tf.string, name=TITLE_KEY)])
    def serve_raw(query, item_title):
        return {SCORE_KEY: model({QUERY_KEY: query, TITLE_KEY: item_title}, training=False)}

    return {
        tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY: serve_examples.get_concrete_function(),
        RAW_SIGNATURE: serve_raw.get_concrete_function(),
    }


def export_teacher(model: tf.keras.Model, serving_model_dir: str) -> None:
    """Writes the SavedModel (vocab included as an asset) with both signatures."""
    model.save(serving_model_dir, save_format="tf", include_optimizer=False,
               signatures=serving_signatures(model))
    logging.info("teacher: exported SavedModel to %s", serving_model_dir)


# --- TFX entry point ------------------------------------------------------------------

def run_fn(fn_args: Any) -> tf.keras.callbacks.History:
    """TFX Trainer entry point: train, early-stop, export. Returns the Keras History.

    Reads `fn_args.train_files`, `eval_files`, `serving_model_dir`,
    `model_run_dir` (TensorBoard logs, history.json, teacher_config.json),
    `custom_config` (`TeacherConfig`), and `train_steps`/`eval_steps` when the
    custom_config sets no steps_per_epoch/eval_steps.
    """
    config = training.with_tfx_steps(
        TeacherConfig.from_custom_config(getattr(fn_args, "custom_config", None)), fn_args)
    tf.keras.utils.set_random_seed(config.seed)
    stats = target_stats(fn_args.train_files, config.relevance_min, config.relevance_max)
    train_examples = stats["count"]
    if not train_examples:
        raise ValueError(f"no training examples in {fn_args.train_files}")
    if config.steps_per_epoch is None:  # One pass over the data per epoch.
        steps_per_epoch = math.ceil(train_examples / config.batch_size)
        examples_per_epoch = train_examples
    else:  # The data is repeated, so every batch is full.
        steps_per_epoch = config.steps_per_epoch
        examples_per_epoch = steps_per_epoch * config.batch_size
    logging.info("teacher: %d training pairs (mean target %.4f), %d steps/epoch, up to %d "
                 "epochs; config %s", train_examples, stats["mean_target"], steps_per_epoch,
                 config.epochs, config.to_dict())

    model = teacher_from_config(config)
    if config.init_head_bias:
        calibrated = calibrate_head(
            model, make_dataset(fn_args.train_files, config, training=True), stats["mean_target"])
        logging.info("teacher: head calibrated on %d training batches: %s",
                     CALIBRATION_BATCHES, calibrated)
    compile_teacher(model, config, total_steps=steps_per_epoch * config.epochs)
    model_run_dir = getattr(fn_args, "model_run_dir", None)
    history = train(model, config, fn_args.train_files, fn_args.eval_files,
                    examples_per_epoch=examples_per_epoch, log_dir=model_run_dir)
    export_teacher(model, fn_args.serving_model_dir)
    training.write_run_files(model_run_dir, history, CONFIG_FILE, config.to_dict())
    return history
