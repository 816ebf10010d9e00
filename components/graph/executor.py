"""Executor of GraphContexts: one Beam pipeline from validated logs to contexts and joined examples.

The graph is built from the logs of every split: behaviour data is what the serving model
will have for any logged query, and judgments (the labels) are never part of it.
"""
import json
import os
from typing import Any, Dict, List

import apache_beam as beam
from absl import logging
from tfx.dsl.components.base import base_beam_executor
from tfx.dsl.io import fileio  # gs:// on a cluster, as Beam writes there
from tfx.types import artifact_utils

from components import example_codec
from components.graph import eval_features, metapaths

LOGS_KEY = "logs"
JUDGMENTS_KEY = "judgments"
DATA_REPORT_KEY = "data_report"
LOG_EXAMPLES_KEY = "log_examples"
JUDGMENT_EXAMPLES_KEY = "judgment_examples"
NEIGHBOUR_TABLES_KEY = "neighbour_tables"
GRAPH_STATISTICS_KEY = "graph_statistics"
GRAPH_CONFIG_KEY = "graph_config"
JUDGMENT_TITLES_FILE = "judgment_titles.json"
# Optional exec properties that override the same GraphConfig fields of `graph_config`: single
# ints, so the Kubeflow runner can make them runtime parameters (a JSON string cannot hold one).
MAX_ORDER_KEY = "max_order"
TOP_N_KEY = "top_n"
TABLE_MIN_IMPRESSIONS_KEY = "table_min_impressions"
# JSON of eval_features.EvalFeatureConfig: the label and slice features judged pairs get.
EVAL_FEATURES_KEY = "eval_features"

STATS_FILE = "stats.json"
CAPPED_HUBS_PREFIX = "capped_hubs"
TABLES_PREFIX = "tables"
MANIFEST_FILE = "manifest.json"
_SCALARS = {"query", "item_id", "item_title", "impressions", "clicks", "purchases", "period", "relevance"}


def _read_split(pipeline: beam.Pipeline, artifact, split: str, label: str):
    pattern = os.path.join(artifact_utils.get_split_uri([artifact], split), "*")
    return (pipeline
            | f"Read{label}[{split}]" >> beam.io.ReadFromTFRecord(pattern, coder=beam.coders.BytesCoder())
            | f"Parse{label}[{split}]" >> beam.Map(example_codec.parse, _SCALARS))


def _write_split(examples, artifact, split: str, label: str) -> None:
    _ = (examples
         | f"ToExample{label}[{split}]" >> beam.Map(lambda r: example_codec.to_example(r).SerializeToString())
         | f"Write{label}[{split}]" >> beam.io.WriteToTFRecord(
             os.path.join(artifact_utils.get_split_uri([artifact], split), "data_tfrecord"),
             file_name_suffix=".gz"))


def _fill_title(element):
    """Judgments may lack a title; the item's canonical title from the logs fills it."""
    _, grouped = element
    titles = list(grouped["title"])
    for judgment in grouped["judgment"]:
        if not judgment.get("item_title") and titles:
            judgment = {**judgment, "item_title": titles[0]}
        yield judgment


NO_JUDGMENT = -1.0


def _attach_relevance(element):
    """Logged pairs carry their human judgment as `relevance` where one exists, else NO_JUDGMENT.

    The student mixes a pointwise loss on these with the distillation loss.
    """
    _, grouped = element
    judged = list(grouped["relevance"])
    for row in grouped["log"]:
        yield {**row, "relevance": float(judged[0]) if judged else NO_JUDGMENT}


def graph_config(exec_properties: Dict[str, Any]) -> metapaths.GraphConfig:
    """`graph_config` (JSON) with the `max_order` / `top_n` / `table_min_impressions` exec
    properties, when set, over it."""
    values = json.loads(exec_properties[GRAPH_CONFIG_KEY])
    for key in (MAX_ORDER_KEY, TOP_N_KEY, TABLE_MIN_IMPRESSIONS_KEY):
        if exec_properties.get(key) is not None:
            values[key] = int(exec_properties[key])
    return metapaths.GraphConfig(**values)


def eval_feature_config(exec_properties: Dict[str, Any]) -> eval_features.EvalFeatureConfig:
    return eval_features.EvalFeatureConfig(**json.loads(exec_properties.get(EVAL_FEATURES_KEY) or "{}"))


class Executor(base_beam_executor.BaseBeamExecutor):

    def Do(self, input_dict: Dict[str, List[Any]], output_dict: Dict[str, List[Any]],
           exec_properties: Dict[str, Any]) -> None:
        config = graph_config(exec_properties)
        eval_config = eval_feature_config(exec_properties)
        logs = artifact_utils.get_single_instance(input_dict[LOGS_KEY])
        judgments = artifact_utils.get_single_instance(input_dict[JUDGMENTS_KEY])
        log_out = artifact_utils.get_single_instance(output_dict[LOG_EXAMPLES_KEY])
        judgment_out = artifact_utils.get_single_instance(output_dict[JUDGMENT_EXAMPLES_KEY])
        tables_out = artifact_utils.get_single_instance(output_dict[NEIGHBOUR_TABLES_KEY])
        stats_out = artifact_utils.get_single_instance(output_dict[GRAPH_STATISTICS_KEY])
        log_splits = artifact_utils.decode_split_names(logs.split_names)
        judgment_splits = artifact_utils.decode_split_names(judgments.split_names)
        log_out.split_names = logs.split_names
        judgment_out.split_names = judgments.split_names

        logging.info("Building the query-item graph from log splits %s with %s", log_splits, config)
        with self._make_beam_pipeline() as pipeline:
            log_rows = {s: _read_split(pipeline, logs, s, "Logs") for s in log_splits}
            all_logs = tuple(log_rows.values()) | "AllLogs" >> beam.Flatten()
            contexts = all_logs | "ComputeNeighbourContexts" >> metapaths.ComputeNeighbourContexts(config)

            _ = (contexts.neighbour_tables
                 | "TableToExample" >> beam.Map(lambda r: metapaths.neighbour_record_to_tf_example(r).SerializeToString())
                 | "WriteTables" >> beam.io.WriteToTFRecord(
                     os.path.join(tables_out.uri, TABLES_PREFIX), file_name_suffix=".gz"))
            _ = (contexts.graph_stats
                 | "StatsToJson" >> beam.Map(lambda s: json.dumps(s, indent=2, sort_keys=True))
                 | "WriteStats" >> beam.io.WriteToText(
                     os.path.join(stats_out.uri, STATS_FILE), num_shards=1, shard_name_template=""))
            _ = (contexts.capped_hubs
                 | "HubsToJson" >> beam.Map(lambda h: json.dumps(h, sort_keys=True))
                 | "WriteCappedHubs" >> beam.io.WriteToText(
                     os.path.join(stats_out.uri, CAPPED_HUBS_PREFIX), file_name_suffix=".jsonl"))

            judgment_rows = {s: _read_split(pipeline, judgments, s, "Judgments") for s in judgment_splits}
            relevance_by_pair = (
                tuple(judgment_rows.values())
                | "AllJudgments" >> beam.Flatten()
                | "KeyJudgedPairs" >> beam.Map(lambda r: ((r["query"], r["item_id"]), r["relevance"])))
            for split, rows in log_rows.items():
                rows = (
                    {"log": rows | f"KeyLogPairs[{split}]" >> beam.Map(lambda r: ((r["query"], r["item_id"]), r)),
                     "relevance": relevance_by_pair}
                    | f"GroupJudged[{split}]" >> beam.CoGroupByKey()
                    | f"AttachRelevance[{split}]" >> beam.FlatMap(_attach_relevance))
                joined = rows | f"JoinLogs[{split}]" >> metapaths.JoinContexts(
                    contexts.neighbour_tables, config.max_order, label=f"JoinLogContexts[{split}]")
                _write_split(joined, log_out, split, "Logs")

            filled = []
            for split, rows in judgment_rows.items():
                keyed = rows | f"KeyJudgments[{split}]" >> beam.Map(lambda r: (r["item_id"], r))
                with_titles = (
                    {"judgment": keyed, "title": contexts.item_titles}
                    | f"GroupTitles[{split}]" >> beam.CoGroupByKey()
                    | f"FillTitles[{split}]" >> beam.FlatMap(_fill_title))
                filled.append(with_titles)
                joined = (
                    with_titles
                    | f"JoinJudgments[{split}]" >> metapaths.JoinContexts(
                        contexts.neighbour_tables, config.max_order, label=f"JoinJudgmentContexts[{split}]")
                    | f"EvalFeatures[{split}]" >> eval_features.AttachEvalFeatures(
                        all_logs, eval_config, config.max_order, label=f"AttachEvalFeatures[{split}]"))
                _write_split(joined, judgment_out, split, "Judgments")
            _ = (tuple(filled)
                 | "AllFilledJudgments" >> beam.Flatten()
                 | "TitledOrNot" >> beam.Map(lambda r: "with_title" if r.get("item_title") else "without_title")
                 | "CountTitled" >> beam.combiners.Count.PerElement()
                 | "TitledToDict" >> beam.combiners.ToDict()
                 | "TitledToJson" >> beam.Map(json.dumps)
                 | "WriteTitled" >> beam.io.WriteToText(
                     os.path.join(stats_out.uri, JUDGMENT_TITLES_FILE), num_shards=1, shard_name_template=""))

        with fileio.open(os.path.join(tables_out.uri, MANIFEST_FILE), "w") as f:
            json.dump({"graph_config": config.to_dict(), "log_splits": log_splits,
                       "features": metapaths.joined_feature_names(config.max_order)}, f, indent=2, sort_keys=True)
        stats = read_stats(stats_out.uri)
        stats["judgments"] = _judgment_titles(stats_out.uri)
        with fileio.open(os.path.join(stats_out.uri, STATS_FILE), "w") as f:
            json.dump(stats, f, indent=2, sort_keys=True)
        stats_out.set_int_custom_property("query_nodes", stats["nodes"]["query"])
        stats_out.set_int_custom_property("item_nodes", stats["nodes"]["item"])
        stats_out.set_int_custom_property("edges", stats["edges"]["after_hub_cap"])
        stats_out.set_int_custom_property("capped_hubs", stats["capped_hubs"]["total"])
        logging.info("Graph: %s", json.dumps(stats, sort_keys=True)[:2000])


def _judgment_titles(uri: str) -> Dict[str, int]:
    """How many judgments have a title to learn from: their own `item_title`, or a logged one.

    A judgment of an item no log shows, without a title of its own, teaches the teacher the query
    against an empty text; when none has a title, the item ids do not match the logs' (another
    catalogue, a changed id format) and the run stops rather than train on nothing."""
    with fileio.open(os.path.join(uri, JUDGMENT_TITLES_FILE)) as f:
        counts = json.load(f)
    untitled = counts.get("without_title", 0)
    total = untitled + counts.get("with_title", 0)
    if total and untitled == total:
        from components.data_gate import DataRejectedError

        raise DataRejectedError(
            f"judgments: none of the {total} judged items has a title: no log row shows their "
            "item_id and the judgments have no item_title. Check that the judgments' item ids are "
            "the logs' (same catalogue, same format), or add an item_title column to the judgments.")
    if untitled:
        logging.warning("%d of %d judgments have no title (their items are in no log row and the "
                        "judgment names none)", untitled, total)
    return {"total": total, "without_title": untitled}


def read_stats(uri: str) -> Dict[str, Any]:
    with fileio.open(os.path.join(uri, STATS_FILE)) as f:
        return json.load(f)
