"""Adapter from the Home Depot relevance CSV to the pipeline's canonical logs and judgments.

The dataset has no clicks: each (search_term, product) pair is one logged impression, and its
averaged human rating (1..3) is a judgment. The adapter streams row by row and never drops a
row: a broken one is written through as it is, so the ExampleGen quarantines it with a reason.
"""
from __future__ import annotations

import csv
import io
import os
import zipfile
from contextlib import contextmanager
from typing import Dict, Iterator, TextIO

from components.ingest.readers import InputError

# The published file is latin-1; reading it as UTF-8 fails on some titles.
ENCODING = "latin-1"
REQUIRED = ("product_uid", "product_title", "search_term", "relevance")
RELEVANCE_MIN, RELEVANCE_MAX = 1.0, 3.0

LOG_HEADER = ("query", "item_id", "item_title", "impressions", "clicks", "purchases")
JUDGMENT_HEADER = ("query", "item_id", "relevance", "item_title")


@contextmanager
def _open_text(path: str, encoding: str) -> Iterator[TextIO]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.lower().endswith(".csv")]
            if len(members) != 1:
                raise InputError(f"{path}: expected exactly one .csv inside the zip, found {members or 'none'}")
            with archive.open(members[0]) as raw:
                yield io.TextIOWrapper(raw, encoding=encoding, newline="")
    else:
        with open(path, encoding=encoding, newline="") as f:
            yield f


def _clean(cell: str) -> str:
    # Canonical CSV inputs are read line by line, so a field must not span lines.
    return " ".join(cell.splitlines()) if ("\n" in cell or "\r" in cell) else cell


def convert(input_path: str, output_dir: str, encoding: str = ENCODING) -> Dict[str, object]:
    """Writes `logs.csv` and `judgments.csv` (UTF-8) into output_dir; returns their paths and row count."""
    if not os.path.exists(input_path):
        raise InputError(f"Home Depot input not found: {input_path}")
    os.makedirs(output_dir, exist_ok=True)
    logs_path = os.path.join(output_dir, "logs.csv")
    judgments_path = os.path.join(output_dir, "judgments.csv")
    count = 0
    with _open_text(input_path, encoding) as source, \
            open(logs_path, "w", encoding="utf-8", newline="") as logs_file, \
            open(judgments_path, "w", encoding="utf-8", newline="") as judgments_file:
        reader = csv.reader(source)
        header = [h.strip().lstrip("\ufeff") for h in next(reader, [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise InputError(
                f"{input_path} is not the Home Depot relevance CSV: column(s) {', '.join(missing)} "
                f"missing (found {', '.join(header) or 'nothing'}); expected "
                "id, product_uid, product_title, search_term, relevance")
        index = {name: header.index(name) for name in REQUIRED}
        logs = csv.writer(logs_file, lineterminator="\n")
        judgments = csv.writer(judgments_file, lineterminator="\n")
        logs.writerow(LOG_HEADER)
        judgments.writerow(JUDGMENT_HEADER)
        for cells in reader:
            get = lambda name: _clean(cells[index[name]]) if index[name] < len(cells) else ""  # noqa: E731
            query, item_id, title = get("search_term"), get("product_uid"), get("product_title")
            logs.writerow((query, item_id, title, 1, 0, 0))
            judgments.writerow((query, item_id, get("relevance"), title))
            count += 1
    return {"logs": logs_path, "judgments": judgments_path, "rows": count}
