"""Pipeline settings: one dataclass tree with defaults, overridable from a YAML/JSON file.

Every knob a user may turn per deployment lives here, so the local runner, the Kubeflow
runner and the tests all build the same pipeline from the same object. Unknown keys in a
config file are errors (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

import yaml

PIPELINE_NAME = "relkd"


class ConfigError(ValueError):
    """A config file is unreadable or names a setting that does not exist."""


@dataclasses.dataclass
class DataConfig:
    """How raw inputs are read and which rows are acceptable."""

    # Text encoding of CSV inputs (Parquet and TFRecord carry their own).
    encoding: str = "utf-8"
    # auto: by file name (.csv[.gz], .parquet, .tfrecord[.gz]); or csv | parquet | tfrecord.
    format: str = "auto"
    # Declared scale of human judgments; values outside it are quarantined.
    relevance_min: float = 1.0
    relevance_max: float = 3.0
    # Judgments at or above this count as relevant when a binary label is needed (AUC).
    relevant_threshold: float = 2.33
    # Longer texts are quarantined as `text_too_long`; real queries and titles are far shorter.
    max_query_chars: int = 256
    max_title_chars: int = 1024
    max_id_chars: int = 128
    # The run stops if more than this fraction of an input's rows is quarantined.
    max_quarantine_fraction: float = 0.01


@dataclasses.dataclass
class SplitConfig:
    """Hash buckets per split; rows are assigned by a hash of the query, never by row."""

    train_buckets: int = 8
    eval_buckets: int = 1
    test_buckets: int = 1


@dataclasses.dataclass
class DefaultDataConfig:
    """Size of the embedded generated shop used when no input is given."""

    seed: int = 20221207
    num_items: int = 1500
    num_queries: int = 400
    results_per_query: int = 20
    judged_query_fraction: float = 0.35
    fault_rate: float = 0.002


@dataclasses.dataclass
class PipelineConfig:
    name: str = PIPELINE_NAME
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    splits: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    default_data: DefaultDataConfig = dataclasses.field(default_factory=DefaultDataConfig)
    # In-memory DirectRunner with one worker is the fastest choice for the small local data;
    # on a cluster pass e.g. --runner=DataflowRunner --project=... (see README).
    beam_pipeline_args: List[str] = dataclasses.field(
        default_factory=lambda: ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
    )
    enable_cache: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _merge(target: Any, overrides: Dict[str, Any], where: str) -> None:
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(overrides).__name__}")
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in overrides.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(
                f"unknown setting '{path}'; known settings here: {', '.join(sorted(fields))}"
            )
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, path)
            continue
        if isinstance(current, bool) and not isinstance(value, bool):
            raise ConfigError(f"setting '{path}' must be true or false, got {value!r}")
        if isinstance(current, (int, float)) and not isinstance(current, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"setting '{path}' must be a number, got {value!r}")
            value = type(current)(value) if isinstance(current, float) else value
        if isinstance(current, list) and not isinstance(value, list):
            raise ConfigError(f"setting '{path}' must be a list, got {value!r}")
        if isinstance(current, str) and not isinstance(value, str):
            raise ConfigError(f"setting '{path}' must be a string, got {value!r}")
        setattr(target, key, value)


def validate(config: PipelineConfig) -> PipelineConfig:
    """Checks cross-field constraints so a bad config fails before any work starts."""
    data = config.data
    if data.relevance_min >= data.relevance_max:
        raise ConfigError(
            f"data.relevance_min ({data.relevance_min}) must be below "
            f"data.relevance_max ({data.relevance_max})"
        )
    if data.format not in ("auto", "csv", "parquet", "tfrecord"):
        raise ConfigError(f"data.format must be auto, csv, parquet or tfrecord, got {data.format!r}")
    if not 0.0 <= data.max_quarantine_fraction <= 1.0:
        raise ConfigError("data.max_quarantine_fraction must be between 0 and 1")
    try:
        "".encode(data.encoding)
    except LookupError as e:
        raise ConfigError(f"data.encoding: unknown encoding {data.encoding!r}") from e
    for name in ("train_buckets", "eval_buckets", "test_buckets"):
        if getattr(config.splits, name) < 1:
            raise ConfigError(f"splits.{name} must be at least 1")
    return config


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> PipelineConfig:
    """Defaults, then the file at `path` (YAML or JSON), then `overrides`."""
    config = PipelineConfig()
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            loaded = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot parse config file {path}: {e}") from e
        _merge(config, loaded or {}, "")
    if overrides:
        _merge(config, overrides, "")
    return validate(config)
