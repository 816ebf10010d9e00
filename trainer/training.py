"""Training plumbing shared by the teacher and student module files."""
import collections.abc
import dataclasses
import difflib
import json
import math
import os
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence, TypeVar

import tensorflow as tf
from absl import logging

C = TypeVar("C")

HISTORY_FILE = "history.json"


class RestoreBestEarlyStopping(tf.keras.callbacks.EarlyStopping):
    """EarlyStopping that restores the best weights even when no early stop happened.

    Keras 2 restores them only when it stops training itself; with patience reaching past
    the last epoch the last (worse) weights would be kept.
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._last_epoch = -1

    def on_epoch_end(self, epoch, logs=None):
        self._last_epoch = epoch
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if (self.restore_best_weights and self.stopped_epoch == 0
                and self.best_weights is not None and self._last_epoch != self.best_epoch):
            logging.info("restoring the weights of epoch %d (best %s %.4f)",
                         self.best_epoch + 1, self.monitor, self.best)
            self.model.set_weights(self.best_weights)


# Keys TFX itself may put into a Trainer's custom_config (Vertex AI training settings).
FOREIGN_KEY_PREFIXES = ("ai_platform",)


def known_settings(config_class: type, custom_config: Optional[Mapping[str, Any]],
                   what: str) -> Dict[str, Any]:
    """The custom_config's settings for `config_class`: its fields; any other key is an error.

    A misspelt setting would otherwise train with the default without a word, so the error
    names the nearest field for each unknown key.
    """
    values = dict(custom_config or {})
    names = sorted(f.name for f in dataclasses.fields(config_class))
    unknown = sorted(k for k in values
                     if k not in names and not k.startswith(FOREIGN_KEY_PREFIXES))
    if unknown:
        guesses = [f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k)
                   for k in unknown for close in [difflib.get_close_matches(k, names, n=1)]]
        raise ValueError(f"unknown {what} custom_config keys: {', '.join(guesses)}; "
                         f"known: {names}")
    hints = typing.get_type_hints(config_class)
    return {k: _typed(hints[k], v, f"{what} setting {k!r}") for k, v in values.items() if k in names}


def _typed(hint: Any, value: Any, what: str) -> Any:
    """`value` as a field typed `hint` holds it (a whole float as an int), or a ValueError that
    names the setting: a wrong type would otherwise fail deep in training, or not at all."""
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and number and float(value).is_integer():
        return int(value)
    if hint is float and number:
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    origin = typing.get_origin(hint)
    if origin is tuple and (isinstance(value, int) and not isinstance(value, bool)
                            or isinstance(value, (list, tuple))):
        return value  # the config class reads one cut-off or several
    if origin is collections.abc.Mapping and isinstance(value, Mapping):
        return value
    wanted = {bool: "true or false", int: "a whole number", float: "a number",
              str: "a string"}.get(hint, "a list" if origin is tuple else "a mapping")
    raise ValueError(f"{what} must be {wanted}, got {value!r}")


def with_tfx_steps(config: C, fn_args: Any) -> C:
    """Spreads TFX's train_args.num_steps over the epochs unless steps_per_epoch is set.

    `config` is a dataclass with `epochs`, `steps_per_epoch` and `eval_steps` fields.
    """
    train_steps = getattr(fn_args, "train_steps", None)
    eval_steps = getattr(fn_args, "eval_steps", None)
    if config.steps_per_epoch is None and train_steps:
        config = dataclasses.replace(config, steps_per_epoch=math.ceil(train_steps / config.epochs))
    if config.eval_steps is None and eval_steps:
        config = dataclasses.replace(config, eval_steps=eval_steps)
    return config


def tfrecord_files(file_patterns: Sequence[str]) -> List[str]:
    """The sorted, distinct files matching one pattern or several; none is an error."""
    if isinstance(file_patterns, str):
        file_patterns = [file_patterns]
    files = sorted({f for pattern in file_patterns for f in tf.io.gfile.glob(pattern)})
    if not files:
        raise FileNotFoundError(f"no files match {list(file_patterns)}")
    return files


def record_dataset(file_patterns: Sequence[str], canonical_up_to: int = 0,
                   order_by: Optional[Sequence[str]] = None) -> tf.data.Dataset:
    """Serialized records of the matching TFRecord files, gzipped iff their names end in .gz.

    With `canonical_up_to` > 0, files holding at most that many records in all are read in one
    canonical order (sorted by their bytes) instead of the order they were written in. The
    trainers pass their shuffle buffer: data that fits it is shuffled whole, so no order is
    lost, and the same examples then train the same model. Beam does not keep an order: on
    the local runner GraphContexts writes the same examples in one of several orders from run
    to run (the runner orders independent stages through sets of objects hashed by identity),
    and on the embedded data the students those orders trained differed by up to 0.03 AUC,
    more than the gates' default `max_regression` (README, *The two commands*).

    With `order_by` (tf.Example feature names), the canonical order is that of those features
    alone, so that features a trainer never reads do not move its data: the teacher's examples
    carry the graph's contexts, and a graph setting would otherwise train another teacher.
    Examples equal in those features, which the trainer cannot tell apart, follow in byte order.
    """
    files = tfrecord_files(file_patterns)
    gzipped = {f.endswith(".gz") for f in files}
    if len(gzipped) != 1:
        raise ValueError(f"mix of gzipped and plain TFRecord files: {files}")
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP" if gzipped.pop() else "")
    if canonical_up_to > 0:
        records = list(dataset.take(canonical_up_to + 1).as_numpy_iterator())
        if len(records) <= canonical_up_to:
            key = (lambda r: r) if order_by is None else _feature_key(order_by)
            return tf.data.Dataset.from_tensor_slices(
                tf.constant(sorted(records, key=key), tf.string))
    return dataset


def _feature_key(names: Sequence[str]):
    """A serialized tf.Example -> (its `names` features' bytes, then its own bytes)."""
    def key(record: bytes):
        features = tf.train.Example.FromString(record).features.feature
        return tuple(features[name].SerializeToString(deterministic=True) if name in features
                     else b"" for name in names) + (record,)
    return key


def write_run_files(model_run_dir: Optional[str], history: tf.keras.callbacks.History,
                    config_file: str, config: Mapping[str, Any]) -> None:
    """Writes HISTORY_FILE (per-epoch metrics) and `config_file` into the Trainer's run dir,
    for the run summary and people; nothing without a run dir."""
    if not model_run_dir:
        return
    tf.io.gfile.makedirs(model_run_dir)
    epochs = {k: [float(x) for x in v] for k, v in history.history.items()}
    for name, value in ((HISTORY_FILE, epochs), (config_file, dict(config))):
        with tf.io.gfile.GFile(os.path.join(model_run_dir, name), "w") as f:
            json.dump(value, f, indent=2, sort_keys=True)
