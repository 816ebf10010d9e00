"""Row rules: one test per class of bad input, plus what a good row becomes."""
import pytest

from components.ingest import rows
from components.ingest.rows import JUDGMENTS, LOGS, RowRules, validate_row

RULES = RowRules(encoding="utf-8", relevance_min=1.0, relevance_max=3.0, max_query_chars=50,
                 max_title_chars=100, max_id_chars=20)

GOOD_LOG = {"query": "cordless drill", "item_id": "P1", "item_title": "DeWalt 20V Drill",
            "impressions": "10", "clicks": "3", "purchases": "1"}
GOOD_JUDGMENT = {"query": "cordless drill", "item_id": "P1", "relevance": "2.33"}


def rejection(kind, **changes):
    raw = {**(GOOD_LOG if kind == LOGS else GOOD_JUDGMENT), **changes}
    record, rejected = validate_row(kind, raw, RULES)
    assert record is None, f"expected a rejection, got {record}"
    return rejected


def test_good_log_row_becomes_typed_record_with_defaults():
    raw = {k: v for k, v in GOOD_LOG.items() if k != "purchases"}
    record, rejected = validate_row(LOGS, raw, RULES)
    assert rejected is None
    assert record == {"query": "cordless drill", "item_id": "P1", "item_title": "DeWalt 20V Drill",
                      "impressions": 10, "clicks": 3, "purchases": 0, "period": ""}


def test_good_judgment_row_and_whitespace_is_trimmed():
    record, rejected = validate_row(JUDGMENTS, {**GOOD_JUDGMENT, "query": "  cordless drill "}, RULES)
    assert rejected is None
    assert record == {"query": "cordless drill", "item_id": "P1", "relevance": 2.33, "item_title": ""}


def test_integral_float_counts_are_accepted():
    record, _ = validate_row(LOGS, {**GOOD_LOG, "impressions": 10.0, "clicks": "3.0"}, RULES)
    assert record["impressions"] == 10 and record["clicks"] == 3


def test_undecodable_text_names_the_column():
    r = rejection(LOGS, item_title=b"Caf\xe9 table")  # latin-1 bytes read as UTF-8
    assert (r.reason, r.column) == (rows.UNDECODABLE_TEXT, "item_title")


def test_undecodable_bytes_are_fine_in_the_declared_encoding():
    record, rejected = validate_row(LOGS, {**GOOD_LOG, "item_title": b"Caf\xe9 table"},
                                    RowRules(encoding="latin-1"))
    assert rejected is None and record["item_title"] == "Café table"


@pytest.mark.parametrize("column", ["query", "item_id", "item_title", "impressions", "clicks"])
def test_missing_required_field(column):
    raw = dict(GOOD_LOG)
    del raw[column]
    record, r = validate_row(LOGS, raw, RULES)
    assert record is None and (r.reason, r.column) == (rows.MISSING_FIELD, column)


def test_missing_relevance_and_empty_count_cell():
    assert rejection(JUDGMENTS, relevance=None).reason == rows.MISSING_FIELD
    assert (rejection(LOGS, clicks="").reason, rejection(LOGS, clicks="").column) == (rows.MISSING_FIELD, "clicks")


@pytest.mark.parametrize("value", ["n/a", "1.5", "nan", "inf", True])
def test_non_numeric_count(value):
    assert rejection(LOGS, impressions=value).reason == rows.NON_NUMERIC_COUNT


@pytest.mark.parametrize("value", ["9223372036854775808", "99999999999999999999", 2 ** 64, "1e30"])
def test_a_count_beyond_64_bits_is_quarantined_rather_than_crashing_the_example_writer(value):
    r = rejection(LOGS, impressions=value)
    assert (r.reason, r.column) == (rows.NON_NUMERIC_COUNT, "impressions")
    assert "more than a count can hold" in r.detail


def test_the_largest_64_bit_count_is_read_exactly():
    # Read through a float it rounded up to 2**63 and failed in tf.Example's int64_list.
    record, _ = validate_row(LOGS, {**GOOD_LOG, "impressions": "9223372036854775807"}, RULES)
    assert record["impressions"] == 2 ** 63 - 1


def test_negative_count():
    r = rejection(LOGS, clicks="-1")
    assert (r.reason, r.column) == (rows.NEGATIVE_COUNT, "clicks")


def test_clicks_greater_than_impressions():
    r = rejection(LOGS, impressions="2", clicks="3")
    assert r.reason == rows.CLICKS_EXCEED_IMPRESSIONS and "3 clicks > 2 impressions" in r.detail


def test_purchases_greater_than_clicks():
    assert rejection(LOGS, clicks="1", purchases="2").reason == rows.PURCHASES_EXCEED_CLICKS


@pytest.mark.parametrize("value", ["0.5", "3.01", "-1", 7])
def test_relevance_out_of_declared_range(value):
    r = rejection(JUDGMENTS, relevance=value)
    assert r.reason == rows.RELEVANCE_OUT_OF_RANGE and "[1, 3]" in r.detail


@pytest.mark.parametrize("value", ["good", "nan", ""])
def test_non_numeric_relevance(value):
    expected = rows.MISSING_FIELD if value == "" else rows.NON_NUMERIC_RELEVANCE
    assert rejection(JUDGMENTS, relevance=value).reason == expected


def test_relevance_bounds_are_inclusive():
    for value in ("1", "3"):
        record, rejected = validate_row(JUDGMENTS, {**GOOD_JUDGMENT, "relevance": value}, RULES)
        assert rejected is None


@pytest.mark.parametrize("column", ["query", "item_title", "item_id"])
def test_empty_text(column):
    r = rejection(LOGS, **{column: "   "})
    assert (r.reason, r.column) == (rows.EMPTY_TEXT, column)


@pytest.mark.parametrize("column,length", [("query", 51), ("item_title", 101), ("item_id", 21)])
def test_absurdly_long_text(column, length):
    r = rejection(LOGS, **{column: "x" * length})
    assert (r.reason, r.column) == (rows.TEXT_TOO_LONG, column)


def test_first_fault_in_column_order_wins():
    r = rejection(LOGS, query="", clicks="-5")
    assert r.column == "query"


def test_unknown_columns_are_carried_not_dropped():
    record, _ = validate_row(LOGS, {**GOOD_LOG, "device": "mobile", "_source": "f.csv"}, RULES)
    assert record["device"] == "mobile" and "_source" not in record


def test_duplicate_key_ignores_non_key_columns():
    a, _ = validate_row(LOGS, GOOD_LOG, RULES)
    b, _ = validate_row(LOGS, {**GOOD_LOG, "clicks": "1"}, RULES)
    c, _ = validate_row(LOGS, {**GOOD_LOG, "period": "2024-01"}, RULES)
    assert rows.row_key(LOGS, a) == rows.row_key(LOGS, b)
    assert rows.row_key(LOGS, a) != rows.row_key(LOGS, c)


def test_rules_round_trip_through_json():
    assert RowRules.from_json(RULES.to_json()) == RULES


def test_zero_width_characters_are_trimmed_and_a_query_of_only_them_is_empty():
    assert rejection(LOGS, query="\u200b \u200b").reason == rows.EMPTY_TEXT
    record, _ = validate_row(LOGS, {**GOOD_LOG, "query": "\ufeff cordless drill\u200b"}, RULES)
    assert record["query"] == "cordless drill"
