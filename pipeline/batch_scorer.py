"""`relkd score --model-dir DIR --input pairs.csv --output scores.csv`: offline scoring, streamed.

Reads `id, query, item_id, item_title` rows (CSV with a header, UTF-8, any column order, extra
columns ignored) in batches, scores each batch with the model's `serve_raw` signature (the one TF
Serving answers), and writes `id, score` rows in input order. Only one batch is in memory, so a
file larger than memory works. This is also how unseen queries are judged: any file of pairs,
scored by the pushed model.
"""
from __future__ import annotations

import csv
import os
import time
from typing import Callable, Dict, Iterator, List

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


def _batches(reader: Iterator[List[str]], index: Dict[str, int], size: int, path: str
             ) -> Iterator[List[List[str]]]:
    batch = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        if len(cells) <= max(index.values()):
            raise ScoringInputError(f"{path}, line {reader.line_num}: expected at least "
                                    f"{max(index.values()) + 1} fields, got {len(cells)}")
        batch.append([cells[index[name]] for name in REQUIRED])
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_file(model_dir: str, input_path: str, output_path: str, batch_size: int = 1024,
               echo: Callable[[str], None] = print, progress_seconds: float = 10.0) -> Dict[str, float]:
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (the model tokenises in-graph)

    if batch_size < 1:
        raise ScoringInputError("--batch-size must be at least 1")
    if not os.path.exists(input_path):
        raise ScoringInputError(f"input not found: {input_path}")
    model_path = resolve_model_dir(model_dir)
    model = tf.saved_model.load(model_path)
    if RAW_SIGNATURE not in model.signatures:
        raise ScoringInputError(f"{model_path} has no {RAW_SIGNATURE!r} signature (it has "
                                f"{sorted(model.signatures)}); score with a BERM-O export")
    serve = model.signatures[RAW_SIGNATURE]
    echo(f"Scoring {input_path} with {model_path} in batches of {batch_size} ...")
    started = last = time.monotonic()
    rows = 0
    partial = output_path + ".partial"
    try:
        rows, last = _score_rows(serve, input_path, partial, batch_size, echo, progress_seconds, started)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)  # a failed run never leaves a file that looks like output
        raise
    os.replace(partial, output_path)
    seconds = time.monotonic() - started
    echo(f"Scored {rows:,} pairs in {seconds:.1f}s -> {output_path}")
    return {"rows": rows, "seconds": seconds, "model": model_path}


def _score_rows(serve, input_path, partial, batch_size, echo, progress_seconds, started):
    import numpy as np
    import tensorflow as tf

    rows, last = 0, started
    with open(input_path, encoding="utf-8", newline="") as source, \
            open(partial, "w", encoding="utf-8", newline="") as sink:
        reader = csv.reader(source)
        header = [h.strip().lstrip("\ufeff") for h in next(reader, [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ScoringInputError(f"{input_path}: column(s) {', '.join(missing)} missing; the "
                                    f"header must name {', '.join(REQUIRED)} (found {', '.join(header) or 'nothing'})")
        index = {name: header.index(name) for name in REQUIRED}
        writer = csv.writer(sink, lineterminator="\n")
        writer.writerow(("id", "score"))
        for batch in _batches(reader, index, batch_size, input_path):
            columns = list(zip(*batch))
            scores = serve(query=tf.constant(columns[1]), item_id=tf.constant(columns[2]),
                           item_title=tf.constant(columns[3]))["score"].numpy()
            writer.writerows((i, f"{float(s):.6f}") for i, s in zip(columns[0], np.asarray(scores).reshape(-1)))
            rows += len(batch)
            now = time.monotonic()
            if now - last >= progress_seconds:
                echo(f"  {rows:,} pairs scored ({rows / (now - started):,.0f} pairs/s)")
                last = now
    return rows, last
