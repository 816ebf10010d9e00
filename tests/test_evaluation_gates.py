"""The student's gates, baseline and Pusher, with the pipeline's own nodes and hand-made models.

The models score a judged pair from its `gain` feature, so their metrics are known exactly: a
`good` model ranks every pair by its judgment (AUC 1), a `bad` one the other way round (AUC 0).
The nodes are the real DAG's (`pipeline.student_gate_components`: LatestBlessedModelStrategy
resolver, TFMA Evaluator with `pipeline/evaluation.py`'s EvalConfig, Pusher) under LocalDagRunner,
with ML Metadata kept between runs, as in repeated `relkd run`s into one output.
"""
import os

import pytest
import tensorflow as tf
from tfx import v1 as tfx

from components import example_codec
from pipeline import configs, pipeline as relkd_pipeline, run_summary

pytestmark = pytest.mark.e2e

NODE_IDS = ["ExamplesImporter", "ModelImporter", "LatestBlessedStudent", "StudentEvaluator", "Pusher"]


class GainScorer(tf.Module):
    """score = gain / 2 (good), 1 - gain / 2 (bad), or a constant; the Evaluator's signature."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve(self, examples):
        gain = tf.io.parse_example(examples, {"gain": tf.io.FixedLenFeature([], tf.float32)})["gain"]
        if self.kind == "good":
            score = gain / 2.0
        elif self.kind == "bad":
            score = 1.0 - gain / 2.0
        else:
            score = tf.fill(tf.shape(gain), 0.5)
        return {"score": score}


def save_model(directory, kind):
    model = GainScorer(kind)
    path = os.path.join(directory, "Format-Serving")
    tf.saved_model.save(model, path, signatures={"serving_default": model.serve})
    return directory


def write_examples(directory):
    path = os.path.join(directory, "Split-test", "data.tfrecord.gz")
    os.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for q in range(6):
            for i, relevance in enumerate((3.0, 2.5, 2.0, 1.0)):
                gain = relevance - 1.0
                writer.write(example_codec.to_example({
                    "query": f"query {q}", "item_id": f"P{q}-{i}", "relevance": relevance,
                    "gain": gain, "relevant": 1.0 if relevance >= 2.33 else 0.0,
                    "teacher_score": gain / 2.0, "query_segment": "head" if q < 2 else "tail",
                    "item_degree": "1", "graph_context": "warm" if i % 2 else "cold",
                }).SerializeToString())
    return directory


def run_once(tmp_path, model_dir, config):
    root = str(tmp_path / "root")
    examples = tfx.dsl.Importer(
        source_uri=str(tmp_path / "examples"), artifact_type=tfx.types.standard_artifacts.Examples,
        properties={"split_names": '["test"]'}).with_id("ExamplesImporter")
    model = tfx.dsl.Importer(source_uri=model_dir, artifact_type=tfx.types.standard_artifacts.Model,
                             reimport=True).with_id("ModelImporter")
    nodes = relkd_pipeline.student_gate_components(
        config, examples=examples.outputs["result"], model=model.outputs["result"],
        model_producer=("ModelImporter", "result"), serving_base=str(tmp_path / "serving"))
    metadata = str(tmp_path / "metadata.sqlite")
    tfx.orchestration.LocalDagRunner().run(tfx.dsl.Pipeline(
        pipeline_name="gates", pipeline_root=root, components=[examples, model, *nodes.values()],
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata),
        beam_pipeline_args=list(config.beam_pipeline_args)))
    return run_summary.collect(metadata, "gates", NODE_IDS, gates=config.evaluation.gates,
                               ndcg_k=config.evaluation.ndcg_k)


def versions(tmp_path):
    base = tmp_path / "serving" / "relkd"
    return sorted(os.listdir(base)) if base.exists() else []


def test_gates_bless_push_and_keep_out_a_regression(tmp_path):
    write_examples(str(tmp_path / "examples"))
    config = configs.load_config(overrides={"evaluation": {
        "gates": {"auc": {"bound": 0.6, "max_regression": 0.01}, "ndcg": {"bound": 0.5}},
        "gated_slices": ["query_segment"]}})

    # A model that clears every gate is blessed and pushed in TF Serving's layout.
    first = run_once(tmp_path, save_model(str(tmp_path / "good1"), "good"), config)
    student = first["evaluation"]["student"]
    assert student["blessed"] and first["evaluation"]["push"]["pushed"]
    assert student["candidate"]["auc"] == pytest.approx(1.0)
    assert student["candidate"]["query_count"] == 6  # the queries NDCG averaged over
    assert all(row["passed"] for row in student["gates"])
    assert {row["slice"] for row in student["gates"]} == {"all pairs", "query_segment=head",
                                                          "query_segment=tail"}
    [v1] = versions(tmp_path)
    assert v1.isdigit() and os.path.exists(tmp_path / "serving" / "relkd" / v1 / "saved_model.pb")
    assert run_summary.gate_failures(first) == []

    # A model that regresses against the blessed baseline is not blessed and not pushed, and
    # the summary names the metric, the slice and by how much.
    second = run_once(tmp_path, save_model(str(tmp_path / "bad"), "bad"), config)
    student = second["evaluation"]["student"]
    assert not student["blessed"] and not second["evaluation"]["push"]["pushed"]
    assert student["baseline"]["auc"] == pytest.approx(1.0)
    assert student["change"]["auc"] == pytest.approx(-1.0)
    # Queries counted once per model, not models per query, with a baseline alongside.
    assert student["candidate"]["query_count"] == student["baseline"]["query_count"] == 6
    failures = run_summary.gate_failures(second)
    assert any("auc on all pairs changed by -1.0000 against the last blessed model" in f for f in failures)
    assert any("auc on query_segment=tail is 0.0000, below the minimum 0.6 by 0.6000" in f for f in failures)
    markdown = run_summary.to_markdown(second)
    assert "**not blessed, not pushed**" in markdown and "**FAIL**" in markdown
    assert versions(tmp_path) == [v1]

    # The baseline is still the first model (the bad one was never blessed): a second good model
    # is compared against it, blessed, and added as a new version next to the first.
    third = run_once(tmp_path, save_model(str(tmp_path / "good2"), "good"), config)
    assert third["evaluation"]["student"]["blessed"]
    assert third["evaluation"]["student"]["change"]["auc"] == pytest.approx(0.0)
    [first_version, second_version] = versions(tmp_path)
    assert first_version == v1 and int(second_version) > int(v1)
    for version in (first_version, second_version):
        assert os.path.exists(tmp_path / "serving" / "relkd" / version / "saved_model.pb")


def test_a_model_below_an_absolute_bar_is_not_pushed_even_without_a_baseline(tmp_path):
    write_examples(str(tmp_path / "examples"))
    config = configs.load_config(overrides={"evaluation": {"gates": {"auc": {"bound": 0.7}}}})
    summary = run_once(tmp_path, save_model(str(tmp_path / "flat"), "constant"), config)
    assert not summary["evaluation"]["student"]["blessed"]
    assert summary["evaluation"]["student"]["candidate"]["auc"] == pytest.approx(0.5)
    assert run_summary.gate_failures(summary) == [
        "auc on all pairs is 0.5000, below the minimum 0.7 by 0.2000"]
    assert versions(tmp_path) == []
