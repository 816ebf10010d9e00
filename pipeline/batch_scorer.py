"""`relkd score --model-dir DIR --input pairs.csv --output scores.csv`: offline scoring, streamed.

Reads `id, query, item_id, item_title` rows (CSV with a header, UTF-8, any column order, extra
columns ignored) in batches, scores each batch with the model's `serve_raw` signature (the one TF
Serving answers), and writes `id, score` rows in input order. At most two batches per worker are
in memory, so a file larger than memory works. This is also how unseen queries are judged: any
file of pairs, scored by the pushed model.

BERM-O's ops are small, so one call at a time leaves most of a many-core machine idle whatever
TensorFlow's threads per op; `workers` calls in flight at once, each op on one thread
(`intra_op_threads` 1), is how TF Serving's own deployment fills the cores.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import os
import time
from typing import Callable, Dict, Iterator, List

from pipeline import run_arguments
from pipeline.exit_codes import UsageError
from pipeline.tf_threads import set_threads, threads_label

REQUIRED = ("id", "query", "item_id", "item_title")
RAW_SIGNATURE = "serve_raw"


class ScoringInputError(ValueError):
    """The input file or the model cannot be used; the message says what to fix."""


def resolve_model_dir(path: str) -> str:
    """A SavedModel folder, or a Pusher base (numbered versions) -> its newest version."""
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    if os.path.isdir(path):
        versions = sorted((int(e) for e in os.listdir(path)
                           if e.isdigit() and os.path.exists(os.path.join(path, e, "saved_model.pb"))))
        if versions:
            return os.path.join(path, str(versions[-1]))
    raise ScoringInputError(f"{path} is neither a SavedModel folder nor a folder of numbered "
                            "SavedModel versions (e.g. <output>/serving/relkd)")


def _batches(reader: Iterator[List[str]], index: Dict[str, int], size: int, path: str,
             blank: collections.Counter) -> Iterator[List[List[str]]]:
    """Batches of `REQUIRED` cells; `blank` counts the rows whose query or title is empty."""
    batch = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        if len(cells) <= max(index.values()):
            raise ScoringInputError(f"{path}, line {reader.line_num}: expected at least "
                                    f"{max(index.values()) + 1} fields, got {len(cells)}")
        row = [cells[index[name]] for name in REQUIRED]
        for name, cell in zip(REQUIRED[1::2], row[1::2]):  # query, item_title
            if not cell.strip():
                blank[name] += 1
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_file(model_dir: str, input_path: str, output_path: str, batch_size: int = 1024,
               echo: Callable[[str], None] = print, progress_seconds: float = 10.0,
               workers: int = 1, intra_op_threads: int = 0) -> Dict[str, float]:
    """Scores `input_path` into `output_path` with `workers` model calls in flight; the threads
    per op are set (`intra_op_threads`, 0: TensorFlow's choice) only if TensorFlow has run no op
    yet in this process, as in `relkd score`."""
    if batch_size < 1:
        raise ScoringInputError("--batch-size must be at least 1")
    if workers < 1 or intra_op_threads < 0:
        raise ScoringInputError("--workers must be at least 1 and --intra-op-threads at least 0 "
                                "(0: TensorFlow's choice)")
    if not os.path.exists(input_path):
        raise ScoringInputError(f"input not found: {input_path}")
    if os.path.isdir(input_path):
        raise ScoringInputError(f"input {input_path} is a folder; give the CSV file of pairs")
    try:
        run_arguments.check_output_path(output_path, "--output", folder=False)
    except UsageError as e:
        raise ScoringInputError(str(e)) from e
    model_path = resolve_model_dir(model_dir)
    set_threads(intra_op_threads)
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (the model tokenises in-graph)

    model = tf.saved_model.load(model_path)
    if RAW_SIGNATURE not in model.signatures:
        raise ScoringInputError(f"{model_path} has no {RAW_SIGNATURE!r} signature (it has "
                                f"{sorted(model.signatures)}); score with a BERM-O export")
    serve = model.signatures[RAW_SIGNATURE]
    echo(f"Scoring {input_path} with {model_path} in batches of {batch_size}, {workers} "
         f"call(s) at a time, threads per op: {threads_label(intra_op_threads)} ...")
    started = time.monotonic()
    rows = 0
    blank = collections.Counter()
    partial = output_path + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    try:
        rows = _score_rows(serve, input_path, partial, batch_size, echo, progress_seconds, started,
                           workers, blank)
        os.replace(partial, output_path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)  # a failed run never leaves a file that looks like output
        raise
    seconds = time.monotonic() - started
    echo(f"Scored {rows:,} pairs in {seconds:.1f}s ({rows / max(seconds, 1e-9):,.0f} pairs/s) "
         f"-> {output_path}")
    if blank:
        # Scored all the same (the output keeps every id), but a side with no words is usually
        # a broken input row, and its score still ranks among the real ones.
        echo("Warning: " + " and ".join(f"{n:,} pair(s) with an empty {name}"
                                        for name, n in sorted(blank.items()))
             + ", scored without any words on that side: check the input")
    return {"rows": rows, "seconds": seconds, "model": model_path, "workers": workers,
            "intra_op_threads": intra_op_threads, "empty_query": blank["query"],
            "empty_item_title": blank["item_title"]}


def _score_batch(serve, batch: List[List[str]]):
    import numpy as np
    import tensorflow as tf

    columns = list(zip(*batch))
    scores = serve(query=tf.constant(columns[1]), item_id=tf.constant(columns[2]),
                   item_title=tf.constant(columns[3]))["score"].numpy()
    return columns[0], np.asarray(scores).reshape(-1)


def _score_rows(serve, input_path, partial, batch_size, echo, progress_seconds, started, workers,
                blank):
    rows, last = 0, started
    with open(input_path, encoding="utf-8", newline="") as source, \
            open(partial, "w", encoding="utf-8", newline="") as sink, \
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="score") as pool:
        reader = csv.reader(source)
        header = [h.strip().lstrip("\ufeff") for h in next(reader, [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ScoringInputError(f"{input_path}: column(s) {', '.join(missing)} missing; the "
                                    f"header must name {', '.join(REQUIRED)} (found {', '.join(header) or 'nothing'})")
        index = {name: header.index(name) for name in REQUIRED}
        writer = csv.writer(sink, lineterminator="\n")
        writer.writerow(("id", "score"))
        # Futures in input order; the oldest is written before more are read, so memory holds
        # at most 2 * workers batches and the output keeps the input's order.
        pending = collections.deque()

        def write_oldest():
            nonlocal rows, last
            ids, scores = pending.popleft().result()
            writer.writerows((i, f"{float(s):.6f}") for i, s in zip(ids, scores))
            rows += len(ids)
            now = time.monotonic()
            if now - last >= progress_seconds:
                echo(f"  {rows:,} pairs scored ({rows / (now - started):,.0f} pairs/s)")
                last = now

        try:
            for batch in _batches(reader, index, batch_size, input_path, blank):
                pending.append(pool.submit(_score_batch, serve, batch))
                if len(pending) >= 2 * workers:
                    write_oldest()
            while pending:
                write_oldest()
        finally:
            for future in pending:
                future.cancel()
    return rows
