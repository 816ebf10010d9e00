"""An Evaluator's output (TFMA metrics, plots, validations) as plain rows for the summary and report."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional

from pipeline import evaluation
from pipeline.configs import GATE_METRICS

OVERALL = "all pairs"


def slice_name(slice_key: Any) -> str:
    """`query_segment=tail`, or OVERALL for the unsliced set."""
    parts = []
    for key in slice_key.single_slice_keys:
        kind = key.WhichOneof("kind")
        value = getattr(key, kind) if kind else ""
        parts.append(f"{key.column}={value.decode() if isinstance(value, bytes) else value}")
    return ", ".join(parts) or OVERALL


def metric_name(key: Any) -> str:
    """`auc`, `ndcg@10`, ... (TFMA's NDCG carries its k as a top_k sub key)."""
    name = key.name
    if key.HasField("sub_key") and key.sub_key.HasField("top_k"):
        name = f"{name}@{key.sub_key.top_k.value}"
    return name


def _value(value: Any) -> Optional[float]:
    if value.HasField("double_value"):
        return float(value.double_value.value)
    if value.HasField("bounded_value"):
        return float(value.bounded_value.value.value)
    return None


def load_metrics(uri: str) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{slice: {"candidate": {metric: value}, "baseline": {...}, "change": {...}}}.

    A single-model evaluation (the teacher's) puts its metrics under "candidate".
    """
    import tensorflow_model_analysis as tfma

    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for record in tfma.load_metrics(uri):
        entry = out.setdefault(slice_name(record.slice_key), {})
        for item in record.metric_keys_and_values:
            value = _value(item.value)
            if value is None:
                continue
            role = ("change" if item.key.is_diff else
                    "baseline" if item.key.model_name == evaluation.BASELINE else "candidate")
            entry.setdefault(role, {})[metric_name(item.key)] = value
    return out


def load_calibration(uri: str) -> Dict[str, List[Dict[str, float]]]:
    """{slice: [{"lower", "upper", "count", "mean_label", "mean_prediction"}]} of the candidate."""
    import tensorflow_model_analysis as tfma

    out: Dict[str, List[Dict[str, float]]] = {}
    for record in tfma.load_plots(uri):
        for item in record.plot_keys_and_values:
            if item.key.model_name == evaluation.BASELINE:
                continue
            buckets = item.value.calibration_histogram_buckets.buckets
            rows = []
            for b in buckets:
                n = b.num_weighted_examples.value
                if n <= 0:
                    continue
                rows.append({"lower": b.lower_threshold_inclusive, "upper": b.upper_threshold_exclusive,
                             "count": n, "mean_label": b.total_weighted_label.value / n,
                             "mean_prediction": b.total_weighted_refined_prediction.value / n})
            if rows:
                out[slice_name(record.slice_key)] = rows
    return out


def _eval_config(uri: str) -> Dict[str, Any]:
    with open(os.path.join(uri, "eval_config.json")) as f:
        written = json.load(f)
    return written.get("evalConfig", written)  # TFMA wraps it with the data and model locations


def gate_rows(uri: str, gates: Dict[str, Dict[str, float]], ndcg_k: int) -> List[Dict[str, Any]]:
    """One row per (gate, gated slice): value, bound, baseline, change, and whether it held.

    Pass/fail is TFMA's verdict (validations); a failure carries how far off the limit it is.
    """
    import tensorflow_model_analysis as tfma

    metrics = load_metrics(uri)
    validation = tfma.load_validation_result(uri)
    failures: Dict[tuple, List[Dict[str, Any]]] = {}
    for per_slice in validation.metric_validations_per_slice:
        where = slice_name(per_slice.slice_key)
        for failure in per_slice.failures:
            kind = "change" if failure.metric_key.is_diff else "bound"
            failures.setdefault((where, metric_name(failure.metric_key)), []).append(
                {"kind": kind, "value": _value(failure.metric_value), "message": failure.message})
    gated = [OVERALL] + sorted(s for s in metrics if s != OVERALL and any(
        s.startswith(f"{f}=") for f in _gated_features(uri)))
    rows = []
    for gate_name, gate in gates.items():
        name = f"ndcg@{ndcg_k}" if gate_name == "ndcg" else evaluation.METRIC_NAMES[gate_name]
        higher = GATE_METRICS[gate_name] == "higher"
        for where in gated:
            values = metrics.get(where, {})
            value = values.get("candidate", {}).get(name)
            baseline = values.get("baseline", {}).get(name)
            change = values.get("change", {}).get(name)
            failed = failures.get((where, name), [])
            row = {"metric": name, "slice": where, "value": value, "bound": gate.get("bound"),
                   "bound_kind": "min" if higher else "max", "baseline": baseline, "change": change,
                   "max_regression": gate.get("max_regression"), "passed": not failed,
                   "failures": []}
            for f in failed:
                if f["kind"] == "bound" and gate.get("bound") is not None and value is not None:
                    by = (gate["bound"] - value) if higher else (value - gate["bound"])
                    row["failures"].append(f"{name} on {where} is {value:.4f}, "
                                           f"{'below the minimum' if higher else 'above the maximum'} "
                                           f"{gate['bound']} by {by:.4f}")
                elif f["kind"] == "change" and change is not None:
                    by = (-change - gate["max_regression"]) if higher else (change - gate["max_regression"])
                    row["failures"].append(f"{name} on {where} changed by {change:+.4f} against the "
                                           f"last blessed model ({baseline:.4f}), more than the "
                                           f"allowed {gate['max_regression']} by {by:.4f}")
                else:
                    row["failures"].append(f"{name} on {where}: {f['message'] or 'threshold not met'}")
            rows.append(row)
    return rows


def _gated_features(uri: str) -> List[str]:
    features = set()
    for spec in _eval_config(uri).get("metricsSpecs", []):
        for metric in spec.get("metrics", []):
            for per_slice in metric.get("perSliceThresholds", []):
                for slicing in per_slice.get("slicingSpecs", []):
                    features.update(slicing.get("featureKeys", []))
    return sorted(features)


def finite(value: Optional[float]) -> bool:
    return value is not None and not math.isnan(value)
