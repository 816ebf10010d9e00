"""Beam sources that turn CSV, Parquet or TFRecord files into raw row dicts.

Readers never judge a row: they only split it into columns, keeping undecodable bytes as
bytes so that row validation can name the column that is broken. Each raw row carries
`_source` (the file or pattern) and `_raw` (a printable form of the original row) for the
quarantine file.
"""
from __future__ import annotations

import bz2
import csv
import json
import os
import zlib
from typing import Any, Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

CSV, PARQUET, TFRECORD = "csv", "parquet", "tfrecord"


class InputError(ValueError):
    """An input cannot be read at all (as opposed to single bad rows, which are quarantined)."""


def detect_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = os.path.basename(path).lower()
    for suffix in (".gz", ".bz2", ".deflate", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".csv", ".tsv", ".txt")):
        return CSV
    if name.endswith((".parquet", ".pq")):
        return PARQUET
    if name.endswith((".tfrecord", ".tfrecords", ".tfr")):
        return TFRECORD
    raise InputError(
        f"cannot tell the format of {path}: name it .csv, .parquet or .tfrecord[.gz], "
        "or set data.format in the config"
    )


def files_format(files: List[str], declared: str = "auto") -> str:
    """The one format of an input's files (a folder of CSV and Parquet files is refused: each
    format has its own reader, and one would read the others' bytes as rows)."""
    formats = {path: detect_format(path, declared) for path in files}
    if len(set(formats.values())) > 1:
        shown = ", ".join(f"{os.path.basename(p)}: {f}" for p, f in list(formats.items())[:6])
        raise InputError(f"the input's files are of different formats ({shown}); give one format "
                         "per input (a folder or glob of CSV files, or of Parquet, or of TFRecord)")
    return formats[files[0]]


def matched_files(pattern: str) -> List[str]:
    try:
        result = FileSystems.match([pattern])[0]
    except Exception as e:  # Beam raises BeamIOError with per-pattern causes.
        raise InputError(f"cannot list input files {pattern}: {e}") from e
    files = sorted(m.path for m in result.metadata_list)
    if not files:
        raise InputError(f"no input files match {pattern}")
    return files


def _csv_delimiter(path: str) -> str:
    return "\t" if ".tsv" in os.path.basename(path).lower() else ","


def _decode_line(line: bytes, encoding: str) -> str:
    # surrogateescape keeps undecodable bytes recoverable per cell, so the rejection can
    # say which column is broken rather than only which line.
    return line.decode(encoding, errors="surrogateescape")


def _restore_bytes(cell: str, encoding: str) -> Any:
    if any("\udc80" <= ch <= "\udcff" for ch in cell):
        return cell.encode(encoding, errors="surrogateescape")
    return cell


def read_csv_header(path: str, encoding: str) -> List[str]:
    try:
        with FileSystems.open(path) as f:  # decompressed by its name's suffix
            first = f.readline()
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"cannot read {path} as its name says ({e}): is it really compressed "
                         "that way? Name the file by what it holds") from e
    if not first.strip():
        raise InputError(f"{path} is empty or has no header row")
    binary = ("a Parquet file" if first.startswith(b"PAR1") else
              "gzip-compressed" if first.startswith(b"\x1f\x8b") else
              "binary data" if b"\x00" in first else None)
    if binary:
        raise InputError(f"{path} is not CSV text: it looks like {binary}. Name it by its format "
                         "(.csv.gz, .parquet, .tfrecord) or set data.format")
    text = _decode_line(first.rstrip(b"\r\n"), encoding).lstrip("\ufeff")
    try:
        header = next(csv.reader([text], delimiter=_csv_delimiter(path), strict=True))
    except csv.Error as e:
        raise InputError(f"{path}: the first line is no CSV header ({e}); is the file CSV text? "
                         "Name it by its format (.csv, .tsv, .parquet, .tfrecord) or set "
                         "data.format") from e
    names = [h.strip() for h in header]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"{path}: the header names {', '.join(repr(n) for n in repeated)} more "
                         "than once; each column must have its own name")
    return names


# Compressions whose end-of-stream marker tells a whole file from a cut one.
_DECOMPRESSORS = {".gz": lambda: zlib.decompressobj(wbits=47), ".bz2": lambda: bz2.BZ2Decompressor()}


def check_complete(path: str) -> str:
    """Reads a compressed file through to the end of its compressed data. Beam's text reader
    stops quietly where a cut .gz ends, which would silently drop the rest of the file."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _DECOMPRESSORS:
        return path
    from apache_beam.io.filesystem import CompressionTypes

    decompressor, fed = _DECOMPRESSORS[suffix](), False
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            # Small reads keep what one read inflates to small.
            for data in iter(lambda: f.read(1 << 16), b""):
                while data:
                    decompressor.decompress(data)
                    fed, data = True, b""
                    if decompressor.eof:  # `cat a.gz b.gz` is a file of two members
                        data = decompressor.unused_data
                        decompressor, fed = _DECOMPRESSORS[suffix](), False
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path} is not valid {suffix[1:]} data ({e}): the file is corrupt; "
                         "copy or export it again") from e
    if fed:  # a member begun and not ended
        raise InputError(f"{path} ends before its compressed data does: the file was cut short "
                         "(an interrupted copy or download?); copy or export it again")
    return path


def input_columns(pattern: str, fmt: str, encoding: str) -> Optional[List[str]]:
    """Column names declared by the input files, or None where the format has no header."""
    files = matched_files(pattern)
    fmt = files_format(files, fmt)
    if fmt == CSV:
        headers = {tuple(read_csv_header(f, encoding)) for f in files}
        if len(headers) > 1:
            raise InputError(f"the files matching {pattern} do not share one header: {sorted(headers)}")
        return list(headers.pop())
    if fmt == PARQUET:
        import pyarrow.parquet as pq

        with FileSystems.open(files[0]) as f:
            return list(pq.read_schema(f).names)
    return None


class _ParseCsvLine(beam.DoFn):
    def __init__(self, header: List[str], encoding: str, delimiter: str):
        self._header = header
        self._encoding = encoding
        self._delimiter = delimiter

    def process(self, element: Tuple[str, bytes]) -> Iterable[Dict[str, Any]]:
        filename, line = element
        text = _decode_line(line.rstrip(b"\r"), self._encoding)
        # The quarantine file shows undecodable bytes as \x escapes instead of failing to write.
        printable = line.rstrip(b"\r").decode(self._encoding, "backslashreplace")
        row: Dict[str, Any] = {"_source": filename, "_raw": printable}
        if not text.strip():
            row["_malformed"] = "blank line"
            yield row
            return
        try:
            cells = next(csv.reader([text], delimiter=self._delimiter, strict=True))
        except csv.Error as e:
            row["_malformed"] = f"unparseable CSV: {e}"
            if text.count('"') % 2:
                # Beam reads text files by line so that one file splits across workers (TFX's
                # CsvExampleGen does too); a quoted line break cuts its row in two.
                row["_malformed"] += (": a quoted field does not close on its line. A line break "
                                      "inside a field is not read (CSV is read line by line); "
                                      "remove line breaks from the text or give Parquet or "
                                      "TFRecord")
            yield row
            return
        if len(cells) > len(self._header):
            row["_malformed"] = f"{len(cells)} cells for {len(self._header)} columns"
            yield row
            return
        for name, cell in zip(self._header, cells):
            row[name] = _restore_bytes(cell, self._encoding)
        yield row  # Short rows leave trailing columns absent: reported as missing fields.


def _tfrecord_compression(path: str) -> str:
    # Gzipped TFRecords are often named plain .tfrecord; go by the bytes, not the suffix.
    from apache_beam.io.filesystem import CompressionTypes

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        magic = f.read(2)
    return "GZIP" if magic == b"\x1f\x8b" else ""


def _tfrecord_rows(path: str) -> Iterable[Dict[str, Any]]:
    """One file's records as raw rows. Beam's own TFRecord source reads a file whole too (it
    does not split them), but fails on a damaged file with the record's bytes in hex and no name."""
    import tensorflow as tf

    records = 0
    try:
        dataset = tf.data.TFRecordDataset(path, compression_type=_tfrecord_compression(path))
        for serialized in dataset.as_numpy_iterator():
            records += 1
            yield _example_to_row(serialized, path)
    except tf.errors.OpError as e:
        raise InputError(f"{path}: cannot read past record {records} ({e.message.splitlines()[0][:200]}): "
                         "the file is cut short or corrupt; copy or export it again") from None


def _example_to_row(serialized: bytes, source: str) -> Dict[str, Any]:
    import tensorflow as tf

    row: Dict[str, Any] = {"_source": source}
    try:
        example = tf.train.Example.FromString(serialized)
    except Exception as e:  # A corrupt record is a row fault, not a pipeline fault.
        row["_raw"] = repr(serialized[:200])
        row["_malformed"] = f"not a tf.train.Example: {e}"
        return row
    printable: Dict[str, Any] = {}
    for name, feature in sorted(example.features.feature.items()):
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        printable[name] = [v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v for v in values]
        if len(values) > 1:
            row["_malformed"] = f"feature {name} has {len(values)} values, expected one"
        row[name] = values[0] if values else None
    row["_raw"] = json.dumps(printable, ensure_ascii=False, sort_keys=True)
    return row


def _parquet_row(record: Dict[str, Any], source: str) -> Dict[str, Any]:
    row = dict(record)
    row["_source"] = source
    row["_raw"] = json.dumps(
        {k: (v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v) for k, v in record.items()},
        ensure_ascii=False, sort_keys=True, default=str,
    )
    return row


class ReadRawRows(beam.PTransform):
    """Reads every file matching `pattern` into raw row dicts (one per data row)."""

    def __init__(self, pattern: str, fmt: str = "auto", encoding: str = "utf-8"):
        super().__init__()
        self._pattern = pattern
        self._fmt = fmt
        self._encoding = encoding

    def expand(self, pipeline):
        files = matched_files(self._pattern)
        fmt = files_format(files, self._fmt)
        if fmt == CSV:
            # input_columns() has checked that all files share the first file's header.
            header = read_csv_header(files[0], self._encoding)
            # Beside the read, one file per worker: a cut file fails the step, not a silent row count.
            _ = (pipeline
                 | "CompressedFiles" >> beam.Create(files)
                 | "CheckComplete" >> beam.Map(check_complete))
            return (
                pipeline
                | "ReadCsv" >> beam.io.ReadFromTextWithFilename(
                    self._pattern, skip_header_lines=1, coder=beam.coders.BytesCoder())
                | "ParseCsv" >> beam.ParDo(_ParseCsvLine(header, self._encoding, _csv_delimiter(files[0])))
            )
        if fmt == PARQUET:
            source = self._pattern
            return (
                pipeline
                | "ReadParquet" >> beam.io.ReadFromParquet(self._pattern)
                | "ParquetToRow" >> beam.Map(_parquet_row, source)
            )
        return (
            pipeline
            | "TFRecordFiles" >> beam.Create(files)
            | "ReadTFRecords" >> beam.FlatMap(_tfrecord_rows)
        )
