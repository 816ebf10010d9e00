import glob
import json
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", category=FutureWarning)

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _scratch(tmp_path_factory):
    """Every test's temporary files, TFX's packages of itself among them, go under pytest's
    base directory and are removed when the session ends (pipeline/scratch.py)."""
    from pipeline.scratch import scratch_directory

    with scratch_directory(str(tmp_path_factory.getbasetemp() / "scratch")) as path:
        yield path


def read_examples(split_dir):
    """All tf.Examples under a split directory, as plain dicts (see components.example_codec)."""
    import tensorflow as tf

    from components import example_codec

    records = []
    for path in sorted(glob.glob(os.path.join(split_dir, "*.gz"))):
        for raw in tf.data.TFRecordDataset(path, compression_type="GZIP").as_numpy_iterator():
            records.append(example_codec.parse(raw))
    return records


def write_title_split(root, split, pairs):
    """One gzipped split of tf.Examples with `query`, `item_title` and, when a row has a third
    value, `impressions`: `pairs` are (query, title) or (query, title, impressions) rows."""
    import tensorflow as tf

    os.makedirs(os.path.join(root, f"Split-{split}"))
    with tf.io.TFRecordWriter(os.path.join(root, f"Split-{split}", "data.gz"), "GZIP") as writer:
        for query, title, *impressions in pairs:
            example = tf.train.Example()
            example.features.feature["query"].bytes_list.value.append(query.encode())
            example.features.feature["item_title"].bytes_list.value.append(title.encode())
            if impressions:
                example.features.feature["impressions"].int64_list.value.append(impressions[0])
            writer.write(example.SerializeToString())


def run_example_gen(tmp_path, kind, input_path, rules=None, input_format="auto", splits=(8, 1, 1)):
    """Runs SearchDataExampleGen's executor on one input; returns (examples by split, quarantine rows, summary)."""
    from tfx.proto import example_gen_pb2
    from tfx.types import standard_artifacts
    from tfx.utils import proto_utils

    from components import artifacts
    from components.ingest import executor, rows
    from pipeline.configs import PipelineConfig
    from pipeline.pipeline import split_config

    config = PipelineConfig()
    config.splits.train_buckets, config.splits.eval_buckets, config.splits.test_buckets = splits
    rules = rules or rows.RowRules()
    out = tmp_path / f"out_{kind}"
    examples = standard_artifacts.Examples()
    examples.uri = str(out / "examples")
    quarantine = artifacts.Quarantine()
    quarantine.uri = str(out / "quarantine")
    os.makedirs(quarantine.uri, exist_ok=True)
    input_config = example_gen_pb2.Input(
        splits=[example_gen_pb2.Input.Split(name="single_split", pattern=os.path.basename(input_path))])
    exec_properties = {
        "input_base": os.path.dirname(os.path.abspath(input_path)),
        "input_config": proto_utils.proto_to_json(input_config),
        "output_config": proto_utils.proto_to_json(split_config(config)),
        "output_data_format": example_gen_pb2.FORMAT_TF_EXAMPLE,
        "output_file_format": example_gen_pb2.FORMAT_TFRECORDS_GZIP,
        "data_kind": kind,
        "row_rules": rules.to_json(),
        "input_format": input_format,
    }
    executor.Executor().Do({}, {"examples": [examples], "quarantine": [quarantine]}, exec_properties)
    by_split = {s: read_examples(os.path.join(examples.uri, f"Split-{s}")) for s in ("train", "eval", "test")}
    quarantined = []
    for path in sorted(glob.glob(os.path.join(quarantine.uri, "rows*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            quarantined += [json.loads(line) for line in f if line.strip()]
    return by_split, quarantined, executor.read_summary(quarantine.uri)


@pytest.fixture
def example_gen(tmp_path):
    def run(kind, input_path, **kwargs):
        return run_example_gen(tmp_path, kind, input_path, **kwargs)

    return run


@pytest.fixture(scope="session")
def tiny_berm_o(tmp_path_factory):
    """A BERM-O SavedModel of a tiny untrained student (0-order path: no tables), read-only."""
    import tensorflow as tf

    from trainer import berm_layers, berm_serving, bert_checkpoint, student

    vocab = berm_layers.read_vocab(bert_checkpoint.vocab_file())
    tf.keras.utils.set_random_seed(1)
    scorer = student.build_student(vocab, max_order=1, max_context_texts=3, max_query_tokens=8,
                                   max_title_tokens=12, max_context_tokens=8, embedding_dim=8,
                                   pretrained_embeddings=None, num_kernels=5, hidden_dim=8)
    path = str(tmp_path_factory.mktemp("export") / "berm_o")
    berm_serving.export_serving_model(scorer, path)
    return path
