"""What BERM-O's neighbour tables cost a model server as the logs grow: size, load time, memory, latency.

BERM-O carries every logged query's and item's neighbour tables (`trainer.berm_serving`), so a
serving replica holds them all. This builds BERM-O for N queries and N items from the synthetic
tables `benchmarks/neighbour_tables_read.py` writes (the same files, the same seed), around an
untrained student of the default sizes (64-wide token embedding, no title vectors: the tables
are what is measured; seeded, so every commit with the same student has the same weights), then, each in a fresh child process:

  * exports it: wall seconds, peak RSS, and the SavedModel's graph (`saved_model.pb`) and
    variables on disk;
  * loads it as TF Serving's process would (`tf.saved_model.load`): wall seconds and RSS above
    the process's after importing TensorFlow;
  * scores 100-pair calls of known queries and items through `serve_raw`, one thread per op:
    the median and p99 ms of `--calls` calls after a warm-up call.

    .venv/bin/python benchmarks/berm_tables_scale.py --nodes 1e5 1e6 --out berm_tables_scale.json

The models are written under `--work-dir` and removed after measuring (`--keep` keeps them).
Latencies measured in two processes drift apart by more than a change to the tables moves them,
so to compare two commits, keep the earlier one's models and serve them beside the later one's,
call by call in one process (`baseline_p50_ms`, and the largest score difference):

    .venv/bin/python benchmarks/berm_tables_scale.py --nodes 1e6 --keep --work-dir runs/bts_old  # earlier commit
    .venv/bin/python benchmarks/berm_tables_scale.py --nodes 1e6 --baseline-models runs/bts_old
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
BATCH = 100


def _peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _export(args) -> Dict[str, Any]:
    import psutil
    import tensorflow as tf

    from trainer import bert_checkpoint, berm_layers, berm_serving, student

    baseline = psutil.Process().memory_info().rss
    tf.keras.utils.set_random_seed(args.seed)
    scorer = student.build_student(berm_layers.read_vocab(bert_checkpoint.vocab_file()),
                                   max_order=args.max_order, max_context_texts=args.top_n)
    start = time.perf_counter()
    serving = berm_serving.export_serving_model(scorer, args.child_model, args.child_tables)
    wall = time.perf_counter() - start
    variables = os.path.join(args.child_model, "variables")
    return {"export_s": round(wall, 1), "export_baseline_rss_mb": round(baseline / 2**20),
            "export_peak_rss_mb": _peak_rss_mb(),
            "graph_bytes": os.path.getsize(os.path.join(args.child_model, "saved_model.pb")),
            "variables_bytes": sum(os.path.getsize(os.path.join(variables, f)) for f in os.listdir(variables)),
            "nodes": serving.manifest["tables"]["nodes"],
            "fingerprint": serving.manifest["tables"]["fingerprint"]}


def _serve(args) -> Dict[str, Any]:
    import numpy as np
    import psutil
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import tensorflow_text  # noqa: F401  pylint: disable=unused-import  (the model's ops)

    process = psutil.Process()
    baseline = process.memory_info().rss
    start = time.perf_counter()
    serve_raw = tf.saved_model.load(args.child_model).signatures["serve_raw"]
    load = time.perf_counter() - start
    loaded_rss = process.memory_info().rss
    # Known ids, as neighbour_tables_read.write_tables names them: queries from the first
    # records (it writes the query side first), items by their pattern.
    first = sorted(f for f in os.listdir(args.child_tables) if f.endswith(".gz"))[0]
    records = [tf.train.Example.FromString(r.numpy()).features.feature
               for r in tf.data.TFRecordDataset(os.path.join(args.child_tables, first), "GZIP").take(2000)]
    queries = [r["node_id"].bytes_list.value[0] for r in records if r["side"].bytes_list.value[0] == b"query"]
    items = [f"P{i:09d}".encode() for i in range(len(queries))]
    rng = random.Random(args.seed)

    def request():
        pairs = [(rng.choice(queries), rng.choice(items)) for _ in range(BATCH)]
        return {"query": tf.constant([q for q, _ in pairs]), "item_id": tf.constant([i for _, i in pairs]),
                "item_title": tf.constant([b"title " + i for _, i in pairs])}

    requests = [request() for _ in range(args.calls + 1)]
    models = {"": serve_raw}
    if args.child_baseline:
        # An earlier commit's model of the same size, called alternately in this process (in a
        # random order per request): one process's latencies compare; two processes' drift.
        models["baseline_"] = tf.saved_model.load(args.child_baseline).signatures["serve_raw"]
    times = {name: [] for name in models}
    scores = {name: model(**requests[0])["score"].numpy() for name, model in models.items()}
    difference = 0.0
    for inputs in requests[1:]:
        names = rng.sample(sorted(models), len(models))
        for name in names:
            start = time.perf_counter()
            scores[name] = models[name](**inputs)["score"].numpy()
            times[name].append((time.perf_counter() - start) * 1000)
        difference = max(difference, float(np.abs(scores[names[0]] - scores[names[-1]]).max()))
    result = {"load_s": round(load, 2), "load_baseline_rss_mb": round(baseline / 2**20),
              "loaded_rss_mb": round(loaded_rss / 2**20), "serve_peak_rss_mb": _peak_rss_mb()}
    for name, taken in times.items():
        result[f"{name}p50_ms"] = round(float(np.percentile(taken, 50)), 2)
        result[f"{name}p99_ms"] = round(float(np.percentile(taken, 99)), 2)
    if args.child_baseline:
        result["max_score_difference"] = difference
    return result


def _child(args, mode: str) -> Dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--child", mode,
               "--child-model", args.child_model, "--child-tables", args.child_tables,
               "--max-order", str(args.max_order),
               "--top-n", str(args.top_n), "--seed", str(args.seed), "--calls", str(args.calls)]
    if mode == "serve" and args.baseline_models:
        command += ["--child-baseline", os.path.join(args.baseline_models, os.path.basename(args.child_model))]
    from benchmarks import teacher_homedepot as th

    return th.child_json(command, f"{mode} of {args.child_model}")


def _run_size(nodes: int, args) -> Dict[str, Any]:
    from benchmarks import neighbour_tables_read

    tables = neighbour_tables_read.tables_for(args.tables_dir, nodes, args)
    args.child_model = os.path.join(args.work_dir, f"berm_n{nodes}")
    args.child_tables = tables
    shutil.rmtree(args.child_model, ignore_errors=True)
    print(f"exporting BERM-O with {tables} ...", flush=True)
    result = {"nodes_per_side": nodes, "tables": tables, **_child(args, "export")}
    print(f"  {result['export_s']} s; loading and serving it ...", flush=True)
    result.update(_child(args, "serve"))
    if not args.keep:
        shutil.rmtree(args.child_model)
    return result


def markdown_table(runs: List[Dict[str, Any]]) -> str:
    lines = ["| queries + items | export s | graph (saved_model.pb) | variables | load s "
             "| RSS loaded, above baseline | p50 / p99 ms per 100 pairs |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        lines.append(f"| {2 * r['nodes_per_side']:,} | {r['export_s']:.0f} | {r['graph_bytes'] / 1e6:,.1f} MB "
                     f"| {r['variables_bytes'] / 1e6:,.0f} MB | {r['load_s']:.1f} "
                     f"| {r['loaded_rss_mb'] - r['load_baseline_rss_mb']:,} MB "
                     f"| {r['p50_ms']:.2f} / {r['p99_ms']:.2f}"
                     + (f" (baseline {r['baseline_p50_ms']:.2f} / {r['baseline_p99_ms']:.2f})"
                        if "baseline_p50_ms" in r else "") + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from benchmarks import neighbour_tables_read

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    neighbour_tables_read.add_table_arguments(parser)
    parser.add_argument("--calls", type=int, default=200, help="timed 100-pair calls per size")
    parser.add_argument("--tables-dir", default=os.path.join("runs", "neighbour_tables_read"),
                        help="where the synthetic tables are (written there if missing)")
    parser.add_argument("--work-dir", default=os.path.join("runs", "berm_tables_scale"),
                        help="where the models are exported")
    parser.add_argument("--keep", action="store_true", help="keep the exported models")
    parser.add_argument("--baseline-models", default="",
                        help="a --work-dir of an earlier commit's run with --keep: its model of each "
                             "size is served alternately with this one (baseline_p50_ms, "
                             "max_score_difference)")
    parser.add_argument("--out", default="", help="write results as JSON here")
    parser.add_argument("--child", choices=["export", "serve"], help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-tables", help=argparse.SUPPRESS)
    parser.add_argument("--child-baseline", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_export(args) if args.child == "export" else _serve(args)))
        return

    from benchmarks import teacher_homedepot as th

    th.run_sizes("berm_tables_scale", args, args.nodes, lambda nodes: _run_size(nodes, args),
                 markdown_table)


if __name__ == "__main__":
    main()
