"""Benchmark of the BERT cross-encoder teacher on the Home Depot relevance data.

Fine-tunes `trainer/teacher.py` through its TFX entry point `run_fn` on the pipeline's
`train` split of the Home Depot judgments, early-stops on `eval`, and measures on the held-out
`test` split: AUC (relevant = relevance >= 2.33), per-query AUC and NDCG@10, next to an
IDF-weighted query/title token-overlap baseline scored on the same pairs. It also reports the
fine-tuning wall time and the scoring throughput of the exported SavedModel::

    .venv/bin/python benchmarks/teacher_homedepot.py --profile quick \\
        --max-train-pairs 12000 --epochs 2 --out results.json

To choose settings without looking at `test`, report on the `eval` split instead
(`--report-split eval`; the teacher still early-stops on `eval`, so these figures are
optimistic for the chosen epoch) and override custom_config keys of the profile with
`--set KEY=VALUE` (VALUE is JSON, else a string), e.g.
`--report-split eval --set num_layers=6 --set pooling=cls`. Run the chosen settings once
with the default `--report-split test`.

What it does, step by step:

1. Reads the CSV with the pipeline's own adapter (`pipeline.homedepot.convert`, latin-1),
   validates every judgment row with the pipeline's row rules (`components.ingest.rows`,
   default `DataConfig`) and keeps one row per (query, item_id) the way the ExampleGen
   does, so the pairs are the ones a pipeline run would accept.
2. Splits by query with TFX's own partition function
   (`base_example_gen_executor._PartitionFn`) on the pipeline's `SplitConfig`
   (`partition_feature_name='query'`, hash buckets train/eval/test = 8/1/1: sha256 of the
   serialized `query` feature, modulo 10), so `test` here is exactly the pipeline's `test`
   split and no query is in two splits.
3. Optionally subsamples training *queries* (`--max-train-pairs`): queries are ordered by
   sha256("relkd-subsample:" + query) and taken whole while the total stays <= N, so the
   subsample is deterministic and a smaller N is a subset of a larger one. Eval and test
   are never subsampled.
4. Writes train and eval as gzipped TFRecords of tf.Example (`components.example_codec`)
   in a temporary directory, calls `trainer.teacher.run_fn` with the profile's
   custom_config (plus `--epochs`), and times the call: "fine-tune seconds" is the wall time
   of `run_fn`, i.e. loading the pretrained encoder, training, the eval pass after every
   epoch, restoring the best epoch and exporting the SavedModel.
5. Loads the SavedModel and scores the test split through its `serve_raw` signature in
   batches of 64. The first batch is a warm-up and is not timed; throughput is the
   remaining pairs divided by the summed wall time of their calls (string tensors in,
   scores out as NumPy).
6. Fits the IDF of the baseline on the distinct titles of the training pairs the teacher
   saw and scores the same test pairs.
7. Prints a Markdown table and, with `--out`, writes JSON with the date, machine, settings,
   sizes, times, throughput and metrics (`benchmarks/relevance_metrics.py` defines them).

The figures depend on the machine: TensorFlow uses every core it is given, so note the core
count and any other load (the JSON records the load average before and after).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter, OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

# As `relkd` does: TensorFlow's C++ start-up chatter (CUDA plugins on a CPU-only machine) and
# the libraries' deprecation notices would bury the progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", category=FutureWarning)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import relevance_metrics as rm  # noqa: E402

DEFAULT_INPUT = os.path.normpath(
    os.path.join(REPO_ROOT, "..", "shared", "datasets", "homedepot", "train_dev.csv.zip"))
SPLITS = ("train", "eval", "test")
SCORING_BATCH = 64
SUBSAMPLE_SALT = b"relkd-subsample:"
NDCG_K = 10


# --- Data ----------------------------------------------------------------------------------

def load_judgments(input_path: str, work_dir: str) -> Dict[str, Any]:
    """Accepted judgment records (dicts) of the Home Depot CSV, as the pipeline would accept them."""
    from components.ingest import rows
    from pipeline import homedepot
    from pipeline.configs import DataConfig

    converted = homedepot.convert(input_path, work_dir)
    rules = rows.RowRules.from_data_config(
        DataConfig(relevance_min=homedepot.RELEVANCE_MIN, relevance_max=homedepot.RELEVANCE_MAX))
    rejected: Counter = Counter()
    by_key: Dict[str, Dict[str, Any]] = {}
    rows_in = 0
    with open(converted["judgments"], encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        for cells in reader:
            rows_in += 1
            record, rejection = rows.validate_row(rows.JUDGMENTS, dict(zip(header, cells)), rules)
            if rejection is not None:
                rejected[rejection.reason] += 1
                continue
            key = rows.row_key(rows.JUDGMENTS, record)
            kept = by_key.get(key)
            if kept is None:
                by_key[key] = record
            else:  # The ExampleGen keeps the smallest canonical form.
                rejected[rows.DUPLICATE_KEY] += 1
                if rows.canonical_json(record) < rows.canonical_json(kept):
                    by_key[key] = record
    return {"records": list(by_key.values()), "rows_in": rows_in,
            "quarantined_by_reason": dict(sorted(rejected.items()))}


def pipeline_split_assigner():
    """query -> split name, by TFX ExampleGen's partition function on the pipeline's SplitConfig."""
    from tfx.components.example_gen import base_example_gen_executor as tfx_example_gen

    from components import example_codec
    from pipeline.configs import PipelineConfig
    from pipeline.pipeline import split_config

    split_proto = split_config(PipelineConfig()).split_config
    names = [s.name for s in split_proto.splits]
    if tuple(names) != SPLITS:
        raise RuntimeError(f"pipeline splits are {names}, expected {list(SPLITS)}")
    if split_proto.partition_feature_name != "query":
        raise RuntimeError(f"pipeline partitions on {split_proto.partition_feature_name!r}, not 'query'")
    # Cumulative bucket bounds, as the ExampleGen executor computes them.
    buckets, total = [], 0
    for split in split_proto.splits:
        total += split.hash_buckets
        buckets.append(total)
    cache: Dict[str, str] = {}

    def assign(query: str) -> str:
        if query not in cache:
            example = example_codec.to_example({"query": query})
            index = tfx_example_gen._PartitionFn(example, len(buckets), buckets, split_proto)
            cache[query] = names[index]
        return cache[query]

    assign.buckets = {s.name: s.hash_buckets for s in split_proto.splits}  # type: ignore[attr-defined]
    return assign


def subsample_by_query(records: Sequence[Dict[str, Any]], max_pairs: Optional[int]) -> List[Dict[str, Any]]:
    """Whole queries in salted-sha256 order while the pair count stays <= max_pairs."""
    if max_pairs is None:
        return list(records)
    by_query: "OrderedDict[str, List[Dict[str, Any]]]" = OrderedDict()
    for record in records:
        by_query.setdefault(record["query"], []).append(record)
    order = sorted(by_query, key=lambda q: hashlib.sha256(SUBSAMPLE_SALT + q.encode("utf-8")).hexdigest())
    chosen: List[Dict[str, Any]] = []
    for query in order:
        if len(chosen) + len(by_query[query]) > max_pairs:
            break
        chosen.extend(by_query[query])
    return chosen


def split_pairs(input_path: str, work_dir: str, split: str = "test",
                max_pairs: Optional[int] = None) -> Tuple[List[str], List[str], List[str]]:
    """One split's judged pairs (of `subsample_by_query(max_pairs)`) as serve_raw's three inputs:
    queries, item ids, titles."""
    data = load_judgments(input_path, work_dir)
    assign = pipeline_split_assigner()
    chosen = [r for r in subsample_by_query(data["records"], max_pairs) if assign(r["query"]) == split]
    return ([r["query"] for r in chosen], [r["item_id"] for r in chosen],
            [r["item_title"] for r in chosen])


def write_tfrecords(records: Sequence[Dict[str, Any]], path: str) -> None:
    import tensorflow as tf

    from components import example_codec

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path, options=tf.io.TFRecordOptions(compression_type="GZIP")) as writer:
        for record in records:
            writer.write(example_codec.to_example(
                {"query": record["query"], "item_id": record["item_id"],
                 "item_title": record["item_title"], "relevance": float(record["relevance"])}
            ).SerializeToString())


def split_sizes(records: Sequence[Dict[str, Any]]) -> Dict[str, int]:
    return {"pairs": len(records), "queries": len({r["query"] for r in records}),
            "relevant_pairs": int(sum(r["relevance"] >= rm.RELEVANT_THRESHOLD for r in records))}


# --- Scoring -------------------------------------------------------------------------------

def score_with_saved_model(model_dir: str, queries: Sequence[str], titles: Sequence[str],
                           batch_size: int = SCORING_BATCH) -> Dict[str, Any]:
    """Scores via `serve_raw`; the first batch is an untimed warm-up."""
    import numpy as np
    import tensorflow as tf

    from trainer import teacher

    loaded = tf.saved_model.load(model_dir)
    serve = loaded.signatures[teacher.RAW_SIGNATURE]
    batches = [(np.array([q.encode("utf-8") for q in queries[i:i + batch_size]], dtype=object),
                np.array([t.encode("utf-8") for t in titles[i:i + batch_size]], dtype=object))
               for i in range(0, len(queries), batch_size)]
    scores, seconds, timed_pairs, warmup_seconds = [], 0.0, 0, 0.0
    for index, (query_batch, title_batch) in enumerate(batches):
        start = time.perf_counter()
        out = serve(query=tf.constant(query_batch), item_title=tf.constant(title_batch))
        batch_scores = out[teacher.SCORE_KEY].numpy()
        elapsed = time.perf_counter() - start
        scores.append(batch_scores)
        if index == 0:
            warmup_seconds = elapsed
        else:
            seconds += elapsed
            timed_pairs += len(batch_scores)
    return {"scores": np.concatenate(scores).astype(float), "timed_pairs": timed_pairs,
            "timed_seconds": seconds, "warmup_seconds": warmup_seconds,
            "pairs_per_second": timed_pairs / seconds if seconds else math.nan,
            "batch_size": batch_size}


# --- Reporting -----------------------------------------------------------------------------

def machine_info() -> Dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory_gib = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_model": model, "cores": os.cpu_count(), "usable_cores": usable,
            "memory_gib": memory_gib, "platform": platform.platform(),
            "python": platform.python_version()}


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def sizes_record(benchmark: str, args: argparse.Namespace) -> Dict[str, Any]:
    """The JSON of a benchmark run size by size, before its sizes: what, when, at which commit,
    on what machine under what load, with which settings (`args`, less the `child_*` ones)."""
    return {"benchmark": benchmark,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "machine": dict(machine_info(), load_average_before=list(os.getloadavg())),
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("child")},
            "runs": []}


def finish_sizes_record(record: Dict[str, Any], table: str, path: Optional[str]) -> None:
    """Prints the sizes' Markdown `table`, adds the load after them and writes `record`."""
    print()
    print(table)
    record["machine"]["load_average_after"] = list(os.getloadavg())
    write_result(path, record)


def run_sizes(benchmark: str, args: argparse.Namespace, sizes: Sequence[str], run_size,
              markdown_table) -> None:
    """A size-by-size benchmark: `run_size(int(float(size)))` for each of `sizes` ("1e5"), each
    result printed as it comes, then the record (`sizes_record`) with `markdown_table(runs)`
    printed and written to `args.out`."""
    record = sizes_record(benchmark, args)
    for size in sizes:
        result = run_size(int(float(size)))
        print(json.dumps(result, sort_keys=True), flush=True)
        record["runs"].append(result)
    finish_sizes_record(record, markdown_table(record["runs"]), args.out)


def child_json(command: Sequence[str], what: str) -> Dict[str, Any]:
    """Runs `command` (a benchmark's child: python and its arguments) from the repository root,
    which it imports from, and returns the JSON of its last line; raises with its stderr's end,
    naming `what` failed."""
    child = subprocess.run(list(command), capture_output=True, text=True, cwd=REPO_ROOT, env={
        **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))})
    if child.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def write_result(path: Optional[str], result: Dict[str, Any]) -> None:
    """A benchmark's result as sorted, indented JSON at `path` (nothing when path is None)."""
    if not path:
        return
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True, default=str)
    print(f"wrote {path}")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(result: Dict[str, Any]) -> str:
    k = result["settings"]["ndcg_k"]
    lines = [
        f"| model | AUC | per-query AUC (queries) | NDCG@{k} (queries) | fine-tune s | scoring pairs/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        m = row["metrics"]
        lines.append(
            f"| {row['model']} | {_fmt(m['auc'])} | {_fmt(m['per_query_auc'])} ({m['per_query_auc_queries']}) "
            f"| {_fmt(m[f'ndcg@{k}'])} ({m[f'ndcg@{k}_queries']}) | {row['fine_tune_label']} "
            f"| {row['scoring_label']} |")
    return "\n".join(lines)


# --- Main ----------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=DEFAULT_INPUT,
                        help="Home Depot train_dev.csv[.zip] (default: %(default)s)")
    parser.add_argument("--profile", choices=("quick", "full"), default="quick",
                        help="teacher profile (trainer.teacher.PROFILES)")
    parser.add_argument("--max-train-pairs", type=int, default=None,
                        help="subsample training pairs by query hash (default: all)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="maximum epochs (default: the profile's)")
    parser.add_argument("--seed", type=int, default=42, help="teacher seed (custom_config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a custom_config key of the profile (VALUE parsed as "
                             "JSON, else taken as a string); repeatable")
    parser.add_argument("--report-split", choices=("test", "eval"), default="test",
                        help="split the metrics are reported on (default: %(default)s; use eval "
                             "to choose settings)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.max_train_pairs is not None and args.max_train_pairs < 1:
        parser.error("--max-train-pairs must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if not os.path.exists(args.input):
        parser.error(f"input not found: {args.input}")
    args.config_overrides = parse_overrides(parser, args.overrides)
    return args


def parse_overrides(parser: argparse.ArgumentParser, items: Sequence[str]) -> Dict[str, Any]:
    """`--set KEY=VALUE` items -> {key: value}; VALUE is JSON where it parses, else a string."""
    overrides: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return overrides


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()

    import numpy as np
    import tensorflow as tf
    from absl import logging as absl_logging
    from tfx.components.trainer.fn_args_utils import FnArgs

    from trainer import teacher

    absl_logging.set_verbosity(absl_logging.INFO)  # the teacher logs its progress at INFO

    with tempfile.TemporaryDirectory(prefix="teacher_homedepot_") as tmp:
        t0 = time.perf_counter()
        data = load_judgments(args.input, os.path.join(tmp, "converted"))
        assign = pipeline_split_assigner()
        parts: Dict[str, List[Dict[str, Any]]] = {name: [] for name in SPLITS}
        for record in data["records"]:
            parts[assign(record["query"])].append(record)
        train_records = subsample_by_query(parts["train"], args.max_train_pairs)
        sizes = {name: split_sizes(parts[name]) for name in SPLITS}
        sizes["train_used"] = split_sizes(train_records)
        prepare_seconds = time.perf_counter() - t0
        print(f"data: {data['rows_in']} rows, {len(data['records'])} accepted, quarantined "
              f"{data['quarantined_by_reason'] or 'none'}; prepared in {prepare_seconds:.1f}s", flush=True)
        for name, size in sizes.items():
            print(f"  {name:10s} {size['pairs']:6d} pairs {size['queries']:5d} queries "
                  f"({size['relevant_pairs']} relevant)", flush=True)

        examples_dir = os.path.join(tmp, "examples")
        write_tfrecords(train_records, os.path.join(examples_dir, "Split-train", "data.tfrecord.gz"))
        write_tfrecords(parts["eval"], os.path.join(examples_dir, "Split-eval", "data.tfrecord.gz"))

        custom_config = dict(teacher.PROFILES[args.profile], seed=args.seed)
        if args.epochs is not None:
            custom_config["epochs"] = args.epochs
        custom_config.update(args.config_overrides)
        fn_args = FnArgs(
            train_files=[os.path.join(examples_dir, "Split-train", "*")],
            eval_files=[os.path.join(examples_dir, "Split-eval", "*")],
            serving_model_dir=os.path.join(tmp, "serving_model"),
            model_run_dir=os.path.join(tmp, "model_run"),
            custom_config=custom_config)
        print(f"fine-tuning: profile {args.profile}, custom_config {custom_config}", flush=True)
        t0 = time.perf_counter()
        history = teacher.run_fn(fn_args)
        fine_tune_seconds = time.perf_counter() - t0
        with open(os.path.join(fn_args.model_run_dir, teacher.CONFIG_FILE)) as f:
            teacher_config = json.load(f)
        epoch_history = {k: [float(x) for x in v] for k, v in history.history.items()}
        val_loss = epoch_history.get("val_loss", [])
        best_epoch = int(np.argmin(val_loss)) + 1 if val_loss else None
        print(f"fine-tuning done in {fine_tune_seconds:.1f}s; best epoch {best_epoch}; "
              f"history {epoch_history}", flush=True)

        report = args.report_split
        test = parts[report]
        queries = [r["query"] for r in test]
        titles = [r["item_title"] for r in test]
        relevance = np.array([r["relevance"] for r in test], dtype=float)
        scored = score_with_saved_model(fn_args.serving_model_dir, queries, titles)
        print(f"scored {len(test)} {report} pairs: {scored['pairs_per_second']:.1f} pairs/s at batch "
              f"{scored['batch_size']} over {scored['timed_pairs']} pairs after warm-up", flush=True)

    t0 = time.perf_counter()
    baseline = rm.IdfOverlapScorer().fit(sorted({r["item_title"] for r in train_records}))
    idf_fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    baseline_scores = baseline.score(queries, titles)
    baseline_seconds = time.perf_counter() - t0

    teacher_metrics = rm.evaluate(queries, scored["scores"], relevance, k=NDCG_K)
    baseline_metrics = rm.evaluate(queries, baseline_scores, relevance, k=NDCG_K)
    load_after = os.getloadavg()
    rows = [
        {"model": f"teacher ({args.profile}: {teacher_config['num_layers']} layers, "
                  f"{teacher_config['max_seq_length']} tokens)",
         "metrics": teacher_metrics,
         "fine_tune_seconds": fine_tune_seconds,
         "scoring_pairs_per_second": scored["pairs_per_second"],
         "fine_tune_label": f"{fine_tune_seconds:.0f}",
         "scoring_label": f"{scored['pairs_per_second']:.0f} (batch {scored['batch_size']})"},
        {"model": "IDF token overlap (baseline)",
         "metrics": baseline_metrics,
         "fine_tune_seconds": None,
         "idf_fit_seconds": idf_fit_seconds,
         "scoring_pairs_per_second": len(test) / baseline_seconds if baseline_seconds else math.nan,
         "fine_tune_label": f"none (IDF fit {idf_fit_seconds:.1f})",
         "scoring_label": f"{len(test) / baseline_seconds:.0f} (pure Python)"},
    ]
    result = {
        "benchmark": "teacher_homedepot",
        "date": started.isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": dict(machine_info(), load_average_before=list(load_before),
                        load_average_after=list(load_after),
                        tensorflow=tf.__version__),
        "settings": {
            "input": os.path.abspath(args.input),
            "profile": args.profile,
            "max_train_pairs": args.max_train_pairs,
            "epochs_requested": args.epochs,
            "config_overrides": args.config_overrides,
            "report_split": args.report_split,
            "custom_config": custom_config,
            "teacher_config": teacher_config,
            "split_rule": "TFX ExampleGen _PartitionFn on feature 'query' (sha256), hash buckets "
                          + "/".join(f"{k} {v}" for k, v in assign.buckets.items()),
            "train_subsample_rule": "whole queries in sha256('relkd-subsample:' + query) order "
                                    "while pairs <= max_train_pairs",
            "relevant_threshold": rm.RELEVANT_THRESHOLD,
            "relevance_min": rm.RELEVANCE_MIN,
            "ndcg_k": NDCG_K,
            "scoring_batch_size": scored["batch_size"],
            "baseline_idf_documents": baseline.num_documents,
        },
        "data": {"rows_in": data["rows_in"], "accepted": len(data["records"]),
                 "quarantined_by_reason": data["quarantined_by_reason"]},
        "sizes": sizes,
        "fine_tune": {"seconds": fine_tune_seconds, "epochs_run": len(val_loss),
                      "best_epoch": best_epoch, "history": epoch_history,
                      "includes": "run_fn wall time: encoder load, training, eval after each "
                                  "epoch, best-weight restore, SavedModel export"},
        "scoring": {k: v for k, v in scored.items() if k != "scores"},
        "rows": rows,
        "wall_seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
    }
    table = markdown_table(result)
    print()
    print(table)
    print()
    print(f"{report} split: {sizes[report]['pairs']} pairs, {sizes[report]['queries']} queries; "
          f"teacher trained on {sizes['train_used']['pairs']} of {sizes['train']['pairs']} train pairs "
          f"({sizes['train_used']['queries']} queries), {len(val_loss)} epoch(s), best {best_epoch}; "
          f"machine {result['machine']['cores']} cores {result['machine']['cpu_model']}, "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    result["markdown_table"] = table
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
