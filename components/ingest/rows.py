"""Row-level validation of search logs and human judgments.

A row either becomes a canonical record (typed values for every column of its kind) or is
rejected with exactly one reason: the first fault found, in column order. The reasons are
a closed vocabulary so quarantine counts can be compared across runs and gated on.

Kept free of Beam and TensorFlow so the rules are unit-testable and identical on every
runner.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

LOGS = "logs"
JUDGMENTS = "judgments"
KINDS = (LOGS, JUDGMENTS)

# The closed vocabulary of quarantine reasons.
MALFORMED_ROW = "malformed_row"
UNDECODABLE_TEXT = "undecodable_text"
MISSING_FIELD = "missing_field"
EMPTY_TEXT = "empty_text"
TEXT_TOO_LONG = "text_too_long"
NON_NUMERIC_COUNT = "non_numeric_count"
NEGATIVE_COUNT = "negative_count"
MAX_COUNT = 2 ** 63 - 1  # tf.Example's int64_list
CLICKS_EXCEED_IMPRESSIONS = "clicks_exceed_impressions"
PURCHASES_EXCEED_CLICKS = "purchases_exceed_clicks"
NON_NUMERIC_RELEVANCE = "non_numeric_relevance"
RELEVANCE_OUT_OF_RANGE = "relevance_out_of_range"
DUPLICATE_KEY = "duplicate_key"
REASONS = (
    MALFORMED_ROW, UNDECODABLE_TEXT, MISSING_FIELD, EMPTY_TEXT, TEXT_TOO_LONG,
    NON_NUMERIC_COUNT, NEGATIVE_COUNT, CLICKS_EXCEED_IMPRESSIONS, PURCHASES_EXCEED_CLICKS,
    NON_NUMERIC_RELEVANCE, RELEVANCE_OUT_OF_RANGE, DUPLICATE_KEY,
)


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "text" | "id" | "count" | "relevance"
    required: bool = True
    default: Any = None


# Optional columns are always emitted (with their default) so every example of a kind has
# the same features and the curated schema can require them.
COLUMNS: Dict[str, Tuple[Column, ...]] = {
    LOGS: (
        Column("query", "text"),
        Column("item_id", "id"),
        Column("item_title", "text"),
        Column("impressions", "count"),
        Column("clicks", "count"),
        Column("purchases", "count", required=False, default=0),
        Column("period", "id", required=False, default=""),
    ),
    JUDGMENTS: (
        Column("query", "text"),
        Column("item_id", "id"),
        Column("relevance", "relevance"),
        Column("item_title", "text", required=False, default=""),
    ),
}

# Rows sharing these values are duplicates; one is kept, the others quarantined.
KEY_COLUMNS = {LOGS: ("query", "item_id", "period"), JUDGMENTS: ("query", "item_id")}


@dataclasses.dataclass(frozen=True)
class RowRules:
    """The parts of the pipeline config that row validation needs (kept small and picklable)."""

    encoding: str = "utf-8"
    relevance_min: float = 1.0
    relevance_max: float = 3.0
    max_query_chars: int = 256
    max_title_chars: int = 1024
    max_id_chars: int = 128

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RowRules":
        return cls(**json.loads(text))

    @classmethod
    def from_data_config(cls, data) -> "RowRules":
        return cls(
            encoding=data.encoding,
            relevance_min=data.relevance_min,
            relevance_max=data.relevance_max,
            max_query_chars=data.max_query_chars,
            max_title_chars=data.max_title_chars,
            max_id_chars=data.max_id_chars,
        )


@dataclasses.dataclass(frozen=True)
class Rejection:
    reason: str
    column: str
    detail: str


class RowError(Exception):
    def __init__(self, reason: str, column: str, detail: str):
        super().__init__(f"{reason} in {column}: {detail}")
        self.rejection = Rejection(reason, column, detail)


def required_columns(kind: str) -> List[str]:
    return [c.name for c in COLUMNS[kind] if c.required]


def known_columns(kind: str) -> List[str]:
    return [c.name for c in COLUMNS[kind]]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_text(value: Any, column: str, rules: RowRules) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode(rules.encoding)
        except UnicodeDecodeError as e:
            raise RowError(UNDECODABLE_TEXT, column, f"not valid {rules.encoding}: {e.reason}") from e
    return str(value)


def _max_chars(column: Column, rules: RowRules) -> int:
    if column.kind == "id":
        return rules.max_id_chars
    return rules.max_query_chars if column.name == "query" else rules.max_title_chars


# Zero-width characters are not whitespace to str.strip(), but a query of only them is as empty.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"


def _trimmed(text: str) -> str:
    text = text.strip()  # every row's every text: one strip where no zero-width character ends it
    while text and (text[0] in _INVISIBLE or text[-1] in _INVISIBLE):
        text = text.strip(_INVISIBLE).strip()
    return text


def _parse_text(value: Any, column: Column, rules: RowRules) -> str:
    text = _trimmed(_as_text(value, column.name, rules))
    if not text:
        raise RowError(EMPTY_TEXT, column.name, "empty or whitespace only")
    limit = _max_chars(column, rules)
    if len(text) > limit:
        raise RowError(TEXT_TOO_LONG, column.name, f"{len(text)} characters, limit {limit}")
    return text


def _parse_count(value: Any, column: Column, rules: RowRules) -> int:
    if isinstance(value, bool):
        raise RowError(NON_NUMERIC_COUNT, column.name, repr(value))
    if isinstance(value, int):
        number = value
    else:
        text = _as_text(value, column.name, rules).strip()
        try:
            number = int(text)  # exactly: through a float, 2**63 - 1 would round past the limit
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise RowError(NON_NUMERIC_COUNT, column.name, f"{text[:40]!r} is not a number") from None
    if isinstance(number, float):
        if math.isnan(number) or math.isinf(number) or number != int(number):
            raise RowError(NON_NUMERIC_COUNT, column.name, f"{value!r} is not a whole number")
        number = int(number)
    if number < 0:
        raise RowError(NEGATIVE_COUNT, column.name, f"{number} < 0")
    if number > MAX_COUNT:
        raise RowError(NON_NUMERIC_COUNT, column.name, f"{number} is more than a count can hold "
                       f"(a 64-bit integer, at most {MAX_COUNT})")
    return number


def _parse_relevance(value: Any, column: Column, rules: RowRules) -> float:
    if isinstance(value, bool):
        raise RowError(NON_NUMERIC_RELEVANCE, column.name, repr(value))
    text = value if isinstance(value, (int, float)) else _as_text(value, column.name, rules).strip()
    try:
        number = float(text)
    except ValueError:
        raise RowError(NON_NUMERIC_RELEVANCE, column.name, f"{str(text)[:40]!r} is not a number") from None
    if math.isnan(number) or math.isinf(number):
        raise RowError(NON_NUMERIC_RELEVANCE, column.name, f"{number}")
    if not rules.relevance_min <= number <= rules.relevance_max:
        raise RowError(
            RELEVANCE_OUT_OF_RANGE,
            column.name,
            f"{number:g} outside the declared scale [{rules.relevance_min:g}, {rules.relevance_max:g}]",
        )
    return number


_PARSERS = {"text": _parse_text, "id": _parse_text, "count": _parse_count, "relevance": _parse_relevance}


def validate_row(kind: str, raw: Mapping[str, Any], rules: RowRules) -> Tuple[Optional[Dict[str, Any]], Optional[Rejection]]:
    """Returns (record, None) for a valid row, (None, rejection) otherwise.

    `raw` maps column names to bytes, str, numbers or None (absent). Columns not known for
    `kind` are carried through as text so that schema drift (a new column) reaches the
    ExampleValidator instead of being dropped here.
    """
    record: Dict[str, Any] = {}
    try:
        for column in COLUMNS[kind]:
            value = raw.get(column.name)
            if isinstance(value, (str, bytes)):
                value = _as_text(value, column.name, rules)
                blank = not _trimmed(value)
            else:
                blank = _is_missing(value)
            if blank:
                if not column.required:
                    record[column.name] = column.default
                elif _is_missing(value) or column.kind in ("count", "relevance"):
                    raise RowError(MISSING_FIELD, column.name, "no value")
                else:
                    raise RowError(EMPTY_TEXT, column.name, "empty or whitespace only")
                continue
            record[column.name] = _PARSERS[column.kind](value, column, rules)
        if kind == LOGS:
            if record["clicks"] > record["impressions"]:
                raise RowError(
                    CLICKS_EXCEED_IMPRESSIONS, "clicks",
                    f"{record['clicks']} clicks > {record['impressions']} impressions",
                )
            if record["purchases"] > record["clicks"]:
                raise RowError(
                    PURCHASES_EXCEED_CLICKS, "purchases",
                    f"{record['purchases']} purchases > {record['clicks']} clicks",
                )
        known = set(known_columns(kind))
        for name in sorted(raw):
            if name not in known and not name.startswith("_"):
                value = raw[name]
                record[name] = "" if _is_missing(value) else _as_text(value, name, rules)
    except RowError as e:
        return None, e.rejection
    return record, None


def row_key(kind: str, record: Mapping[str, Any]) -> str:
    # JSON keeps the key unambiguous even when values contain separators.
    return json.dumps([record[c] for c in KEY_COLUMNS[kind]], ensure_ascii=False)


def canonical_json(record: Mapping[str, Any]) -> str:
    """A stable text form, used to pick which duplicate survives the same way on every runner."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False)
