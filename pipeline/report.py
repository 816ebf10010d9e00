"""`relkd report --run DIR`: one self-contained HTML page (and a Markdown twin) per pipeline run.

What a person reads before a model goes live: the data (TFDV statistics and anomalies, the
quarantine counts), the graph, both models' TFMA metrics overall and by slice, the gate table
with thresholds and baseline deltas, and four plots drawn with matplotlib:

  * metric by slice: AUC and NDCG@k of teacher and student on every slice;
  * calibration: mean label against mean score per score bucket (TFMA's calibration plot);
  * score distributions of teacher and student on the same judged pairs;
  * teacher-student scatter of those scores.

Everything is read from the run directory (run_summary.json names every artifact). The HTML
embeds its images as data URIs and carries no script, so it can be mailed or archived as one
file; the Markdown links PNG files written next to it.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pipeline import eval_results, run_summary

REPORT_DIR = "report"
HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
MAX_SCATTER_POINTS = 5000


class ReportError(RuntimeError):
    """The run directory cannot be reported on (no summary, or the run stopped before evaluation)."""


# --- Reading the run ------------------------------------------------------------------------

def _load_summary(run_dir: str) -> Dict[str, Any]:
    path = os.path.join(run_dir, "run_summary.json")
    if not os.path.exists(path):
        raise ReportError(f"{run_dir} is not a relkd run directory: no run_summary.json "
                          "(pass the --output of `relkd run`)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _uri(summary: Dict[str, Any], node_id: str, key: str) -> Optional[str]:
    entries = (((summary.get("nodes") or {}).get(node_id) or {}).get("outputs") or {}).get(key)
    return entries[0]["uri"] if entries else None


def _split_dirs(uri: Optional[str]) -> List[Tuple[str, str]]:
    if not uri or not os.path.isdir(uri):
        return []
    return [(name[len("Split-"):], os.path.join(uri, name)) for name in sorted(os.listdir(uri))
            if name.startswith("Split-")]


def data_statistics(summary: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """{input: [one row per (split, feature)]} from the StatisticsGen artifacts (TFDV)."""
    from tensorflow_data_validation.utils import stats_util

    out: Dict[str, List[Dict[str, Any]]] = {}
    for kind in ("logs", "judgments"):
        rows = []
        for split, path in _split_dirs(_uri(summary, f"{kind.capitalize()}StatisticsGen", "statistics")):
            stats_file = os.path.join(path, "FeatureStats.pb")
            if not os.path.exists(stats_file):
                continue
            stats = stats_util.load_stats_binary(stats_file)
            for dataset in stats.datasets:
                for feature in dataset.features:
                    name = ".".join(feature.path.step)
                    row = {"split": split, "feature": name, "examples": int(dataset.num_examples)}
                    if feature.HasField("num_stats"):
                        s = feature.num_stats
                        row.update(kind="number", missing=int(s.common_stats.num_missing),
                                   detail=f"mean {s.mean:.3g}, min {s.min:.3g}, max {s.max:.3g}, "
                                          f"zeros {int(s.num_zeros)}")
                    elif feature.HasField("string_stats"):
                        s = feature.string_stats
                        top = ", ".join(f"{v.value[:24]!r} ({int(v.frequency)})" for v in s.top_values[:2])
                        row.update(kind="text", missing=int(s.common_stats.num_missing),
                                   detail=f"{int(s.unique)} distinct, avg length {s.avg_length:.1f}; top {top}")
                    else:
                        row.update(kind="other", missing=0, detail="")
                    rows.append(row)
        out[kind] = rows
    return out


def data_anomalies(summary: Dict[str, Any]) -> List[Dict[str, str]]:
    """Every anomaly ExampleValidator recorded, per input, split and feature."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    rows = []
    for kind in ("logs", "judgments"):
        for split, path in _split_dirs(_uri(summary, f"{kind.capitalize()}ExampleValidator", "anomalies")):
            diff = os.path.join(path, "SchemaDiff.pb")
            if not os.path.exists(diff):
                continue
            with open(diff, "rb") as f:
                anomalies = anomalies_pb2.Anomalies.FromString(f.read())
            for feature, info in sorted(anomalies.anomaly_info.items()):
                rows.append({"input": kind, "split": split, "feature": feature,
                             "problem": info.short_description, "detail": info.description})
            if anomalies.HasField("dataset_anomaly_info"):
                info = anomalies.dataset_anomaly_info
                rows.append({"input": kind, "split": split, "feature": "(dataset)",
                             "problem": info.short_description, "detail": info.description})
    return rows


def paired_scores(summary: Dict[str, Any]) -> Optional[Dict[str, List[float]]]:
    """Teacher and student scores of the same judged pairs, with their labels.

    The teacher's come from TeacherJudgmentScorer's examples; the student (BERM-O) scores those
    examples here through its `serving_default` signature, as the Evaluator did.
    """
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (the model tokenises in-graph)

    examples_uri = _uri(summary, "TeacherJudgmentScorer", "output_examples")
    model_uri = _uri(summary, "BermServingExporter", "serving_model")
    if not examples_uri or not model_uri:
        return None
    files = [os.path.join(d, f) for _, d in _split_dirs(examples_uri) for f in sorted(os.listdir(d))]
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    if not serialized:
        return None
    model = tf.saved_model.load(os.path.join(model_uri, "Format-Serving"))
    serve = model.signatures["serving_default"]
    student = np.concatenate([serve(examples=tf.constant(serialized[i:i + 256]))["score"].numpy()
                              for i in range(0, len(serialized), 256)])
    teacher, relevant = [], []
    for record in serialized:
        features = tf.train.Example.FromString(record).features.feature
        teacher.append(features["teacher_score"].float_list.value[0])
        relevant.append(features["relevant"].float_list.value[0] if "relevant" in features else 0.0)
    return {"teacher": [float(x) for x in teacher], "student": [float(x) for x in student],
            "relevant": relevant}


# --- Plots ----------------------------------------------------------------------------------

def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return buffer.getvalue()


def plot_metric_by_slice(metrics: Dict[str, Dict[str, Any]], metric: str) -> bytes:
    plt = _figure()
    slices = sorted({s for m in metrics.values() for s in m},
                    key=lambda s: (s != eval_results.OVERALL, s))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(slices) + 1.5))
    height = 0.8 / max(1, len(metrics))
    for i, (model, per_slice) in enumerate(sorted(metrics.items())):
        values = [per_slice.get(s, {}).get("candidate", {}).get(metric, float("nan")) for s in slices]
        ax.barh([y + i * height for y in range(len(slices))], values, height=height, label=model)
    ax.set_yticks([y + height * (len(metrics) - 1) / 2 for y in range(len(slices))])
    # A slice's size next to its name: an AUC of 1.0 on twelve pairs says little.
    counts = [max((m.get(s, {}).get("candidate", {}).get("example_count", 0) for m in metrics.values()),
                  default=0) for s in slices]
    ax.set_yticklabels([f"{s} (n={int(n)})" for s, n in zip(slices, counts)])
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(f"{metric} by slice")
    ax.legend(loc="lower right")
    return _png(fig)


def plot_calibration(calibration: Dict[str, List[Dict[str, float]]]) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for model, rows in sorted(calibration.items()):
        ax.plot([r["mean_prediction"] for r in rows], [r["mean_label"] for r in rows], marker="o",
                label=model)
    ax.set_xlabel("mean score in bucket")
    ax.set_ylabel("share relevant in bucket")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Calibration (all pairs)")
    ax.legend(loc="upper left")
    return _png(fig)


def plot_score_distributions(scores: Dict[str, List[float]]) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = [i / 25 for i in range(26)]
    ax.hist(scores["teacher"], bins=bins, alpha=0.55, label="teacher")
    ax.hist(scores["student"], bins=bins, alpha=0.55, label="student (BERM-O)")
    ax.set_xlabel("score")
    ax.set_ylabel("judged pairs")
    ax.set_title("Score distributions on the evaluation pairs")
    ax.legend()
    return _png(fig)


def plot_scatter(scores: Dict[str, List[float]]) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 5))
    n = min(len(scores["teacher"]), MAX_SCATTER_POINTS)
    colours = ["tab:green" if r >= 0.5 else "tab:red" for r in scores["relevant"][:n]]
    ax.scatter(scores["teacher"][:n], scores["student"][:n], s=8, alpha=0.5, c=colours)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set_xlabel("teacher score")
    ax.set_ylabel("student (BERM-O) score")
    ax.set_title("Teacher vs student (green: relevant)")
    return _png(fig)


# --- Rendering ------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4f}"
    return "-" if value is None else str(value)


def _count_or_value(name: str, value: Any) -> Any:
    """Counts (TFMA reports them as floats) as whole numbers."""
    return int(value) if name.endswith("_count") and isinstance(value, float) and value == value else value


def _cell(cell: Any) -> str:
    """A cell is escaped text, or (text, css class)."""
    text, css = cell if isinstance(cell, tuple) else (cell, "")
    return f'<td class="{css}">{html.escape(str(text))}</td>' if css else f"<td>{html.escape(str(text))}</td>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    clean = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return (["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows])


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.pass { color: #176f2c; font-weight: 600; } td.fail { color: #b00020; font-weight: 700; }
.verdict { padding: 0.6em 1em; border-radius: 4px; font-weight: 600; }
.verdict.ok { background: #e6f4ea; } .verdict.bad { background: #fdecea; }
figure { display: inline-block; margin: 0 1.5em 1.5em 0; } figcaption { font-size: 0.85em; }
"""


def build_report(run_dir: str, output_dir: Optional[str] = None) -> Dict[str, str]:
    """Writes report.html, report.md and the plots' PNG files; returns their paths."""
    run_dir = os.path.abspath(run_dir)
    summary = _load_summary(run_dir)
    evaluation = summary.get("evaluation") or {}
    if not evaluation.get("student"):
        raise ReportError(f"the run in {run_dir} has no student evaluation (status: "
                          f"{summary.get('status')}); a report needs a run that got past StudentEvaluator")
    output_dir = os.path.abspath(output_dir or os.path.join(run_dir, REPORT_DIR))
    os.makedirs(output_dir, exist_ok=True)
    ndcg_k = summary["config"]["evaluation"]["ndcg_k"]
    ndcg = f"ndcg@{ndcg_k}"

    metrics = {role: eval_results.load_metrics(evaluation[role]["evaluation"])
               for role in ("teacher", "student") if evaluation.get(role)}
    calibration = {role: eval_results.load_calibration(evaluation[role]["evaluation"]).get(
        eval_results.OVERALL, []) for role in metrics}
    scores = paired_scores(summary)
    plots: List[Tuple[str, str, bytes]] = [
        ("auc_by_slice.png", "AUC by slice", plot_metric_by_slice(metrics, "auc")),
        ("ndcg_by_slice.png", f"NDCG@{ndcg_k} by slice", plot_metric_by_slice(metrics, ndcg)),
        ("calibration.png", "Calibration", plot_calibration(calibration)),
    ]
    if scores:
        plots += [("score_distributions.png", "Score distributions",
                   plot_score_distributions(scores)),
                  ("teacher_student_scatter.png", "Teacher-student scatter", plot_scatter(scores))]
    for name, _, data in plots:
        with open(os.path.join(output_dir, name), "wb") as f:
            f.write(data)

    student = evaluation["student"]
    push = evaluation.get("push") or {}
    blessed = bool(student.get("blessed")) and bool(push.get("pushed"))
    verdict = (f"Blessed and pushed: BERM-O version {push.get('version')} at {push.get('destination')}"
               if blessed else "Not blessed: the student failed a gate and was not pushed")
    gate_rows = [[r["metric"], r["slice"], _fmt(r["value"]),
                  "-" if r["bound"] is None else f"{r['bound_kind']} {r['bound']}",
                  _fmt(r["baseline"]), _fmt(r["change"]),
                  "-" if r["max_regression"] is None else str(r["max_regression"]),
                  "PASS" if r["passed"] else "FAIL", "; ".join(r["failures"])]
                 for r in student.get("gates", [])]
    gate_headers = ["metric", "slice", "value", "threshold", "baseline (last blessed)", "change",
                    "max regression", "result", "why"]
    metric_names = ["example_count", "query_count", "auc", ndcg, "calibration", "mean_label",
                    "mean_prediction", "judgment_mse", "teacher_agreement"]
    slice_rows = []
    for role, per_slice in sorted(metrics.items()):
        for where in sorted(per_slice, key=lambda s: (s != eval_results.OVERALL, s)):
            values = per_slice[where].get("candidate", {})
            slice_rows.append([role, where] + [_fmt(_count_or_value(m, values.get(m)))
                                               for m in metric_names])
    stats = data_statistics(summary)
    anomalies = data_anomalies(summary)
    inputs = summary.get("inputs", {})
    input_rows = [[kind, e.get("rows_in", "-"), e.get("accepted", "-"), e.get("quarantined", "-"),
                   ", ".join(f"{r}: {n}" for r, n in e.get("quarantined_by_reason", {}).items()) or "-",
                   " / ".join(str(e.get("examples_per_split", {}).get(s, "-")) for s in ("train", "eval", "test"))]
                  for kind, e in inputs.items()]
    graph = summary.get("graph") or {}
    graph_rows = []
    if graph:
        components = graph.get("connected_components", {})
        graph_rows = [["query nodes", graph["nodes"]["query"]], ["item nodes", graph["nodes"]["item"]],
                      ["edges", graph["edges"]["after_hub_cap"]],
                      ["capped hubs", graph["capped_hubs"]["total"]],
                      ["connected components", components.get("num_components", "-")],
                      ["largest component (nodes)", components.get("largest_component_size", "-")]]
        without_tables = run_summary.nodes_without_tables(graph)
        if without_tables:
            graph_rows.append([f"without tables in BERM-O (< {graph['table_min_impressions']} impressions)",
                               without_tables])
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    # HTML
    esc = lambda v: html.escape(str(v))  # noqa: E731
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>relkd run report</title><style>{_STYLE}</style></head><body>",
             f"<h1>relkd run report</h1><p>Run <code>{esc(run_dir)}</code>, status "
             f"<b>{esc(summary.get('status'))}</b>; report written {created}.</p>",
             f"<p id=\"verdict\" class=\"verdict {'ok' if blessed else 'bad'}\">{esc(verdict)}</p>",
             "<h2>Gates</h2>",
             _table(gate_headers, [row[:7] + [(row[7], row[7].lower()), row[8]] for row in gate_rows],
                    css="gates"),
             "<h2>Plots</h2>"]
    for name, caption, data in plots:
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f"<figure><img class=\"plot\" alt=\"{esc(caption)}\" src=\"{uri}\">"
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts += ["<h2>Metrics by slice (TFMA)</h2>",
              _table(["model", "slice"] + metric_names, slice_rows),
              "<h2>Data</h2>",
              _table(["input", "rows in", "accepted", "quarantined", "by reason", "train / eval / test"],
                     input_rows),
              "<h3>Anomalies (TFDV, against the curated schemas)</h3>",
              (_table(["input", "split", "feature", "problem", "detail"],
                      [[a[k] for k in ("input", "split", "feature", "problem", "detail")] for a in anomalies])
               if anomalies else "<p>None.</p>")]
    for kind, rows in stats.items():
        parts += [f"<h3>Statistics: {esc(kind)}</h3>",
                  _table(["split", "feature", "type", "examples", "missing", "summary"],
                         [[r["split"], r["feature"], r["kind"], r["examples"], r["missing"], r["detail"]]
                          for r in rows])]
    if graph_rows:
        parts += ["<h2>Graph</h2>", _table(["", "value"], graph_rows)]
    parts.append("</body></html>")
    html_path = os.path.join(output_dir, HTML_FILE)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))

    # Markdown
    lines = ["# relkd run report", "", f"Run `{run_dir}`, status **{summary.get('status')}**; "
             f"written {created}.", "", f"**{verdict}**", "", "## Gates", ""]
    lines += _md_table(gate_headers, gate_rows)
    lines += ["", "## Plots", ""] + [f"![{caption}]({name})" for name, caption, _ in plots]
    lines += ["", "## Metrics by slice (TFMA)", ""] + _md_table(["model", "slice"] + metric_names, slice_rows)
    lines += ["", "## Data", ""] + _md_table(
        ["input", "rows in", "accepted", "quarantined", "by reason", "train / eval / test"], input_rows)
    lines += ["", "### Anomalies", ""] + (_md_table(
        ["input", "split", "feature", "problem", "detail"],
        [[a[k] for k in ("input", "split", "feature", "problem", "detail")] for a in anomalies])
        if anomalies else ["None."])
    if graph_rows:
        lines += ["", "## Graph", ""] + _md_table(["", "value"], graph_rows)
    md_path = os.path.join(output_dir, MARKDOWN_FILE)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return {"html": html_path, "markdown": md_path,
            "plots": [os.path.join(output_dir, name) for name, _, _ in plots]}
