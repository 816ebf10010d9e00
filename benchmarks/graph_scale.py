"""Scale benchmark of components.graph.metapaths.ComputeNeighbourContexts on DirectRunner.

Generates synthetic search logs whose query and item popularity follow bounded power laws
(deterministic per seed and shard; the shards are generated inside the pipeline), runs the
graph build for each requested size in a fresh child process, and reports wall time,
throughput and peak memory, as JSON (``--out``, with the commit, the machine and its load) and
as a Markdown table::

    python benchmarks/graph_scale.py --edges 1e4 1e5 1e6 --mode in_memory --k 2 --out results.json
    python benchmarks/graph_scale.py --edges 1e6 --mode multi_processing --workers 2 --max-rss-mb 9500

Why a child process per size: peak RSS is only meaningful per run, and multi_processing
workers are grandchildren. The parent samples the RSS of the whole child process tree with
psutil (sum over processes, every 50 ms) and its CPU time (user + system, summed over every
process seen), and also records the child's own ``getrusage`` high-water marks
(``RUSAGE_SELF`` and, for worker processes that have been reaped, ``RUSAGE_CHILDREN``,
which is the largest single worker). ``baseline`` is the child's RSS after its imports,
just before the pipeline starts (Beam, and whatever importing ``components`` pulls in),
plus, in multi_processing mode, one fresh worker interpreter's import RSS per worker
(measured by the parent, outside the tree), so ``peak - baseline`` is what the run itself
cost. CPU seconds are the robust number on a busy machine; wall seconds are what a user
waits. ``--max-rss-mb`` / ``--timeout`` kill a run (the child and its workers) whose tree
grows past that many MB or runs too long; it is reported as a failed row.

Sizes scale the graph with the log (``_sizes``: rows/4 queries, rows/3 items), so the
degree distribution keeps its shape and cost should grow about linearly; the table lists
CPU microseconds per edge and KB per edge above baseline to make that easy to check.
``--edges`` is the number of generated log rows (= requested edges before aggregation);
pairs repeated across rows are summed by the pipeline, so "edges/s" uses the distinct edge
count (from ``graph_stats``); the JSON also has rows/s.

Figures measured with it, each with the command that produced it, are in the README (*Graph
scale*). What they show: importing ``components`` loads TensorFlow, hence a ~610 MB baseline per
process; multi_processing pays one baseline per worker and the runner process still holds every
shuffle, so it is faster than in_memory on two cores but needs about twice the memory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)

ROWS_PER_SHARD = 20_000


# --------------------------------------------------------------------------------------
# Synthetic logs
# --------------------------------------------------------------------------------------
def _power_law_ranks(rng, size: int, n: int, exponent: float):
    """Ranks in [0, n) with P(rank r) ~ (r + 1) ** -exponent (inverse CDF of the
    continuous bounded power law, floored)."""
    import numpy as np

    u = rng.random(size)
    one_minus = 1.0 - exponent
    x = ((n ** one_minus - 1.0) * u + 1.0) ** (1.0 / one_minus)
    return np.minimum(np.floor(x).astype(np.int64) - 1, n - 1)


def generate_shard(shard: int, rows: int, num_queries: int, num_items: int,
                   seed: int) -> Iterator[Dict]:
    """Rows of one shard; deterministic in (seed, shard)."""
    import numpy as np

    rng = np.random.default_rng([seed, shard])
    queries = _power_law_ranks(rng, rows, num_queries, 1.1)
    # Items: popular items are popular for every query, plus a query-specific offset so
    # that each query has its own long tail (gives realistic co-click structure).
    item_pop = _power_law_ranks(rng, rows, num_items, 1.05)
    local = rng.random(rows) < 0.5
    items = np.where(local, (queries * 7919 + item_pop) % num_items, item_pop)
    impressions = 1 + rng.geometric(0.08, rows)
    ctr = rng.beta(1.0, 12.0, rows)
    clicks = rng.binomial(impressions, ctr)
    purchases = rng.binomial(clicks, 0.1)
    variants = rng.integers(0, 3, rows)
    for q, i, n, c, p, v in zip(queries.tolist(), items.tolist(), impressions.tolist(),
                                 clicks.tolist(), purchases.tolist(), variants.tolist()):
        yield {"query": f"query {q}", "item_id": f"item{i}",
               "item_title": f"product {i} variant {v if v < 2 else 0}",
               "impressions": n, "clicks": c, "purchases": p}


def generate(shard_rows, num_queries: int, num_items: int, seed: int) -> Iterator[Dict]:
    shard, rows = shard_rows
    return generate_shard(shard, rows, num_queries, num_items, seed)


def _sizes(edges: int):
    return max(10, edges // 4), max(10, edges // 3)


def _own_cpu_s() -> float:
    """User + system seconds of this process and its reaped children."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


# --------------------------------------------------------------------------------------
# Child: one pipeline run
# --------------------------------------------------------------------------------------
def _child(args) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from components.graph import ComputeNeighbourContexts, GraphConfig
    # Import ourselves by module name so workers (multi_processing) unpickle
    # generate_shard by reference instead of from an unimportable __main__.
    import graph_scale  # pylint: disable=import-self

    edges = args.child_edges
    num_queries, num_items = _sizes(edges)
    shards = [(s, min(ROWS_PER_SHARD, edges - s * ROWS_PER_SHARD))
              for s in range(math.ceil(edges / ROWS_PER_SHARD))]
    import psutil

    config = GraphConfig(max_order=args.k, top_n=args.top_n, hub_cap=args.hub_cap,
                         order3_beam_width=args.beam_width,
                         compute_components=not args.no_components)
    options = PipelineOptions([f"--direct_num_workers={args.workers}",
                               f"--direct_running_mode={args.mode}"])
    out_dir = tempfile.mkdtemp(prefix="graph_scale_")
    baseline_rss = psutil.Process().memory_info().rss
    cpu_start = _own_cpu_s()
    start = time.perf_counter()
    with beam.Pipeline(options=options) as p:
        rows = (p
                | "Shards" >> beam.Create(shards)
                | "Reshuffle" >> beam.Reshuffle()
                | "Generate" >> beam.FlatMap(graph_scale.generate, num_queries=num_queries,
                                                  num_items=num_items, seed=args.seed))
        out = rows | "Graph" >> ComputeNeighbourContexts(config)
        (out.graph_stats
         | "StatsJson" >> beam.Map(json.dumps, sort_keys=True)
         | "WriteStats" >> beam.io.WriteToText(os.path.join(out_dir, "stats"),
                                               shard_name_template="", num_shards=1))
        (out.neighbour_tables
         | "CountTables" >> beam.combiners.Count.Globally()
         | "WriteCount" >> beam.io.WriteToText(os.path.join(out_dir, "tables"),
                                               shard_name_template="", num_shards=1))
    wall = time.perf_counter() - start
    cpu = _own_cpu_s() - cpu_start
    with open(os.path.join(out_dir, "stats")) as f:
        stats = json.loads(f.read())
    with open(os.path.join(out_dir, "tables")) as f:
        table_rows = int(f.read().strip())
    shutil.rmtree(out_dir, ignore_errors=True)
    result = {
        "rows": edges,
        "distinct_edges": stats["edges"]["total"],
        "edges_after_hub_cap": stats["edges"]["after_hub_cap"],
        "nodes": stats["nodes"],
        "capped_hubs": stats["capped_hubs"]["total"],
        "components": stats["connected_components"],
        "degree_query": {k: v for k, v in stats["degree"]["query"].items() if k != "log2_histogram"},
        "degree_item": {k: v for k, v in stats["degree"]["item"].items() if k != "log2_histogram"},
        "table_rows": table_rows,
        "wall_s": wall,
        "rows_per_s": edges / wall,
        "edges_per_s": stats["edges"]["total"] / wall,
        "child_cpu_s": cpu,
        "baseline_rss_mb": baseline_rss / 2 ** 20,
        "child_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_worker_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    with open(args.child_out, "w") as f:
        json.dump(result, f)


# --------------------------------------------------------------------------------------
# Parent: one child per size, RSS sampling, report
# --------------------------------------------------------------------------------------
def _sample_tree(proc, cpu_by_pid: Dict[int, float]) -> int:
    """RSS of ``proc`` and all its descendants now; updates each one's CPU seconds."""
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            with p.oneshot():
                total += p.memory_info().rss
                times = p.cpu_times()
            cpu_by_pid[p.pid] = max(cpu_by_pid.get(p.pid, 0.0), times.user + times.system)
        except psutil.Error:
            pass
    return total


def _worker_import_rss(env) -> int:
    """RSS of a fresh interpreter after the imports a multi_processing worker does (Beam's
    worker, and ``components`` to unpickle the graph's DoFns, which may pull in
    TensorFlow); run outside the measured process tree."""
    code = ("import resource, apache_beam.runners.worker.sdk_worker_main, "
            "components.graph.metapaths, graph_scale; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env=env).stdout
    return int(out.split()[-1]) * 1024


def _kill_tree(proc) -> None:
    """Kills the child we started and its descendants (by pid)."""
    import psutil

    try:
        procs = proc.children(recursive=True) + [proc]
    except psutil.Error:
        procs = [proc]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def _run_size(edges: int, args) -> Dict:
    import psutil

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        child_out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--child-edges", str(edges),
           "--child-out", child_out, "--mode", args.mode, "--workers", str(args.workers),
           "--k", str(args.k), "--top-n", str(args.top_n), "--hub-cap", str(args.hub_cap),
           "--seed", str(args.seed), "--beam-width", str(args.beam_width)] + (["--no-components"] if args.no_components else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, HERE, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    worker_baseline = _worker_import_rss(env) if args.mode == "multi_processing" else 0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    ps = psutil.Process(proc.pid)
    peak, cpu_by_pid, failure = 0, {}, None
    while proc.poll() is None:
        peak = max(peak, _sample_tree(ps, cpu_by_pid))
        elapsed = time.perf_counter() - start
        if args.timeout and elapsed > args.timeout:
            failure = f"timed out after {args.timeout:.0f}s"
        elif args.max_rss_mb and peak > args.max_rss_mb * 2 ** 20:
            failure = f"killed at {peak / 2 ** 20:,.0f} MB RSS (limit {args.max_rss_mb:,} MB) after {elapsed:.0f}s"
        if failure:
            _kill_tree(ps)
            proc.wait()
            break
        time.sleep(0.05)
    result = {"rows": edges, "mode": args.mode, "workers": args.workers, "k": args.k,
              "hub_cap": args.hub_cap, "beam_width": args.beam_width, "top_n": args.top_n,
              "peak_tree_rss_mb": peak / 2 ** 20, "tree_cpu_s": sum(cpu_by_pid.values()),
              "process_wall_s": time.perf_counter() - start}
    if failure is None and proc.returncode != 0:
        failure = f"child failed with exit code {proc.returncode}"
    if failure is not None:
        result["failed"] = failure
        return result
    with open(child_out) as f:
        result.update(json.load(f))
    os.unlink(child_out)
    result["worker_baseline_rss_mb"] = worker_baseline / 2 ** 20
    result["tree_baseline_rss_mb"] = result["baseline_rss_mb"] + args.workers * result["worker_baseline_rss_mb"] \
        if args.mode == "multi_processing" else result["baseline_rss_mb"]
    return result


def markdown_table(results: List[Dict]) -> str:
    """rows, distinct edges, mode, workers, k, wall s, edges/s, peak RSS (tree), then CPU
    seconds (tree), baseline RSS (tree: after imports, per process), CPU us per edge, KB
    per edge above baseline, table rows, capped hubs."""
    header = ("| rows | distinct edges | mode | workers | k | wall s | edges/s | peak RSS MB (tree) "
              "| CPU s (tree) | baseline RSS MB (tree) | CPU us/edge | KB/edge above baseline "
              "| table rows | capped hubs |")
    lines = [header, "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "failed" in r:
            lines.append(
                f"| {r['rows']:,} | - | {r['mode']} | {r['workers']} | {r['k']} "
                f"| >{r['process_wall_s']:.0f} | - | >{r['peak_tree_rss_mb']:,.0f} "
                f"| >{r['tree_cpu_s']:.0f} | - | - | - | - | {r['failed']} |")
            continue
        edges = r["distinct_edges"] or 1
        baseline = r.get("tree_baseline_rss_mb", r["baseline_rss_mb"])
        above = r["peak_tree_rss_mb"] - baseline
        lines.append(
            f"| {r['rows']:,} | {r['distinct_edges']:,} | {r['mode']} | {r['workers']} | {r['k']} "
            f"| {r['wall_s']:.1f} | {r['edges_per_s']:,.0f} | {r['peak_tree_rss_mb']:,.0f} "
            f"| {r['tree_cpu_s']:.1f} | {baseline:,.0f} "
            f"| {r['tree_cpu_s'] / edges * 1e6:,.0f} | {above * 1024 / edges:.2f} "
            f"| {r['table_rows']:,} | {r['capped_hubs']:,} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", nargs="+", default=["1e4", "1e5"],
                        help="sizes (log rows), e.g. 1e5 1e6 1e7")
    parser.add_argument("--mode", choices=("in_memory", "multi_processing", "multi_threading"),
                        default="in_memory")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--k", type=int, default=2, help="max metapath order")
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--hub-cap", type=int, default=100)
    parser.add_argument("--beam-width", type=int, default=0,
                        help="GraphConfig.order3_beam_width (0 = exact order 3)")
    parser.add_argument("--no-components", action="store_true")
    parser.add_argument("--seed", type=int, default=20221207)
    parser.add_argument("--timeout", type=float, default=0, help="seconds per size, 0 = none")
    parser.add_argument("--max-rss-mb", type=int, default=0,
                        help="kill a run whose process tree RSS exceeds this (MB), 0 = none")
    parser.add_argument("--out", default="", help="write results as JSON here")
    parser.add_argument("--child-edges", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_edges is not None:
        for path in (REPO_ROOT, HERE):
            if path not in sys.path:
                sys.path.insert(0, path)
        _child(args)
        return

    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from benchmarks import teacher_homedepot as th

    # The sizes' figures with what they depend on: the machine, its load and the commit.
    record = th.sizes_record("graph_scale", args)
    for size in args.edges:
        edges = int(float(size))
        print(f"running {edges:,} rows, mode={args.mode}, workers={args.workers}, k={args.k} ...",
              flush=True)
        result = _run_size(edges, args)
        print(json.dumps(result, sort_keys=True), flush=True)
        record["runs"].append(result)
        if args.out:  # keep what finished if a later size fails or is interrupted
            with open(args.out, "w") as f:
                json.dump(record, f, indent=2, sort_keys=True)
    th.finish_sizes_record(record, markdown_table(record["runs"]), args.out)


if __name__ == "__main__":
    main()
