"""TFMA settings of the Evaluators: the teacher's (metrics only) and the student's (metrics and gates).

Both models are measured on the same judged pairs (`evaluation.split` of the judgments, which
GraphContexts has joined with contexts and given the label and slice features of
components/graph/eval_features.py):

  * pointwise: example count, AUC and calibration of `score` against the binary label
    `relevant`, mean label and prediction, the MSE against the judgments rescaled to [0, 1]
    and, for the student, its correlation with the teacher's score (`teacher_agreement`);
  * per query (query key `query`): NDCG@k with gain = relevance - relevance_min, and the
    number of queries (`query_count`, ours: TFMA's QueryStatistics miscounts once a baseline is
    evaluated alongside, see components/tfma_extensions.py);
  * plots: the calibration plot;
  * slices: all pairs, query_segment (head / torso / tail / unlogged), item_degree,
    graph_context (warm / cold) and any `evaluation.extra_slices`.

The student's gates (`evaluation.gates`) become TFMA thresholds on the whole split (and on each
value of the `evaluation.gated_slices` features): a value
threshold (the absolute bound) and a change threshold against the baseline, the latest blessed
student (`max_regression`). TFMA blesses the model only if every threshold holds; with no
blessed baseline yet, change thresholds are skipped (TFX's rubber stamp).
"""
from __future__ import annotations

from typing import List

import tensorflow_model_analysis as tfma

from components.graph import eval_features
from pipeline.configs import GATE_METRICS, PipelineConfig

LABEL_KEY = eval_features.RELEVANT
QUERY_KEY = "query"
PREDICTION_KEY = "score"
TEACHER_SCORE_KEY = "teacher_score"
METRICS_MODULE = "components.tfma_extensions"
CANDIDATE, BASELINE = "candidate", "baseline"
TEACHER_AGREEMENT = "teacher_agreement"
CALIBRATION_BUCKETS = 10
# Metric names in TFMA's output, by the gate names of pipeline.configs.GATE_METRICS.
METRIC_NAMES = {"auc": "auc", "ndcg": "ndcg", "teacher_agreement": TEACHER_AGREEMENT,
                "judgment_mse": "judgment_mse"}


def slicing_specs(config: PipelineConfig) -> List[tfma.SlicingSpec]:
    features = list(eval_features.SLICE_FEATURES) + list(config.evaluation.extra_slices)
    return [tfma.SlicingSpec()] + [tfma.SlicingSpec(feature_keys=[f]) for f in features]


def _threshold(gate_name: str, gate: dict, with_baseline: bool) -> tfma.MetricThreshold:
    higher = GATE_METRICS[gate_name] == "higher"
    threshold = tfma.MetricThreshold()
    if "bound" in gate:
        bound = tfma.GenericValueThreshold()
        if higher:
            bound.lower_bound.value = float(gate["bound"])
        else:
            bound.upper_bound.value = float(gate["bound"])
        threshold.value_threshold.CopyFrom(bound)
    if with_baseline and "max_regression" in gate:
        change = tfma.GenericChangeThreshold(
            direction=(tfma.MetricDirection.HIGHER_IS_BETTER if higher
                       else tfma.MetricDirection.LOWER_IS_BETTER))
        change.absolute.value = -float(gate["max_regression"]) if higher else float(gate["max_regression"])
        threshold.change_threshold.CopyFrom(change)
    return threshold


def gated_slices(config: PipelineConfig) -> List[tfma.SlicingSpec]:
    """Where gates apply: all pairs, and every value of each `evaluation.gated_slices` feature."""
    return [tfma.SlicingSpec()] + [tfma.SlicingSpec(feature_keys=[f])
                                   for f in config.evaluation.gated_slices]


def _metric(class_name: str, module: str = "", config: str = "",
            threshold: tfma.MetricThreshold = None, slices: List[tfma.SlicingSpec] = ()
            ) -> tfma.MetricConfig:
    metric = tfma.MetricConfig(class_name=class_name, module=module, config=config)
    if threshold is not None and threshold.ByteSize():
        # Per-slice thresholds: a plain `threshold` would gate every slice, tiny ones included.
        metric.per_slice_thresholds.append(
            tfma.PerSliceMetricThreshold(slicing_specs=list(slices), threshold=threshold))
    return metric


def _gate(config: PipelineConfig, gate_name: str, gated: bool) -> dict:
    gate = config.evaluation.gates.get(gate_name) if gated else None
    if not gate:
        return {}
    return {"threshold": _threshold(gate_name, gate, with_baseline=True),
            "slices": gated_slices(config)}


def eval_config(config: PipelineConfig, student: bool) -> tfma.EvalConfig:
    """The Evaluator's EvalConfig: the student's has the gates, a baseline and teacher agreement."""
    data = config.data
    scale = data.relevance_max - data.relevance_min
    model_specs = [tfma.ModelSpec(name=CANDIDATE, signature_name="serving_default",
                                  label_key=LABEL_KEY, prediction_key=PREDICTION_KEY,
                                  model_type=tfma.TF_GENERIC)]
    if student:
        model_specs.append(tfma.ModelSpec(name=BASELINE, signature_name="serving_default",
                                          label_key=LABEL_KEY, prediction_key=PREDICTION_KEY,
                                          model_type=tfma.TF_GENERIC, is_baseline=True))
    pointwise = [
        _metric("ExampleCount"),
        _metric("AUC", **_gate(config, "auc", student)),
        _metric("Calibration"),
        _metric("CalibrationPlot", config=f'"num_buckets": {CALIBRATION_BUCKETS}'),
        _metric("MeanLabel"),
        _metric("MeanPrediction"),
        _metric("JudgmentMSE", module=METRICS_MODULE, config=f'"scale": {scale}',
                **_gate(config, "judgment_mse", student)),
    ]
    if student:
        pointwise.append(_metric("ScoreCorrelation", module=METRICS_MODULE,
                                 config=f'"feature_key": "{TEACHER_SCORE_KEY}", '
                                        f'"name": "{TEACHER_AGREEMENT}"',
                                 **_gate(config, "teacher_agreement", student)))
    per_query = [
        _metric("NDCG", config=f'"gain_key": "{eval_features.GAIN}"',
                **_gate(config, "ndcg", student)),
        _metric("QueryCount", module=METRICS_MODULE),
    ]
    return tfma.EvalConfig(
        model_specs=model_specs,
        slicing_specs=slicing_specs(config),
        metrics_specs=[
            tfma.MetricsSpec(metrics=pointwise),
            tfma.MetricsSpec(metrics=per_query, query_key=QUERY_KEY,
                             binarize=tfma.BinarizationOptions(top_k_list={"values": [config.evaluation.ndcg_k]})),
        ])
