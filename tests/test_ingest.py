"""SearchDataExampleGen's executor on real files: formats, quarantine, accounting, splits."""
import csv

import pytest

from components.ingest import rows
from components.ingest.readers import InputError
from components.ingest.rows import JUDGMENTS, LOGS, RowRules

LOG_ROWS = [
    {"query": f"query {q}", "item_id": f"P{q}{i}", "item_title": f"Item {i} for query {q}",
     "impressions": 10 + i, "clicks": i, "purchases": 0}
    for q in range(6) for i in range(3)
]


def write_csv(path, header, records, encoding="utf-8"):
    with open(path, "w", encoding=encoding, newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for r in records:
            writer.writerow([r.get(h, "") for h in header])
    return str(path)


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), str(path))
    return str(path)


def write_tfrecord(path, records):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
        for r in records:
            example = tf.train.Example()
            for name, value in r.items():
                feature = example.features.feature[name]
                if isinstance(value, int):
                    feature.int64_list.value.append(value)
                elif isinstance(value, float):
                    feature.float_list.value.append(value)
                else:
                    feature.bytes_list.value.append(value.encode("utf-8"))
            writer.write(example.SerializeToString())
    return str(path)


def accepted(by_split):
    return sorted((r["query"], r["item_id"], r["impressions"], r["clicks"]) for split in by_split.values() for r in split)


def test_csv_parquet_and_tfrecord_give_the_same_examples(tmp_path, example_gen):
    header = ["query", "item_id", "item_title", "impressions", "clicks", "purchases"]
    expected = sorted((r["query"], r["item_id"], r["impressions"], r["clicks"]) for r in LOG_ROWS)
    for path in (write_csv(tmp_path / "logs.csv", header, LOG_ROWS),
                 write_parquet(tmp_path / "logs.parquet", LOG_ROWS),
                 write_tfrecord(tmp_path / "logs.tfrecord.gz", LOG_ROWS)):
        by_split, quarantined, summary = example_gen(LOGS, path)
        assert accepted(by_split) == expected, path
        assert quarantined == [] and summary["rows_in"] == len(LOG_ROWS) == summary["accepted"]
        example = next(r for split in by_split.values() for r in split)
        assert set(example) == set(rows.known_columns(LOGS))


def test_judgments_in_every_format(tmp_path, example_gen):
    records = [{"query": f"q{i}", "item_id": f"P{i}", "relevance": 1.0 + i / 4} for i in range(9)]
    for path in (write_csv(tmp_path / "j.csv", ["query", "item_id", "relevance"], records),
                 write_parquet(tmp_path / "j.parquet", records),
                 write_tfrecord(tmp_path / "j.tfrecord", records)):
        by_split, _, summary = example_gen(JUDGMENTS, path)
        got = sorted((r["query"], round(r["relevance"], 4)) for s in by_split.values() for r in s)
        assert got == sorted((r["query"], round(r["relevance"], 4)) for r in records)
        assert summary["quarantined"] == 0


def test_every_fault_class_is_quarantined_and_counted(tmp_path, example_gen):
    good = "cordless drill,P1,DeWalt Drill,10,2"
    lines = [
        "query,item_id,item_title,impressions,clicks",
        good,
        "cordless drill,P2,Makita Drill,10,2,extra",          # malformed: too many cells
        "cordless drill,P3,Caf\udce9 Drill,10,2",             # undecodable (latin-1 byte in UTF-8 file)
        "cordless drill,P4,Bosch Drill,10",                    # missing clicks
        " ,P5,Ryobi Drill,10,2",                               # empty query
        "cordless drill,P6," + "x" * 2000 + ",10,2",           # absurdly long title
        "cordless drill,P7,Ryobi Drill,ten,2",                 # non-numeric count
        "cordless drill,P8,Ryobi Drill,-10,2",                 # negative count
        "cordless drill,P9,Ryobi Drill,1,2",                   # clicks > impressions
        good,                                                  # duplicate key
        "",                                                    # blank line
    ]
    path = tmp_path / "logs.csv"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape") + b"\n")
    by_split, quarantined, summary = example_gen(LOGS, str(path))
    assert summary["rows_in"] == len(lines) - 1
    assert summary["rows_in"] == summary["accepted"] + summary["quarantined"]
    assert summary["accepted"] == 1
    assert summary["quarantined_by_reason"] == {
        rows.MALFORMED_ROW: 2, rows.UNDECODABLE_TEXT: 1, rows.MISSING_FIELD: 1, rows.EMPTY_TEXT: 1,
        rows.TEXT_TOO_LONG: 1, rows.NON_NUMERIC_COUNT: 1, rows.NEGATIVE_COUNT: 1,
        rows.CLICKS_EXCEED_IMPRESSIONS: 1, rows.DUPLICATE_KEY: 1,
    }
    undecodable = next(q for q in quarantined if q["reason"] == rows.UNDECODABLE_TEXT)
    assert undecodable["column"] == "item_title" and "\\xe9" in undecodable["row"]
    assert all(q["source"].endswith("logs.csv") and q["detail"] for q in quarantined)


def test_a_line_break_inside_a_quoted_title_is_quarantined_with_what_to_do(tmp_path, example_gen):
    # The rows are read line by line (so that a file splits across Beam workers): the broken
    # row's two halves are both quarantined, the first saying why, and the rows around them pass.
    path = tmp_path / "logs.csv"
    path.write_text('query,item_id,item_title,impressions,clicks\r\n'
                    'drill,P1,DeWalt Drill,10,2\r\n'
                    'drill,P2,"Bosch ""Compact""\r\nDrill",10,2\r\n'
                    'drill,P3,Makita Drill,10,2\r\n', newline="")
    by_split, quarantined, summary = example_gen(LOGS, str(path))
    assert sorted(r["item_id"] for s in by_split.values() for r in s) == ["P1", "P3"]
    assert summary["rows_in"] == 4 and summary["quarantined"] == 2
    first = next(q for q in quarantined if q["row"].startswith("drill,P2"))
    assert first["reason"] == rows.MALFORMED_ROW
    assert "a quoted field does not close on its line" in first["detail"]
    assert "give Parquet or TFRecord" in first["detail"]
    # Parquet keeps the line break in the title.
    records = [{"query": "drill", "item_id": f"P{i}", "item_title": title, "impressions": 10, "clicks": 2}
               for i, title in enumerate(["DeWalt Drill", 'Bosch "Compact"\r\nDrill'])]
    by_split, _, summary = example_gen(LOGS, write_parquet(tmp_path / "logs.parquet", records))
    assert summary["quarantined"] == 0
    assert 'Bosch "Compact"\r\nDrill' in [r["item_title"] for s in by_split.values() for r in s]


def test_judgment_faults_relevance_range_and_duplicates(tmp_path, example_gen):
    lines = ["query,item_id,relevance", "drill,P1,2.5", "drill,P2,0", "drill,P3,high", "drill,P1,2.5", "drill,P4,3"]
    path = tmp_path / "j.csv"
    path.write_text("\n".join(lines) + "\n")
    _, _, summary = example_gen(JUDGMENTS, str(path))
    assert summary["quarantined_by_reason"] == {
        rows.RELEVANCE_OUT_OF_RANGE: 1, rows.NON_NUMERIC_RELEVANCE: 1, rows.DUPLICATE_KEY: 1}
    assert summary["accepted"] == 2


def test_declared_encoding_is_used(tmp_path, example_gen):
    path = write_csv(tmp_path / "logs.csv", ["query", "item_id", "item_title", "impressions", "clicks"],
                     [{"query": "café table", "item_id": "P1", "item_title": "Café Table", "impressions": 3, "clicks": 1}],
                     encoding="latin-1")
    by_split, _, summary = example_gen(LOGS, path, rules=RowRules(encoding="latin-1"))
    assert [r["item_title"] for s in by_split.values() for r in s] == ["Café Table"]
    _, quarantined, _ = example_gen(LOGS, path, rules=RowRules(encoding="utf-8"))
    assert [q["reason"] for q in quarantined] == [rows.UNDECODABLE_TEXT]


def test_tfrecord_with_absent_feature_is_a_missing_field(tmp_path, example_gen):
    records = [dict(LOG_ROWS[0]), {k: v for k, v in LOG_ROWS[1].items() if k != "item_title"}]
    _, quarantined, summary = example_gen(LOGS, write_tfrecord(tmp_path / "l.tfrecord", records))
    assert [(q["reason"], q["column"]) for q in quarantined] == [(rows.MISSING_FIELD, "item_title")]
    assert summary["accepted"] == 1


def test_duplicate_survivor_does_not_depend_on_row_order(tmp_path, example_gen):
    header = ["query", "item_id", "item_title", "impressions", "clicks"]
    a = {"query": "drill", "item_id": "P1", "item_title": "Drill A", "impressions": 5, "clicks": 1}
    b = {**a, "item_title": "Drill B", "clicks": 2}
    first, _, _ = example_gen(LOGS, write_csv(tmp_path / "ab.csv", header, [a, b]))
    second, _, _ = example_gen(LOGS, write_csv(tmp_path / "ba.csv", header, [b, a]))
    assert [r for s in first.values() for r in s] == [r for s in second.values() for r in s]


def test_missing_required_column_is_a_clear_error(tmp_path, example_gen):
    path = write_csv(tmp_path / "logs.csv", ["query", "item_id", "impressions", "clicks"],
                     [{"query": "q", "item_id": "P1", "impressions": 1, "clicks": 0}])
    with pytest.raises(InputError, match="item_title"):
        example_gen(LOGS, path)


def test_splits_are_by_query_disjoint_and_shared_by_logs_and_judgments(tmp_path, example_gen):
    queries = [f"query number {i}" for i in range(120)]
    logs = [{"query": q, "item_id": f"P{i}-{j}", "item_title": f"title {j}", "impressions": 5, "clicks": 1}
            for i, q in enumerate(queries) for j in range(3)]
    judgments = [{"query": q, "item_id": f"P{i}-0", "relevance": 2.0} for i, q in enumerate(queries)]
    log_splits, _, _ = example_gen(LOGS, write_csv(tmp_path / "logs.csv", list(logs[0]), logs), splits=(3, 1, 1))
    judgment_splits, _, _ = example_gen(JUDGMENTS, write_csv(tmp_path / "j.csv", list(judgments[0]), judgments),
                                        splits=(3, 1, 1))
    log_queries = {s: {r["query"] for r in records} for s, records in log_splits.items()}
    assert all(log_queries.values()), "every split should get some queries"
    assert not (log_queries["train"] & log_queries["eval"]) and not (log_queries["train"] & log_queries["test"])
    assert not (log_queries["eval"] & log_queries["test"])
    assert set().union(*log_queries.values()) == set(queries)
    for split, records in judgment_splits.items():
        assert {r["query"] for r in records} <= log_queries[split]


def test_a_cut_short_gzip_fails_the_step_rather_than_reading_fewer_rows(tmp_path, example_gen):
    # Beam's text reader stops quietly where a cut .gz ends: the rest of the file was lost.
    import gzip

    header = ["query", "item_id", "item_title", "impressions", "clicks"]
    records = [{**LOG_ROWS[0], "item_id": f"P{i}", "item_title": f"item {i} {'x' * (i % 50)}"}
               for i in range(3000)]
    whole = gzip.compress(open(write_csv(tmp_path / "logs.csv", header, records), "rb").read())
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / "logs.csv.gz").write_bytes(whole + whole[:0])
    by_split, _, summary = example_gen(LOGS, str(tmp_path / "whole" / "logs.csv.gz"))
    assert summary["rows_in"] == 3000
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "logs.csv.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="ends before its compressed data does: the file was cut short"):
        example_gen(LOGS, str(tmp_path / "cut" / "logs.csv.gz"))


@pytest.mark.parametrize("name,content,message", [
    ("logs.csv", "query,item_id,item_title,impressions,clicks,clicks\nq,P1,t,3,1,0\n",
     "the header names 'clicks' more than once"),
    ("logs.csv.gz", "query,item_id,item_title,impressions,clicks\nq,P1,t,3,1\n",
     "cannot read .* as its name says"),
])
def test_a_header_that_cannot_be_read_as_named_is_an_input_error(tmp_path, example_gen, name, content,
                                                                 message):
    # Before: a repeated column silently took the next column's values; a plain file named .gz
    # was zlib's traceback.
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        example_gen(LOGS, str(path))


def test_a_parquet_file_named_csv_and_a_folder_of_two_formats_are_input_errors(tmp_path, example_gen):
    write_parquet(tmp_path / "logs.csv", LOG_ROWS)
    with pytest.raises(InputError, match="is not CSV text: it looks like a Parquet file"):
        example_gen(LOGS, str(tmp_path / "logs.csv"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_csv(mixed / "a.csv", ["query", "item_id", "item_title", "impressions", "clicks"], LOG_ROWS)
    write_parquet(mixed / "b.parquet", LOG_ROWS)
    with pytest.raises(InputError, match=r"of different formats \(a.csv: csv, b.parquet: parquet\)"):
        example_gen(LOGS, str(mixed / "*"))


def test_a_tab_separated_file_named_csv_gets_the_tsv_hint(tmp_path, example_gen):
    path = tmp_path / "logs.csv"
    path.write_text("query\titem_id\titem_title\timpressions\tclicks\nq\tP1\tt\t3\t1\n")
    with pytest.raises(InputError, match=r"purchases \(optional\), period \(optional\).*"
                                         r"a tab-separated file is read as such when named .tsv"):
        example_gen(LOGS, str(path))


@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_a_damaged_tfrecord_file_is_an_input_error_naming_it(tmp_path, example_gen, damage):
    # Before: exit 1 with Beam's hex dump of the record and no file named.
    whole = (tmp_path / "whole.tfrecord")
    write_tfrecord(whole, LOG_ROWS)
    import gzip

    data = gzip.decompress(whole.read_bytes())  # plain TFRecord framing, with CRCs
    data = data[: len(data) - 20] if damage == "cut" else data[:40] + bytes([data[40] ^ 0xFF]) + data[41:]
    path = tmp_path / "logs.tfrecord"
    path.write_bytes(data)
    with pytest.raises(InputError, match=rf"{path}: cannot read past record \d+ .*cut short or corrupt"):
        example_gen(LOGS, str(path))
