"""DataValidationGate: stops the run before any training when the inputs are not fit for it.

ExampleValidator only records anomalies; TFX leaves acting on them to the pipeline. This
gate reads the anomalies of every input and the ExampleGens' quarantine summaries, writes
one report, and fails the run with a message that names the input, the column and the
problem when anything is wrong.
"""

import json
import os
from typing import Any, Dict, List

import tensorflow as tf
from tensorflow_metadata.proto.v0 import anomalies_pb2
from tfx import types
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact_utils, standard_artifacts

from components import artifacts
from components.ingest import executor as ingest_executor

REPORT_FILE = "report.json"


class DataRejectedError(RuntimeError):
    """The inputs failed validation; the message says what to fix."""


def load_anomalies(anomalies: types.Artifact) -> Dict[str, anomalies_pb2.Anomalies]:
    result = {}
    for split in artifact_utils.decode_split_names(anomalies.split_names):
        path = os.path.join(artifact_utils.get_split_uri([anomalies], split), "SchemaDiff.pb")
        with tf.io.gfile.GFile(path, "rb") as f:
            result[split] = anomalies_pb2.Anomalies.FromString(f.read())
    return result


def anomaly_problems(input_name: str, per_split: Dict[str, anomalies_pb2.Anomalies]) -> List[Dict[str, Any]]:
    problems = []
    for split, anomalies in sorted(per_split.items()):
        for column, info in sorted(anomalies.anomaly_info.items()):
            problems.append({
                "input": input_name, "split": split, "column": column,
                "problem": info.short_description or "anomaly",
                "detail": info.description,
            })
        if anomalies.HasField("dataset_anomaly_info"):
            info = anomalies.dataset_anomaly_info
            problems.append({
                "input": input_name, "split": split, "column": "(dataset)",
                "problem": info.short_description or "anomaly", "detail": info.description,
            })
    return problems


def quarantine_problems(input_name: str, summary: Dict[str, Any], max_fraction: float) -> List[Dict[str, Any]]:
    rows_in = summary["rows_in"]
    if rows_in == 0:
        return [{"input": input_name, "split": "all", "column": "(rows)", "problem": "no rows",
                 "detail": "the input has no data rows"}]
    fraction = summary["quarantined"] / rows_in
    if fraction <= max_fraction:
        return []
    reasons = ", ".join(f"{reason} {count}" for reason, count in
                        sorted(summary["quarantined_by_reason"].items(), key=lambda kv: -kv[1]))
    return [{
        "input": input_name, "split": "all", "column": "(rows)",
        "problem": f"{fraction:.2%} of rows quarantined, above the limit of {max_fraction:.2%}",
        "detail": f"{summary['quarantined']} of {rows_in} rows: {reasons}",
    }]


def format_problems(problems: List[Dict[str, Any]]) -> str:
    # The same anomaly usually shows in every split; say it once and list the splits.
    grouped: Dict[tuple, List[str]] = {}
    for p in problems:
        grouped.setdefault((p["input"], p["column"], p["problem"], p["detail"]), []).append(p["split"])
    lines = [f"Data validation failed; the run stopped before training ({len(grouped)} problem(s)):"]
    for (input_name, column, problem, detail), splits in grouped.items():
        where = input_name if splits == ["all"] else f"{input_name} ({', '.join(splits)} split{'s' if len(splits) > 1 else ''})"
        column_text = "" if column.startswith("(") else f", column '{column}'"
        text = detail if detail.startswith(problem) else f"{problem}: {detail}"
        lines.append(f"  - {where}{column_text}: {text}")
    lines.append("Fix the input (see the quarantine files for row-level faults), or, if the data "
                 "is right and the contract changed, update schemas/*.pbtxt or the config's data section.")
    return "\n".join(lines)


def evaluate(inputs: Dict[str, Dict[str, Any]], max_quarantine_fraction: float) -> Dict[str, Any]:
    """`inputs` maps input name to {'anomalies': per-split protos, 'quarantine': summary dict}."""
    problems: List[Dict[str, Any]] = []
    for name, parts in inputs.items():
        problems += anomaly_problems(name, parts["anomalies"])
        problems += quarantine_problems(name, parts["quarantine"], max_quarantine_fraction)
    return {
        "passed": not problems,
        "problems": problems,
        "max_quarantine_fraction": max_quarantine_fraction,
        "quarantine": {name: parts["quarantine"] for name, parts in inputs.items()},
    }


@component
def DataValidationGate(
    logs_anomalies: InputArtifact[standard_artifacts.ExampleAnomalies],
    judgments_anomalies: InputArtifact[standard_artifacts.ExampleAnomalies],
    logs_quarantine: InputArtifact[artifacts.Quarantine],
    judgments_quarantine: InputArtifact[artifacts.Quarantine],
    report: OutputArtifact[artifacts.DataValidationReport],
    max_quarantine_fraction: Parameter[float] = 0.01,
) -> None:
    inputs = {
        "logs": {"anomalies": load_anomalies(logs_anomalies),
                 "quarantine": ingest_executor.read_summary(logs_quarantine.uri)},
        "judgments": {"anomalies": load_anomalies(judgments_anomalies),
                      "quarantine": ingest_executor.read_summary(judgments_quarantine.uri)},
    }
    verdict = evaluate(inputs, max_quarantine_fraction)
    with tf.io.gfile.GFile(os.path.join(report.uri, REPORT_FILE), "w") as f:
        f.write(json.dumps(verdict, indent=2, sort_keys=True))
    report.set_int_custom_property("passed", int(verdict["passed"]))
    if not verdict["passed"]:
        raise DataRejectedError(format_problems(verdict["problems"]))
