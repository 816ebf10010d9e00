"""How long BERM-O's export takes to read a GraphContexts `neighbour_tables` folder, and in how much memory.

`trainer.berm_serving.read_neighbour_tables` turns the graph's table records into BERM-O's arrays
before the BermServingExporter encodes the distinct neighbour texts; with millions of logged
nodes it is the export's first cost. This writes tables in the graph's format for N queries and
N items (orders 1..`--max-order`, each list 1 to `--top-n` + 1 entries long, neighbours drawn
uniformly, weights descending; deterministic per seed), then reads them in a fresh child process
per size and reports wall seconds and peak RSS, with the RSS after imports (TensorFlow) as the
baseline::

    .venv/bin/python benchmarks/neighbour_tables_read.py --nodes 1e5 1e6 --out tables_read.json

The tables are written once per size and seed under `--work-dir` and reused, so a later commit
reads the same files. The JSON has the commit, the machine, its load and the tables'
fingerprint, which a change that must not alter the arrays keeps.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
SHARDS = 4
_WORDS = ["drill", "hose", "paint", "café", "ñandú", "50 ft", "cordless", "brush"]


def write_tables(directory: str, nodes: int, max_order: int, top_n: int, seed: int) -> int:
    """`nodes` queries and `nodes` items, each with one record per order; returns the records."""
    import tensorflow as tf

    from components.graph import metapaths

    rng = random.Random(seed)
    queries = [(f"query {i} {rng.choice(_WORDS)}",) * 2 for i in range(nodes)]  # (id, text)
    items = [(f"P{i:09d}", f"title {i} {rng.choice(_WORDS)} {rng.choice(_WORDS)}") for i in range(nodes)]
    os.makedirs(directory, exist_ok=True)
    partial = os.path.join(directory, ".writing")
    os.makedirs(partial, exist_ok=True)
    names = [f"tables-{s:05d}-of-{SHARDS:05d}.gz" for s in range(SHARDS)]
    writers = [tf.io.TFRecordWriter(os.path.join(partial, n), "GZIP") for n in names]
    records = 0
    for side, own, other in (("query", queries, items), ("item", items, queries)):
        for order in range(1, max_order + 1):
            pool = other if order % 2 else own  # odd orders end on the other side
            for node_id, _ in own:
                neighbours = [pool[rng.randrange(nodes)] for _ in range(rng.randint(1, top_n + 1))]
                weights = sorted((rng.random() for _ in neighbours), reverse=True)
                writers[records % SHARDS].write(metapaths.neighbour_record_to_tf_example({
                    "side": side, "node_id": node_id, "metapath": metapaths.metapath_name(side, order),
                    "order": order, "neighbour_ids": [n for n, _ in neighbours],
                    "neighbour_texts": [t for _, t in neighbours], "neighbour_weights": weights,
                }).SerializeToString())
                records += 1
    for writer in writers:
        writer.close()
    for name in names:  # a folder holds a size's tables only once they are all written
        os.replace(os.path.join(partial, name), os.path.join(directory, name))
    os.rmdir(partial)
    return records


def _child(args) -> None:
    import psutil

    from trainer import berm_serving

    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    data = berm_serving.read_neighbour_tables(args.child_dir, args.max_order, args.top_n)
    wall = time.perf_counter() - start
    print(json.dumps({
        "wall_s": round(wall, 2), "baseline_rss_mb": round(baseline / 2**20),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "records": sum(data.records.values()), "keys": {s: len(k) for s, k in data.keys.items()},
        "distinct_texts": len(data.texts), "fingerprint": data.fingerprint()}))


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """The synthetic tables' flags, shared with benchmarks/berm_tables_scale.py."""
    parser.add_argument("--nodes", nargs="+", default=["1e4", "1e5"],
                        help="queries per size (as many items), e.g. 1e5 1e6")
    parser.add_argument("--max-order", type=int, default=2)
    parser.add_argument("--top-n", type=int, default=10,
                        help="served neighbours per list (BERM-O's max_context_texts)")
    parser.add_argument("--seed", type=int, default=20221207)


def tables_for(work_dir: str, nodes: int, args) -> str:
    """The folder of the tables for `nodes` and `args`' settings under `work_dir`, written first
    if no earlier run left them there."""
    directory = os.path.join(work_dir, f"n{nodes}_o{args.max_order}_top{args.top_n}_s{args.seed}")
    if not os.path.isdir(directory) or not any(f.endswith(".gz") for f in os.listdir(directory)):
        print(f"writing tables for {nodes:,} queries and {nodes:,} items to {directory} ...", flush=True)
        start = time.perf_counter()
        write_tables(directory, nodes, args.max_order, args.top_n, args.seed)
        print(f"  written in {time.perf_counter() - start:.1f} s", flush=True)
    return directory


def _run_size(nodes: int, args) -> Dict[str, Any]:
    directory = tables_for(args.work_dir, nodes, args)
    print(f"reading {directory} in a child process ...", flush=True)
    from benchmarks import teacher_homedepot as th

    read = th.child_json([sys.executable, os.path.abspath(__file__), "--child-dir", directory,
                          "--max-order", str(args.max_order), "--top-n", str(args.top_n)],
                         f"reading {directory}")
    return {"nodes": nodes, "tables": directory, **read}


def markdown_table(runs: List[Dict[str, Any]]) -> str:
    lines = ["| queries + items | records | distinct texts | wall s | peak RSS | above baseline |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {2 * r['nodes']:,} | {r['records']:,} | {r['distinct_texts']:,} | {r['wall_s']:.1f} "
                     f"| {r['peak_rss_mb']:,} MB | {r['peak_rss_mb'] - r['baseline_rss_mb']:,} MB |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_table_arguments(parser)
    parser.add_argument("--work-dir", default=os.path.join("runs", "neighbour_tables_read"),
                        help="where the generated tables are kept between runs")
    parser.add_argument("--out", default="", help="write results as JSON here")
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    if args.child_dir:
        _child(args)
        return

    from benchmarks import teacher_homedepot as th

    th.run_sizes("neighbour_tables_read", args, args.nodes, lambda nodes: _run_size(nodes, args),
                 markdown_table)


if __name__ == "__main__":
    main()
