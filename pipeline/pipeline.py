"""The relkd TFX pipeline definition, shared by the local runner and the Kubeflow runner.

Only the DAG lives here; where the data is, where artifacts go and how metadata is stored
are the runners' business.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

from ml_metadata.proto import metadata_store_pb2
from tfx import v1 as tfx
from tfx.dsl.components.base import base_node
from tfx.proto import bulk_inferrer_pb2, example_gen_pb2

from components import serving_pusher
from components.berm_exporter import BermServingExporter
from components.data_gate import DataValidationGate
from components.runtime_trainer import RuntimeTrainer
from components.graph.component import GraphContexts
from components.ingest import rows
from components.ingest.component import SearchDataExampleGen
from components.title_encoder import TitleEncoder
from pipeline import evaluation
from pipeline.configs import (PipelineConfig, eval_feature_config, student_custom_config,
                              teacher_custom_config)
from schemas import schema_path


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Where one input lives: a directory (or bucket prefix) and a file pattern inside it.

    `base` may be a RuntimeParameter (the Kubeflow runner's `logs_uri` / `judgments_uri`).
    """

    base: Any
    pattern: str = "*"


@dataclasses.dataclass(frozen=True)
class RunParameters:
    """Values that replace the config's for one run; None keeps the config's value.

    The local runner passes none (plain config values). The Kubeflow runner passes tfx
    RuntimeParameters here, so a compiled pipeline takes them per run (kubeflow/runner.py).
    """

    max_quarantine_fraction: Any = None  # float: the data gate's quarantine limit
    graph_max_order: Any = None  # int: metapath order k of the graph contexts (and the student's)
    graph_top_n: Any = None  # int: neighbours kept per node and metapath
    # int: the impressions below which a node gets no tables in BERM-O (and its title no vector)
    graph_table_min_impressions: Any = None
    teacher_epochs: Any = None  # int: the teacher's maximum epochs


NO_RUN_PARAMETERS = RunParameters()


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def split_config(config: PipelineConfig) -> example_gen_pb2.Output:
    # Partitioning on the query (TFX hashes the feature value) keeps every query in exactly
    # one split, and in the same split for logs and judgments.
    splits = config.splits
    return example_gen_pb2.Output(
        split_config=example_gen_pb2.SplitConfig(
            splits=[
                example_gen_pb2.SplitConfig.Split(name="train", hash_buckets=splits.train_buckets),
                example_gen_pb2.SplitConfig.Split(name="eval", hash_buckets=splits.eval_buckets),
                example_gen_pb2.SplitConfig.Split(name="test", hash_buckets=splits.test_buckets),
            ],
            partition_feature_name="query",
        )
    )


def ingestion_components(config: PipelineConfig, logs: InputSpec, judgments: InputSpec,
                         run: RunParameters = NO_RUN_PARAMETERS,
                         schema_dir: Optional[str] = None) -> Dict[str, base_node.BaseNode]:
    """ExampleGen -> StatisticsGen -> curated schema -> ExampleValidator for each input, then the gate."""
    rules = rows.RowRules.from_data_config(config.data)
    nodes: Dict[str, base_node.BaseNode] = {}
    for kind, spec in ((rows.LOGS, logs), (rows.JUDGMENTS, judgments)):
        prefix = kind.capitalize()
        example_gen = SearchDataExampleGen(
            input_base=spec.base,
            input_pattern=spec.pattern,
            data_kind=kind,
            row_rules=rules,
            input_format=config.data.format,
            output_config=split_config(config),
        ).with_id(f"{prefix}ExampleGen")
        statistics_gen = tfx.components.StatisticsGen(
            examples=example_gen.outputs["examples"]).with_id(f"{prefix}StatisticsGen")
        schema_importer = tfx.components.ImportSchemaGen(
            schema_file=schema_path(kind, schema_dir)).with_id(f"{prefix}SchemaImporter")
        example_validator = tfx.components.ExampleValidator(
            statistics=statistics_gen.outputs["statistics"],
            schema=schema_importer.outputs["schema"]).with_id(f"{prefix}ExampleValidator")
        for node in (example_gen, statistics_gen, schema_importer, example_validator):
            nodes[node.id] = node
    nodes["DataValidationGate"] = DataValidationGate(
        logs_anomalies=nodes["LogsExampleValidator"].outputs["anomalies"],
        judgments_anomalies=nodes["JudgmentsExampleValidator"].outputs["anomalies"],
        logs_quarantine=nodes["LogsExampleGen"].outputs["quarantine"],
        judgments_quarantine=nodes["JudgmentsExampleGen"].outputs["quarantine"],
        max_quarantine_fraction=_given(run.max_quarantine_fraction, config.data.max_quarantine_fraction),
    ).with_id("DataValidationGate")
    return nodes


def graph_components(config: PipelineConfig, ingestion: Dict[str, base_node.BaseNode],
                     run: RunParameters = NO_RUN_PARAMETERS) -> Dict[str, base_node.BaseNode]:
    """The query-item graph and contexts joined onto logs and judgments, after the data gate."""
    graph = GraphContexts(
        logs=ingestion["LogsExampleGen"].outputs["examples"],
        judgments=ingestion["JudgmentsExampleGen"].outputs["examples"],
        data_report=ingestion["DataValidationGate"].outputs["report"],
        config=config.graph,
        max_order=run.graph_max_order,
        top_n=run.graph_top_n,
        table_min_impressions=run.graph_table_min_impressions,
        eval_features=eval_feature_config(config),
    ).with_id("GraphContexts")
    return {graph.id: graph}


TEACHER_SCORE = "teacher_score"


def teacher_components(config: PipelineConfig, graph: Dict[str, base_node.BaseNode],
                       run: RunParameters = NO_RUN_PARAMETERS) -> Dict[str, base_node.BaseNode]:
    """Fine-tune the BERT cross-encoder on the judgments, then label every logged pair with it."""
    trainer = RuntimeTrainer(
        run_fn="trainer.teacher.run_fn",
        examples=graph["GraphContexts"].outputs["judgment_examples"],
        custom_config=teacher_custom_config(config),
        epochs=run.teacher_epochs,
    ).with_id("TeacherTrainer")
    labeller = tfx.components.BulkInferrer(
        examples=graph["GraphContexts"].outputs["log_examples"],
        model=trainer.outputs["model"],
        data_spec=tfx.proto.DataSpec(),  # every split: the student trains and is checked on teacher scores
        model_spec=tfx.proto.ModelSpec(model_signature_name=["serving_default"]),
        output_example_spec=_teacher_score_columns(),
    ).with_id("TeacherLabeller")
    return {trainer.id: trainer, labeller.id: labeller}


def student_components(config: PipelineConfig, nodes: Dict[str, base_node.BaseNode],
                       run: RunParameters = NO_RUN_PARAMETERS) -> Dict[str, base_node.BaseNode]:
    """Distil the teacher's scores into the BERM student, then package BERM-O with the graph's tables.

    With `student.title_vectors`, TitleEncoder first encodes every logged title (and the train
    queries; with `graph.table_min_impressions`, those logged at least that often, as the
    graph keeps only those nodes' tables) with the pretrained sentence encoder, and the
    student stores those vectors. The
    student reads the graph's metapath orders up to the run's graph order, unless the config
    pins its own `max_order`.
    """
    out: Dict[str, base_node.BaseNode] = {}
    title_vectors = None
    if config.student.title_vectors:
        encoder = TitleEncoder(
            examples=nodes["GraphContexts"].outputs["log_examples"],
            query_split="train",
            min_impressions=_given(run.graph_table_min_impressions, config.graph.table_min_impressions),
        ).with_id("TitleEncoder")
        out[encoder.id] = encoder
        title_vectors = encoder.outputs["title_vectors"]
    follows_graph = "max_order" not in config.student.settings
    trainer = RuntimeTrainer(
        run_fn="trainer.student.run_fn",
        examples=nodes["TeacherLabeller"].outputs["output_examples"],
        custom_config=student_custom_config(config),
        max_order=run.graph_max_order if follows_graph else None,
        title_vectors=title_vectors,
    ).with_id("StudentTrainer")
    exporter = BermServingExporter(
        model=trainer.outputs["model"],
        neighbour_tables=nodes["GraphContexts"].outputs["neighbour_tables"],
    ).with_id("BermServingExporter")
    out.update({trainer.id: trainer, exporter.id: exporter})
    return out


def evaluation_components(config: PipelineConfig, nodes: Dict[str, base_node.BaseNode],
                          serving_base: str) -> Dict[str, base_node.BaseNode]:
    """TFMA on held-out judged pairs for both models; BERM-O is pushed only if the student's gates pass.

    The student's baseline is the latest BERM-O its own Evaluator blessed (ML Metadata), so a
    regression against the model in production keeps the new one out.
    """
    split = config.evaluation.split
    # The teacher scores the judged pairs too, so the student's evaluation can measure agreement.
    judgment_scorer = tfx.components.BulkInferrer(
        examples=nodes["GraphContexts"].outputs["judgment_examples"],
        model=nodes["TeacherTrainer"].outputs["model"],
        data_spec=tfx.proto.DataSpec(example_splits=[split]),
        model_spec=tfx.proto.ModelSpec(model_signature_name=["serving_default"]),
        output_example_spec=_teacher_score_columns(),
    ).with_id("TeacherJudgmentScorer")
    teacher_evaluator = tfx.components.Evaluator(
        examples=nodes["GraphContexts"].outputs["judgment_examples"],
        model=nodes["TeacherTrainer"].outputs["model"],
        eval_config=evaluation.eval_config(config, student=False),
        example_splits=[split],
        module_path=evaluation.METRICS_MODULE,
    ).with_id("TeacherEvaluator")
    gates = student_gate_components(
        config, examples=judgment_scorer.outputs["output_examples"],
        model=nodes["BermServingExporter"].outputs["serving_model"],
        model_producer=("BermServingExporter", "serving_model"), serving_base=serving_base)
    return {judgment_scorer.id: judgment_scorer, teacher_evaluator.id: teacher_evaluator, **gates}


def student_gate_components(config: PipelineConfig, examples: Any, model: Any,
                            model_producer: Tuple[str, str], serving_base: str
                            ) -> Dict[str, base_node.BaseNode]:
    """Baseline resolver, the student's Evaluator (metrics and gates) and the Pusher.

    `model_producer` (node id, output key) is what produces `model`: the baseline is the latest
    model of that output that this Evaluator blessed.
    """
    baseline = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model,
                              producer_component_id=model_producer[0], output_key=model_producer[1]),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing,
                                       producer_component_id="StudentEvaluator", output_key="blessing"),
    ).with_id("LatestBlessedStudent")
    student_evaluator = tfx.components.Evaluator(
        examples=examples,
        model=model,
        baseline_model=baseline.outputs["model"],
        eval_config=evaluation.eval_config(config, student=True),
        example_splits=[config.evaluation.split],
        module_path=evaluation.METRICS_MODULE,
    ).with_id("StudentEvaluator")
    pusher = serving_pusher.Pusher(
        model=model,
        model_blessing=student_evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(
                base_directory=os.path.join(serving_base, config.serving.model_name))),
    ).with_id("Pusher")
    return {n.id: n for n in (baseline, student_evaluator, pusher)}



def _teacher_score_columns() -> bulk_inferrer_pb2.OutputExampleSpec:
    return bulk_inferrer_pb2.OutputExampleSpec(output_columns_spec=[
        bulk_inferrer_pb2.OutputColumnsSpec(
            signature_name="serving_default",
            predict_output=bulk_inferrer_pb2.PredictOutput(output_columns=[
                bulk_inferrer_pb2.PredictOutputCol(output_key="score", output_column=TEACHER_SCORE)]))])


def create_pipeline(
    config: PipelineConfig,
    pipeline_root: str,
    logs: InputSpec,
    judgments: InputSpec,
    metadata_connection_config: Optional[metadata_store_pb2.ConnectionConfig] = None,
    beam_pipeline_args: Optional[List[str]] = None,
    run_parameters: Optional[RunParameters] = None,
    schema_dir: Optional[str] = None,
    serving_base: Optional[str] = None,
) -> tfx.dsl.Pipeline:
    """The whole DAG. `run_parameters` and `schema_dir` (where schemas/*.pbtxt are for the
    executors, e.g. inside the container image) are for cluster runners; locally both stay None.
    Blessed models go to <serving_base>/<serving.model_name>/<version>/ (default
    config.serving.base_directory, else <pipeline_root>/../serving)."""
    run = run_parameters or NO_RUN_PARAMETERS
    nodes = ingestion_components(config, logs, judgments, run, schema_dir)
    nodes.update(graph_components(config, nodes, run))
    nodes.update(teacher_components(config, nodes, run))
    nodes.update(student_components(config, nodes, run))
    serving_base = (serving_base or config.serving.base_directory
                    or os.path.join(os.path.dirname(pipeline_root.rstrip("/")), "serving"))
    nodes.update(evaluation_components(config, nodes, serving_base))
    return tfx.dsl.Pipeline(
        pipeline_name=config.name,
        pipeline_root=pipeline_root,
        components=list(nodes.values()),
        enable_cache=config.enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(beam_pipeline_args if beam_pipeline_args is not None else config.beam_pipeline_args),
    )
