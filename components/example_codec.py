"""Plain dicts <-> tf.train.Example, the one place the project decides how features are typed.

Scalars become one-value features and lists become repeated features. An empty list still
gets its kind (from the name's suffix, or bytes) so parsers and TFDV see a consistent type
for the feature across examples.
"""
from typing import Any, Dict, Mapping

import tensorflow as tf

_FLOAT_SUFFIXES = ("_weights", "_scores", "_score")
_INT_SUFFIXES = ("_counts", "_ids_int")


def _kind_for_empty(name: str) -> str:
    if name.endswith(_FLOAT_SUFFIXES):
        return "float_list"
    if name.endswith(_INT_SUFFIXES):
        return "int64_list"
    return "bytes_list"


def _append(feature: tf.train.Feature, value: Any) -> None:
    if isinstance(value, (bool, int)):
        feature.int64_list.value.append(int(value))
    elif isinstance(value, float):
        feature.float_list.value.append(value)
    elif isinstance(value, bytes):
        feature.bytes_list.value.append(value)
    else:
        feature.bytes_list.value.append(str(value).encode("utf-8"))


def to_example(record: Mapping[str, Any]) -> tf.train.Example:
    example = tf.train.Example()
    for name, value in record.items():
        feature = example.features.feature[name]
        if isinstance(value, (list, tuple)):
            if not value:
                getattr(feature, _kind_for_empty(name)).SetInParent()
            for item in value:
                _append(feature, item)
        else:
            _append(feature, value)
    return example


def from_example(example: tf.train.Example, scalar_names=None) -> Dict[str, Any]:
    """Decodes bytes as UTF-8; a one-value feature becomes a scalar unless asked otherwise.

    `scalar_names`, when given, lists the features to unwrap; all others stay lists, so a
    one-neighbour context is still a list.
    """
    record: Dict[str, Any] = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
        unwrap = len(values) == 1 if scalar_names is None else name in scalar_names
        record[name] = (values[0] if values else None) if unwrap else values
    return record


def parse(serialized: bytes, scalar_names=None) -> Dict[str, Any]:
    return from_example(tf.train.Example.FromString(serialized), scalar_names)
