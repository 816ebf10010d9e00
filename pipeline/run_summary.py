"""What a run produced, read back from ML Metadata: artifacts per component, row accounting,
split sizes and the data gate's verdict. Written next to the run as run_summary.json/.md.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Union

from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

from components import data_gate
from components.ingest import executor as ingest_executor

_STATE_NAMES = {v: k for k, v in metadata_store_pb2.Execution.State.items()}


def sqlite_connection(path: str) -> metadata_store_pb2.ConnectionConfig:
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    return config


def latest_node_outputs(store: metadata_store.MetadataStore, pipeline_name: str, node_id: str,
                        since_ms: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """The newest execution of a node and its output artifacts (key -> list of uri/properties).

    `since_ms` (milliseconds since the epoch) ignores executions created before it: a run that
    stops early must not report the steps it never reached from an earlier run in the same
    metadata store (a reused output folder, or a shared MySQL database).
    """
    context = store.get_context_by_type_and_name("node", f"{pipeline_name}.{node_id}")
    if context is None:
        return None
    executions = [e for e in store.get_executions_by_context(context.id)
                  if since_ms is None or e.create_time_since_epoch >= since_ms]
    if not executions:
        return None
    execution = max(executions, key=lambda e: e.id)
    events = [e for e in store.get_events_by_execution_ids([execution.id])
              if e.type in (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT,
                            metadata_store_pb2.Event.PENDING_OUTPUT)]
    by_id = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
    outputs: Dict[str, List[Dict[str, Any]]] = {}
    for event in events:
        key = event.path.steps[0].key if event.path.steps else "output"
        artifact = by_id.get(event.artifact_id)
        if artifact is None:
            continue
        properties = {name: getattr(value, value.WhichOneof("value"))
                      for name, value in artifact.custom_properties.items() if value.WhichOneof("value")
                      in ("int_value", "double_value", "string_value")}
        entry = {"uri": artifact.uri, "properties": properties}
        if entry not in outputs.setdefault(key, []):
            outputs[key].append(entry)
    return {
        "execution_id": execution.id,
        "state": _STATE_NAMES.get(execution.last_known_state, "UNKNOWN"),
        "outputs": outputs,
    }


def _split_sizes(statistics_uri: str) -> Dict[str, int]:
    from tensorflow_data_validation.utils import stats_util

    sizes = {}
    for split in sorted(os.listdir(statistics_uri)):
        path = os.path.join(statistics_uri, split, "FeatureStats.pb")
        if split.startswith("Split-") and os.path.exists(path):
            stats = stats_util.load_stats_binary(path)
            sizes[split[len("Split-"):]] = int(stats.datasets[0].num_examples) if stats.datasets else 0
    return sizes


def _output(nodes: Dict[str, Any], node_id: str, key: str) -> Optional[str]:
    entries = ((nodes.get(node_id) or {}).get("outputs") or {}).get(key)
    return entries[0]["uri"] if entries else None


def _evaluation(nodes: Dict[str, Any], gates: Dict[str, Dict[str, float]], ndcg_k: int) -> Dict[str, Any]:
    """Both Evaluators' whole-split metrics, the student's gates and blessing, and the push."""
    from pipeline import eval_results  # TFMA: only once a run got this far.

    out: Dict[str, Any] = {}
    for name, node_id in (("teacher", "TeacherEvaluator"), ("student", "StudentEvaluator")):
        uri = _output(nodes, node_id, "evaluation")
        if not uri or not os.path.exists(os.path.join(uri, "eval_config.json")):
            continue
        overall = eval_results.load_metrics(uri).get(eval_results.OVERALL, {})
        entry: Dict[str, Any] = {"evaluation": uri, **{
            role: {k: round(v, 4) for k, v in overall.get(role, {}).items()}
            for role in ("candidate", "baseline", "change") if overall.get(role)}}
        if name == "student":
            blessing = _output(nodes, node_id, "blessing")
            entry["blessed"] = bool(blessing and os.path.exists(os.path.join(blessing, "BLESSED")))
            entry["gates"] = eval_results.gate_rows(uri, gates, ndcg_k)
        out[name] = entry
    pushed = ((nodes.get("Pusher") or {}).get("outputs") or {}).get("pushed_model")
    if pushed:
        properties = pushed[0]["properties"]
        out["push"] = {"pushed": bool(properties.get("pushed")),
                       "destination": properties.get("pushed_destination"),
                       "version": properties.get("pushed_version"),
                       # components/serving_pusher.py: the newest version already held this model.
                       "already_served": bool(properties.get("already_served"))}
    return out


def collect(metadata: Union[str, metadata_store_pb2.ConnectionConfig], pipeline_name: str,
            node_ids: List[str], gates: Optional[Dict[str, Dict[str, float]]] = None,
            ndcg_k: int = 10, since_ms: Optional[int] = None) -> Dict[str, Any]:
    """`metadata`: a SQLite file path or any ML Metadata connection (pipeline/metadata.py).

    `gates` and `ndcg_k` (the config's evaluation settings) describe the student's gates;
    `since_ms`, when the run started: only its own executions count (latest_node_outputs).
    """
    store = metadata_store.MetadataStore(
        metadata if isinstance(metadata, metadata_store_pb2.ConnectionConfig) else sqlite_connection(metadata))
    nodes = {node_id: latest_node_outputs(store, pipeline_name, node_id, since_ms) for node_id in node_ids}
    summary: Dict[str, Any] = {"nodes": nodes, "inputs": {}}
    for kind in ("logs", "judgments"):
        prefix = kind.capitalize()
        entry: Dict[str, Any] = {}
        gen = nodes.get(f"{prefix}ExampleGen") or {}
        quarantine = (gen.get("outputs") or {}).get("quarantine")
        if quarantine and os.path.exists(os.path.join(quarantine[0]["uri"], ingest_executor.SUMMARY_FILE)):
            entry.update(ingest_executor.read_summary(quarantine[0]["uri"]))
            entry["quarantine_dir"] = quarantine[0]["uri"]
        stats = ((nodes.get(f"{prefix}StatisticsGen") or {}).get("outputs") or {}).get("statistics")
        if stats and os.path.isdir(stats[0]["uri"]):
            entry["examples_per_split"] = _split_sizes(stats[0]["uri"])
        summary["inputs"][kind] = entry
    graph = _output(nodes, "GraphContexts", "graph_statistics")
    if graph and os.path.exists(os.path.join(graph, "stats.json")):
        with open(os.path.join(graph, "stats.json")) as f:
            stats = json.load(f)
        summary["graph"] = {key: stats[key] for key in
                            ("nodes", "edges", "capped_hubs", "connected_components", "judgments")
                            if key in stats}
        if stats.get("config", {}).get("table_min_impressions"):
            summary["graph"]["table_min_impressions"] = stats["config"]["table_min_impressions"]
            summary["graph"]["nodes_without_tables"] = stats["nodes_without_tables"]
    for name, node_id in (("teacher", "TeacherTrainer"), ("student", "StudentTrainer")):
        history = _output(nodes, node_id, "model_run")
        if history and os.path.exists(os.path.join(history, "history.json")):
            with open(os.path.join(history, "history.json")) as f:
                epochs = json.load(f)
            summary[name] = {"epochs": len(epochs.get("loss", [])),
                             **{k: round(v[-1], 4) for k, v in epochs.items()
                                if isinstance(v, list) and v and isinstance(v[-1], (int, float))}}
    gate = ((nodes.get("DataValidationGate") or {}).get("outputs") or {}).get("report")
    if gate:
        path = os.path.join(gate[0]["uri"], data_gate.REPORT_FILE)
        if os.path.exists(path):
            with open(path) as f:
                summary["data_gate"] = json.load(f)
    evaluation = _evaluation(nodes, gates or {}, ndcg_k)
    if evaluation:
        summary["evaluation"] = evaluation
    return summary


def judgments_without_title(graph: Dict[str, Any]) -> Optional[str]:
    """A warning where judgments reached the teacher without a title, or None."""
    judgments = graph.get("judgments") or {}
    if not judgments.get("without_title"):
        return None
    return (f"{judgments['without_title']} of {judgments['total']} judgments have no title (their "
            "item_id is in no log row and they name no item_title): the teacher learnt those "
            "queries against an empty text; check the judgments' item ids")


def nodes_without_tables(graph: Dict[str, Any]) -> Optional[str]:
    """"215 queries (12.3 % of impressions), 1022 items (20.1 %)": the nodes that
    `graph.table_min_impressions` left without tables in BERM-O, or None without a bound."""
    if not graph.get("table_min_impressions"):
        return None
    quiet = graph["nodes_without_tables"]
    total = quiet.get("num_impressions") or 0

    def share(side):
        return f"{100.0 * quiet.get(f'{side}_impressions', 0) / total:.1f} %" if total else "-"

    return (f"{quiet['query']} queries ({share('query')} of impressions), "
            f"{quiet['item']} items ({share('item')})")


def gate_failures(summary: Dict[str, Any]) -> List[str]:
    """Every failed gate of the student, as a sentence naming metric, slice and margin."""
    gates = ((summary.get("evaluation") or {}).get("student") or {}).get("gates") or []
    return [message for row in gates for message in row["failures"]]


def to_markdown(summary: Dict[str, Any]) -> str:
    lines = ["# relkd run summary", "", f"- status: **{summary.get('status', 'unknown')}**"]
    if summary.get("error"):
        lines += ["", "```", summary["error"], "```"]
    lines += ["", "## Inputs", "", "| input | rows in | accepted | quarantined | by reason | train / eval / test examples |",
              "|---|---:|---:|---:|---|---|"]
    for kind, entry in summary.get("inputs", {}).items():
        reasons = ", ".join(f"{r}: {n}" for r, n in entry.get("quarantined_by_reason", {}).items()) or "-"
        splits = entry.get("examples_per_split", {})
        split_text = " / ".join(str(splits.get(s, "-")) for s in ("train", "eval", "test"))
        lines.append(f"| {kind} | {entry.get('rows_in', '-')} | {entry.get('accepted', '-')} | "
                     f"{entry.get('quarantined', '-')} | {reasons} | {split_text} |")
    graph = summary.get("graph")
    if graph:
        components = graph.get("connected_components", {})
        lines += ["", "## Graph", "",
                  f"- nodes: {graph['nodes']['query']} queries, {graph['nodes']['item']} items",
                  f"- edges: {graph['edges']['after_hub_cap']} (of {graph['edges']['total']} pairs; "
                  f"{graph['capped_hubs']['total']} hubs capped)",
                  f"- connected components: {components.get('num_components', '-')} "
                  f"(largest {components.get('largest_component_size', '-')} nodes)"]
        without_tables = nodes_without_tables(graph)
        if without_tables:
            lines.append(f"- without tables in BERM-O (fewer than {graph['table_min_impressions']} "
                         f"impressions; cold-start path): {without_tables}")
        untitled = judgments_without_title(graph)
        if untitled:
            lines.append(f"- **warning**: {untitled}")
    for name in ("teacher", "student"):
        metrics = summary.get(name)
        if metrics:
            lines += ["", f"## {name.capitalize()} (last epoch)", "", "| " + " | ".join(metrics) + " |",
                      "|" + "---|" * len(metrics), "| " + " | ".join(str(v) for v in metrics.values()) + " |"]
    evaluation = summary.get("evaluation") or {}
    if evaluation.get("teacher") or evaluation.get("student"):
        names = sorted({k for role in ("teacher", "student")
                        for k in (evaluation.get(role) or {}).get("candidate", {})})
        lines += ["", "## Evaluation (TFMA, held-out judged pairs)", "",
                  "| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for role in ("teacher", "student"):
            values = (evaluation.get(role) or {}).get("candidate", {})
            if values:
                lines.append(f"| {role} | " + " | ".join(str(values.get(n, "-")) for n in names) + " |")
        student = evaluation.get("student") or {}
        if student.get("gates"):
            lines += ["", "| gate | slice | value | limit | baseline | change (max regression) | result |",
                      "|---|---|---:|---:|---:|---:|---|"]
            for row in student["gates"]:
                fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
                limit = "-" if row["bound"] is None else f"{row['bound_kind']} {row['bound']}"
                regression = "-" if row["max_regression"] is None else f"{fmt(row['change'])} ({row['max_regression']})"
                lines.append(f"| {row['metric']} | {row['slice']} | {fmt(row['value'])} | {limit} | "
                             f"{fmt(row['baseline'])} | {regression} | {'pass' if row['passed'] else '**FAIL**'} |")
        push = evaluation.get("push") or {}
        if "blessed" in student:
            if student["blessed"] and push.get("pushed"):
                lines += ["", f"- blessed and pushed: version {push.get('version')} at `{push.get('destination')}`"]
            else:
                lines += ["", "- **not blessed, not pushed**"] + [f"  - {m}" for m in gate_failures(summary)]
    gate = summary.get("data_gate")
    if gate:
        lines += ["", "## Data validation gate", "", f"- passed: **{gate['passed']}**"]
        for p in gate["problems"]:
            lines.append(f"- {p['input']} / {p['split']} / {p['column']}: {p['problem']} ({p['detail']})")
    lines += ["", "## Steps", "", "| step | state | seconds |", "|---|---|---:|"]
    durations = summary.get("durations", {})
    for node_id, info in summary.get("nodes", {}).items():
        state = info["state"] if info else "not run"
        seconds = f"{durations[node_id]:.1f}" if node_id in durations else "-"
        lines.append(f"| {node_id} | {state} | {seconds} |")
    lines += ["", "## Where things are", ""]
    for name, path in summary.get("paths", {}).items():
        lines.append(f"- {name}: `{path}`")
    return "\n".join(lines) + "\n"
