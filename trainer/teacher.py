"""TFX Trainer module for the BERT cross-encoder teacher (Liu et al., EMNLP 2022).

The teacher reads `[CLS] query [SEP] item_title [SEP]` and predicts the human
relevance judgment. It is TF Models' `BertEncoderV2` (all-MiniLM-L6-v2 weights,
see `trainer.bert_checkpoint`) with tokenisation in the graph
(`trainer.text_encoding.QueryTitleEncoder`) and a sigmoid head on the pooled
[CLS] vector, so the exported model takes raw strings.

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

  * quick: num_layers=2, max_seq_length=48, epochs=4, learning_rate=1e-4 (a 2-layer
    teacher trains 2x and scores 3x faster than 6 layers; on the embedded data's 2,200
    judged pairs the default 3e-5 over 2 epochs stayed at eval AUC 0.5, while 1e-4 over 4
    epochs reached 0.81);
  * full: num_layers=6 (all of all-MiniLM-L6-v2), max_seq_length=64, epochs=3,
    learning_rate=5e-5.

Measured on 2 shared CPU cores (batch 32, max_seq_length 48): training about
50 pairs/s with 2 layers and 25 pairs/s with 6 layers; scoring about 350 and
120 pairs/s. The quick profile on the embedded data (2,200 judged pairs) thus
takes about 45 s an epoch, the full one about 2 minutes (more at 64 tokens).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import logging
import tensorflow as tf
from official.nlp import optimization

from trainer import bert_checkpoint
from trainer import text_encoding

QUERY_KEY = text_encoding.QUERY_KEY
TITLE_KEY = text_encoding.TITLE_KEY
LABEL_KEY = "relevance"
SCORE_KEY = "score"
EXAMPLES_KEY = "examples"
RAW_SIGNATURE = "serve_raw"
HISTORY_FILE = "history.json"
CONFIG_FILE = "teacher_config.json"

# Parsed at serving time; any other feature of the examples is ignored.
SERVING_FEATURE_SPEC = {
    QUERY_KEY: tf.io.FixedLenFeature([], tf.string),
    TITLE_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
}
TRAINING_FEATURE_SPEC = dict(SERVING_FEATURE_SPEC,
                             **{LABEL_KEY: tf.io.FixedLenFeature([], tf.float32)})

PROFILES: Dict[str, Dict[str, Any]] = {
    "quick": dict(num_layers=2, max_seq_length=48, epochs=4, learning_rate=1e-4),
    "full": dict(num_layers=6, max_seq_length=64, epochs=3, learning_rate=5e-5),
}

# custom_config keys that TFX extensions (Vertex / AI Platform training) put
# there for themselves; they are not teacher settings.
_FOREIGN_KEY_PREFIXES = ("ai_platform",)


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
      seed: seeds Python, NumPy, TF and the shuffling.
      tiny_encoder: `BertCheckpointConfig` fields of a small randomly
        initialised encoder (tests only; vocab_size must match the vocab).
      log_every_steps: training progress is logged every this many steps.
      shuffle_buffer: examples in the shuffle buffer.
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
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_custom_config(cls, custom_config: Optional[Mapping[str, Any]]
                           ) -> "TeacherConfig":
        """Reads a TFX custom_config; unknown keys are an error (typos)."""
        values = dict(custom_config or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values
                         if k not in names and not k.startswith(_FOREIGN_KEY_PREFIXES))
        if unknown:
            raise ValueError(f"unknown teacher custom_config keys {unknown}; "
                             f"known: {sorted(names)}")
        return cls(**{k: v for k, v in values.items() if k in names})

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

def _glob(file_patterns: Sequence[str]) -> List[str]:
    if isinstance(file_patterns, str):
        file_patterns = [file_patterns]
    files = sorted({f for pattern in file_patterns for f in tf.io.gfile.glob(pattern)})
    if not files:
        raise FileNotFoundError(f"no files match {list(file_patterns)}")
    return files


def _record_dataset(files: Sequence[str]) -> tf.data.Dataset:
    """Serialized records of TFRecord files, gzipped iff their names end in .gz."""
    gzipped = {f.endswith(".gz") for f in files}
    if len(gzipped) != 1:
        raise ValueError(f"mix of gzipped and plain TFRecord files: {list(files)}")
    return tf.data.TFRecordDataset(list(files), compression_type="GZIP" if gzipped.pop() else "")


def count_records(file_patterns: Sequence[str]) -> int:
    """Number of records in the files (a cheap pass: no parsing)."""
    dataset = _record_dataset(_glob(file_patterns))
    return int(dataset.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1).numpy())


def make_dataset(file_patterns: Sequence[str], config: TeacherConfig,
                 training: bool) -> tf.data.Dataset:
    """(`{"query", "item_title"}`, soft target) batches of tf.Example files.

    Training data is shuffled (seeded, reshuffled every epoch) and repeated
    when `config.steps_per_epoch` is set.
    """
    dataset = _record_dataset(_glob(file_patterns))
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

def build_teacher(encoder: tf.keras.layers.Layer, vocab_file: str,
                  max_seq_length: int = 48, query_max_tokens: Optional[int] = 16,
                  dropout: float = 0.1, name: str = "teacher") -> tf.keras.Model:
    """Cross-encoder: `{"query", "item_title"}` tf.string [B] -> score [B] in [0, 1].

    Args:
      encoder: a TF Models BERT encoder (dict in, dict with `pooled_output` out)
        whose position table covers `max_seq_length` and whose vocab is
        `vocab_file`.
      vocab_file: WordPiece vocab; becomes an asset of an exported model.
      max_seq_length, query_max_tokens: see `QueryTitleEncoder`.
      dropout: dropout on the pooled vector before the head.
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
    pooled = encoder(packed)["pooled_output"]
    pooled = tf.keras.layers.Dropout(dropout, name="head_dropout")(pooled)
    logit = tf.keras.layers.Dense(
        1, kernel_initializer=tf.keras.initializers.TruncatedNormal(stddev=0.02),
        name="relevance_logit")(pooled)
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


def teacher_from_config(config: TeacherConfig) -> tf.keras.Model:
    """The (untrained) teacher that `config` describes."""
    return build_teacher(_encoder_from_config(config), _vocab_from_config(config),
                         max_seq_length=config.max_seq_length,
                         query_max_tokens=config.query_max_tokens, dropout=config.dropout)


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


class RestoreBestEarlyStopping(tf.keras.callbacks.EarlyStopping):
    """EarlyStopping that restores the best weights even when no early stop happened.

    Keras 2 restores them only when it stops training itself; with patience
    reaching past the last epoch the last (worse) weights would be kept.
    """

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if (self.restore_best_weights and self.stopped_epoch == 0
                and self.best_weights is not None and self._last_epoch != self.best_epoch):
            logging.info("teacher: restoring the weights of epoch %d (best %s %.4f)",
                         self.best_epoch + 1, self.monitor, self.best)
            self.model.set_weights(self.best_weights)

    def on_epoch_end(self, epoch, logs=None):
        self._last_epoch = epoch
        super().on_epoch_end(epoch, logs)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._last_epoch = -1


def _with_tfx_steps(config: TeacherConfig, fn_args: Any) -> TeacherConfig:
    """Spreads TFX's train_args.num_steps over the epochs unless steps_per_epoch is set."""
    train_steps = getattr(fn_args, "train_steps", None)
    eval_steps = getattr(fn_args, "eval_steps", None)
    if config.steps_per_epoch is None and train_steps:
        config = dataclasses.replace(config, steps_per_epoch=math.ceil(train_steps / config.epochs))
    if config.eval_steps is None and eval_steps:
        config = dataclasses.replace(config, eval_steps=eval_steps)
    return config


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
        RestoreBestEarlyStopping(monitor="val_loss", patience=config.patience,
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

def _write_json(directory: Optional[str], name: str, value: Any) -> None:
    if not directory:
        return
    tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(os.path.join(directory, name), "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)


def run_fn(fn_args: Any) -> tf.keras.callbacks.History:
    """TFX Trainer entry point: train, early-stop, export. Returns the Keras History.

    Reads `fn_args.train_files`, `eval_files`, `serving_model_dir`,
    `model_run_dir` (TensorBoard logs, history.json, teacher_config.json),
    `custom_config` (`TeacherConfig`), and `train_steps`/`eval_steps` when the
    custom_config sets no steps_per_epoch/eval_steps.
    """
    config = _with_tfx_steps(
        TeacherConfig.from_custom_config(getattr(fn_args, "custom_config", None)), fn_args)
    tf.keras.utils.set_random_seed(config.seed)
    train_examples = count_records(fn_args.train_files)
    if not train_examples:
        raise ValueError(f"no training examples in {fn_args.train_files}")
    if config.steps_per_epoch is None:  # One pass over the data per epoch.
        steps_per_epoch = math.ceil(train_examples / config.batch_size)
        examples_per_epoch = train_examples
    else:  # The data is repeated, so every batch is full.
        steps_per_epoch = config.steps_per_epoch
        examples_per_epoch = steps_per_epoch * config.batch_size
    logging.info("teacher: %d training pairs, %d steps/epoch, up to %d epochs; config %s",
                 train_examples, steps_per_epoch, config.epochs, config.to_dict())

    model = teacher_from_config(config)
    compile_teacher(model, config, total_steps=steps_per_epoch * config.epochs)
    model_run_dir = getattr(fn_args, "model_run_dir", None)
    history = train(model, config, fn_args.train_files, fn_args.eval_files,
                    examples_per_epoch=examples_per_epoch, log_dir=model_run_dir)
    export_teacher(model, fn_args.serving_model_dir)
    _write_json(model_run_dir, HISTORY_FILE,
                {k: [float(x) for x in v] for k, v in history.history.items()})
    _write_json(model_run_dir, CONFIG_FILE, config.to_dict())
    return history
