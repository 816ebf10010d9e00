"""Load benchmark of `relkd serve`: concurrent gRPC clients, each scoring one query against 100 items.

Starts `relkd serve` as its own process on loopback (never another address), then runs
`--clients` threads for `--seconds`, each with its own channel, sending PredictRequests to the
`serve_raw` signature through the official `tensorflow_serving.apis` stub (via
`pipeline.scoring_client`), one query x `--items` items per request. Reports requests/s,
pairs/s, p50/p99 latency per request and the error count (every error is counted, none retried):

    .venv/bin/python benchmarks/serving_load.py --model-base runs/default/serving/relkd

`--batching` (with `--max-batch-size`, `--batch-timeout-ms`) starts the server with its
server-side batching on, so the same load measures what merging concurrent requests gains.

Queries and items come from the embedded default shop (pipeline/default_data.py), so the texts
look like real ones; each request draws a query and `--items` items at random (seeded). Bounded
in time, and the server is stopped at the end whatever happens.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import teacher_homedepot as th  # noqa: E402


def shop_texts(seed: int) -> Dict[str, List]:
    from pipeline import default_data

    with tempfile.TemporaryDirectory() as tmp:
        made = default_data.write(tmp, default_data.ShopSpec(seed=seed))
        with open(made["logs"], encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    queries = sorted({r["query"] for r in rows if r["query"].strip()})
    items = sorted({(r["item_id"], r["item_title"]) for r in rows if r["item_id"].strip()})
    return {"queries": queries, "items": items}


def start_server(model_base: str, model_name: Optional[str], server_flags: Sequence[str] = ()):
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--model-base", model_base, "--port", "0"]
    if model_name:
        command += ["--model-name", model_name]
    command += list(server_flags)
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.monotonic() + 300
    for line in process.stdout:
        if "on 127.0.0.1:" in line:
            return process, int(line.split("on 127.0.0.1:")[1].split()[0])
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError("relkd serve did not start")


def percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def server_flags(args) -> List[str]:
    """`relkd serve` flags from this benchmark's own."""
    flags = [f"--{name}={value}" for name, value in (("intra-op-threads", args.intra_op_threads),
                                                      ("inter-op-threads", args.inter_op_threads))
             if value is not None]
    if not args.batching:
        return flags
    return flags + ["--batching", "--max-batch-size", str(args.max_batch_size),
                    "--batch-timeout-ms", f"{args.batch_timeout_ms:g}"]


def server_batching(output: str) -> Optional[Dict[str, int]]:
    """The batcher's totals from what `relkd serve --batching` prints as it stops (warm-up
    requests included); None without batching."""
    match = re.search(r"Batching: (\d+) requests? in (\d+) model calls?", output or "")
    return {"requests": int(match[1]), "model_calls": int(match[2])} if match else None


def run(args) -> Dict[str, Any]:
    from pipeline import scoring_client

    texts = shop_texts(args.seed)
    model_name = args.model_name or os.path.basename(os.path.abspath(args.model_base).rstrip("/"))
    process, port = start_server(args.model_base, model_name, server_flags(args))
    target = f"127.0.0.1:{port}"
    latencies: List[float] = []
    errors: List[str] = []
    lock = threading.Lock()
    try:
        with scoring_client.ScoringClient(target, model_name, retries=0) as warm:
            for _ in range(3):
                warm.rank(texts["queries"][0], texts["items"][:args.items])
        stop_at = time.monotonic() + args.seconds

        def client(index: int) -> None:
            rng = random.Random(args.seed * 1000 + index)
            with scoring_client.ScoringClient(target, model_name, retries=0, timeout=args.timeout) as c:
                c.signatures()
                while time.monotonic() < stop_at:
                    query = rng.choice(texts["queries"])
                    items = rng.sample(texts["items"], args.items)
                    started = time.perf_counter()
                    try:
                        c.rank(query, items)
                        elapsed = time.perf_counter() - started
                        with lock:
                            latencies.append(elapsed)
                    except scoring_client.ScoringError as e:
                        with lock:
                            errors.append(str(e))

        began = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - began
    finally:
        process.terminate()
        try:
            farewell = process.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            farewell = ""
    requests = len(latencies)
    return {
        "benchmark": "serving_load",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": th.git_commit(),
        "machine": dict(th.machine_info(), load_average_after=list(os.getloadavg())),
        "settings": {"model_base": os.path.abspath(args.model_base), "model": model_name,
                     "clients": args.clients, "items_per_request": args.items,
                     "seconds": args.seconds, "seed": args.seed,
                     "server_flags": server_flags(args)},
        "requests": requests, "errors": len(errors), "error_examples": errors[:5],
        "wall_seconds": wall,
        "requests_per_second": requests / wall if wall else float("nan"),
        "pairs_per_second": requests * args.items / wall if wall else float("nan"),
        "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
        "server_batching": server_batching(farewell),
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-base", required=True,
                        help="folder of numbered BERM-O versions, e.g. runs/default/serving/relkd")
    parser.add_argument("--model-name", help="default: the folder's name")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--items", type=int, default=100, help="items per request (default 100)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to send (default 20)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per request")
    parser.add_argument("--seed", type=int, default=20221207)
    parser.add_argument("--batching", action="store_true",
                        help="start the server with --batching (concurrent requests share calls)")
    parser.add_argument("--max-batch-size", type=int, default=1000,
                        help="with --batching: the server's --max-batch-size (default 1000)")
    parser.add_argument("--batch-timeout-ms", type=float, default=0.0,
                        help="with --batching: the server's --batch-timeout-ms (default 0)")
    parser.add_argument("--intra-op-threads", type=int, default=None,
                        help="the server's --intra-op-threads (default: the server's, 1)")
    parser.add_argument("--inter-op-threads", type=int, default=None,
                        help="the server's --inter-op-threads (default: the server's, 0: "
                             "TensorFlow's choice)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model_base):
        parser.error(f"--model-base not found: {args.model_base}")
    if args.clients < 1 or args.items < 1 or not 0 < args.seconds <= 600:
        parser.error("--clients and --items must be >= 1 and --seconds in (0, 600]")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(f"{result['settings']['clients']} clients x {result['settings']['items_per_request']} items "
          f"per request for {result['wall_seconds']:.1f}s: {result['requests']} requests, "
          f"{result['errors']} errors; {result['requests_per_second']:.1f} requests/s = "
          f"{result['pairs_per_second']:,.0f} pairs/s; p50 {result['p50_ms']:.1f} ms, "
          f"p99 {result['p99_ms']:.1f} ms")
    batching = result["server_batching"]
    if batching:
        print(f"server: {batching['requests']} requests in {batching['model_calls']} model calls")
    if result["errors"]:
        print("errors, e.g.:", *result["error_examples"], sep="\n  ")
    th.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
