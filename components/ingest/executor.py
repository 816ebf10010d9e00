"""Executor of SearchDataExampleGen: read, validate, quarantine, de-duplicate, emit tf.Examples.

Splitting into train/eval/test is left to TFX's own ExampleGen machinery
(`SplitConfig.partition_feature_name='query'`), so every input hashed on the same buckets
puts a query in the same split, whichever file it came from.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Tuple

import apache_beam as beam
import tensorflow as tf
from absl import logging
from tfx.components.example_gen import base_example_gen_executor
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils
from tfx.utils import proto_utils

from components import example_codec
from components.ingest import readers, rows

QUARANTINE_KEY = "quarantine"
DATA_KIND_KEY = "data_kind"
ROW_RULES_KEY = "row_rules"
INPUT_FORMAT_KEY = "input_format"
_QUARANTINE_URI = "_quarantine_uri"

QUARANTINE_ROWS_PREFIX = "rows"
SUMMARY_FILE = "summary.json"


def _rejection_line(row: Dict[str, Any], rejection: rows.Rejection) -> str:
    return json.dumps(
        {
            "reason": rejection.reason,
            "column": rejection.column,
            "detail": rejection.detail,
            "source": row.get("_source", ""),
            "row": row.get("_raw", ""),
        },
        ensure_ascii=False,
        sort_keys=True,
    )


class _ValidateRow(beam.DoFn):
    REJECTED = "rejected"

    def __init__(self, kind: str, rules: rows.RowRules):
        self._kind = kind
        self._rules = rules

    def process(self, raw: Dict[str, Any]) -> Iterable[Any]:
        if "_malformed" in raw:
            yield beam.pvalue.TaggedOutput(
                self.REJECTED, _rejection_line(raw, rows.Rejection(rows.MALFORMED_ROW, "row", raw["_malformed"])))
            return
        record, rejection = rows.validate_row(self._kind, raw, self._rules)
        if rejection is not None:
            yield beam.pvalue.TaggedOutput(self.REJECTED, _rejection_line(raw, rejection))
        else:
            yield rows.row_key(self._kind, record), (record, raw.get("_source", ""), raw.get("_raw", ""))


class _KeepOnePerKey(beam.DoFn):
    """Keeps the row with the smallest canonical form: the same survivor on every runner."""

    DUPLICATES = "duplicates"

    def __init__(self, kind: str):
        self._key_columns = ", ".join(rows.KEY_COLUMNS[kind])

    def process(self, element: Tuple[str, Iterable[Tuple[Dict[str, Any], str, str]]]) -> Iterable[Any]:
        _, group = element
        ordered = sorted(group, key=lambda item: (rows.canonical_json(item[0]), item[1], item[2]))
        yield ordered[0][0]
        for record, source, raw in ordered[1:]:
            rejection = rows.Rejection(
                rows.DUPLICATE_KEY, self._key_columns,
                f"same ({self._key_columns}) as a row that was kept")
            yield beam.pvalue.TaggedOutput(self.DUPLICATES, _rejection_line({"_source": source, "_raw": raw}, rejection))


def _summary(_, rows_in: int, accepted: int, by_reason: Dict[str, int]) -> str:
    quarantined = sum(by_reason.values())
    return json.dumps(
        {
            "rows_in": rows_in,
            "accepted": accepted,
            "quarantined": quarantined,
            "quarantined_by_reason": dict(sorted(by_reason.items())),
        },
        sort_keys=True,
    )


@beam.ptransform_fn
@beam.typehints.with_input_types(beam.Pipeline)
@beam.typehints.with_output_types(tf.train.Example)
def _ValidatedExamples(pipeline: beam.Pipeline, exec_properties: Dict[str, Any], split_pattern: str):
    kind = exec_properties[DATA_KIND_KEY]
    rules = rows.RowRules.from_json(exec_properties[ROW_RULES_KEY])
    quarantine_uri = exec_properties[_QUARANTINE_URI]
    pattern = os.path.join(exec_properties["input_base"], split_pattern)

    raw = pipeline | "ReadRawRows" >> readers.ReadRawRows(pattern, exec_properties[INPUT_FORMAT_KEY], rules.encoding)
    validated = raw | "ValidateRows" >> beam.ParDo(_ValidateRow(kind, rules)).with_outputs(
        _ValidateRow.REJECTED, main="valid")
    deduplicated = (
        validated.valid
        | "GroupByRowKey" >> beam.GroupByKey()
        | "KeepOnePerKey" >> beam.ParDo(_KeepOnePerKey(kind)).with_outputs(_KeepOnePerKey.DUPLICATES, main="accepted")
    )
    rejected = (validated[_ValidateRow.REJECTED], deduplicated[_KeepOnePerKey.DUPLICATES]) | "AllRejected" >> beam.Flatten()
    _ = rejected | "WriteQuarantine" >> beam.io.WriteToText(
        os.path.join(quarantine_uri, QUARANTINE_ROWS_PREFIX), file_name_suffix=".jsonl")

    rows_in = raw | "CountRowsIn" >> beam.combiners.Count.Globally()
    accepted = deduplicated.accepted | "CountAccepted" >> beam.combiners.Count.Globally()
    by_reason = (
        rejected
        | "Reason" >> beam.Map(lambda line: json.loads(line)["reason"])
        | "CountPerReason" >> beam.combiners.Count.PerElement()
    )
    _ = (
        pipeline
        | "SummarySeed" >> beam.Create([None])
        | "Summarise" >> beam.Map(
            _summary,
            rows_in=beam.pvalue.AsSingleton(rows_in),
            accepted=beam.pvalue.AsSingleton(accepted),
            by_reason=beam.pvalue.AsDict(by_reason))
        | "WriteSummary" >> beam.io.WriteToText(
            os.path.join(quarantine_uri, SUMMARY_FILE), num_shards=1, shard_name_template="")
    )
    return deduplicated.accepted | "ToExample" >> beam.Map(example_codec.to_example)


def read_summary(quarantine_uri: str) -> Dict[str, Any]:
    with tf.io.gfile.GFile(os.path.join(quarantine_uri, SUMMARY_FILE)) as f:
        return json.loads(f.read())


class Executor(base_example_gen_executor.BaseExampleGenExecutor):
    """ExampleGen executor whose input step validates rows and quarantines the bad ones."""

    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:
        return _ValidatedExamples

    def Do(self, input_dict: Dict[str, List[Any]], output_dict: Dict[str, List[Any]],
           exec_properties: Dict[str, Any]) -> None:
        kind = exec_properties[DATA_KIND_KEY]
        rules = rows.RowRules.from_json(exec_properties[ROW_RULES_KEY])
        input_config = example_gen_pb2.Input()
        proto_utils.json_to_proto(exec_properties["input_config"], input_config)
        pattern = os.path.join(exec_properties["input_base"], input_config.splits[0].pattern)
        self._check_columns(kind, pattern, exec_properties[INPUT_FORMAT_KEY], rules.encoding)

        quarantine = artifact_utils.get_single_instance(output_dict[QUARANTINE_KEY])
        properties = dict(exec_properties)
        properties[_QUARANTINE_URI] = quarantine.uri
        super().Do(input_dict, output_dict, properties)

        summary = read_summary(quarantine.uri)
        # The invariant users rely on: nothing disappears between the input and the outputs.
        if summary["rows_in"] != summary["accepted"] + summary["quarantined"]:
            raise RuntimeError(f"{kind}: row accounting does not add up: {summary}")
        for name in ("rows_in", "accepted", "quarantined"):
            quarantine.set_int_custom_property(name, summary[name])
        quarantine.set_string_custom_property("data_kind", kind)
        logging.info("%s: %d rows in, %d accepted, %d quarantined %s", kind, summary["rows_in"],
                     summary["accepted"], summary["quarantined"], summary["quarantined_by_reason"])

    @staticmethod
    def _check_columns(kind: str, pattern: str, fmt: str, encoding: str) -> None:
        columns = readers.input_columns(pattern, fmt, encoding)
        if columns is None:
            return  # TFRecord has no header; absent features are reported per row.
        missing = [c for c in rows.required_columns(kind) if c not in columns]
        if missing:
            required = rows.required_columns(kind)
            expected = ", ".join(c if c in required else f"{c} (optional)" for c in rows.known_columns(kind))
            tabs = (" The header holds tabs: a tab-separated file is read as such when named .tsv."
                    if len(columns) == 1 and "\t" in columns[0] else "")
            raise readers.InputError(
                f"{kind} input {pattern}: required column(s) {', '.join(missing)} missing; "
                f"found {', '.join(columns) or 'no columns'}. Expected {expected} "
                f"(see README, 'Data in').{tabs}"
            )
