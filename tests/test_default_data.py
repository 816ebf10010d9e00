"""Behaviour of the embedded default shop generator (pipeline/default_data.py)."""
from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # also when run as plain `pytest` rather than `python -m pytest`
    sys.path.insert(0, str(REPO))

from pipeline import default_data as dd  # noqa: E402

SMALL = dd.ShopSpec(num_items=400, num_queries=120, results_per_query=12)
RATER_MEANS = {1.0, 1.33, 1.67, 2.0, 2.33, 2.67, 3.0}


# ------------------------------------------------------------------------------------------ helpers


def _read(path: str) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def _as_int(cell: str):
    return int(cell) if re.fullmatch(r"-?\d+", cell) else None


def _as_float(cell: str):
    try:
        return float(cell)
    except ValueError:
        return None


def _tokens(text: str) -> set[str]:
    # Same normalisation a search engine would apply: lower case, numbers split from units, 2.0 == 2.
    out = set()
    for t in re.findall(r"\d+(?:\.\d+)?|[a-z]+", text.lower()):
        out.add(t.rstrip("0").rstrip(".") if "." in t else t)
    return out


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.csv"))}


def _log_problems(rows: list[list[str]]) -> collections.Counter:
    """Counts each kind of broken row in logs.csv rows (header excluded)."""
    kinds = collections.Counter()
    seen = set()
    for query, item_id, title, *counts in rows:
        key = (query, item_id)
        if key in seen:
            kinds["duplicate_pair"] += 1
        seen.add(key)
        if not query.strip():
            kinds["empty_query"] += 1
        if not item_id.strip():
            kinds["missing_item_id"] += 1
        values = [_as_int(c) for c in counts]
        if any(v is None for v in values):
            kinds["non_numeric_count"] += 1
            continue
        impressions, clicks, purchases = values
        if impressions < 0:
            kinds["negative_impressions"] += 1
        elif clicks > impressions:
            kinds["clicks_gt_impressions"] += 1
        if purchases > clicks or clicks < 0 or purchases < 0:
            kinds["other"] += 1
    return kinds


def _judgment_problems(rows: list[list[str]]) -> collections.Counter:
    kinds = collections.Counter()
    seen = set()
    for query, item_id, relevance in rows:
        if (query, item_id) in seen:
            kinds["duplicate_key"] += 1
        seen.add((query, item_id))
        value = _as_float(relevance)
        if value is None:
            kinds["non_numeric_relevance"] += 1
        elif not 1.0 <= value <= 3.0:
            kinds["relevance_out_of_range"] += 1
        if not query.strip() or not item_id.strip():
            kinds["other"] += 1
    return kinds


@pytest.fixture(scope="module")
def default_files(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("default")
    started = time.perf_counter()
    paths = dd.write(str(out), write_truth=True)
    paths["seconds"] = time.perf_counter() - started
    return paths


@pytest.fixture(scope="module")
def default_data() -> dd.ShopData:
    return dd.generate_tables()


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_byte_identical_files(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    dd.write(str(first), SMALL, write_truth=True)
    dd.write(str(second), SMALL, write_truth=True)
    assert set(_digest(first)) == {"logs.csv", "judgments.csv", "truth.csv"}
    assert _digest(first) == _digest(second)


def test_output_does_not_depend_on_string_hash_salt(tmp_path):
    script = ("import sys; from pipeline import default_data as dd; "
              "dd.write(sys.argv[1], dd.ShopSpec(num_items=400, num_queries=120, results_per_query=12), True)")
    digests = []
    for salt in ("1", "2"):
        out = tmp_path / salt
        env = dict(os.environ, PYTHONHASHSEED=salt, PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, cwd=REPO, env=env)
        digests.append(_digest(out))
    assert digests[0] == digests[1]


def test_different_seed_gives_different_data(tmp_path):
    dd.write(str(tmp_path / "a"), SMALL)
    dd.write(str(tmp_path / "b"), dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a["logs.csv"] != b["logs.csv"]
    assert a["judgments.csv"] != b["judgments.csv"]


def test_write_returns_paths_and_truth_is_optional(tmp_path):
    paths = dd.write(str(tmp_path / "x"), SMALL)
    assert set(paths) == {"logs", "judgments"}
    assert all(os.path.isfile(p) for p in paths.values())
    assert not (tmp_path / "x" / "truth.csv").exists()


# ------------------------------------------------------------------------------------ format


def test_files_have_the_specified_columns_and_line_endings(default_files):
    expected = {"logs": list(dd.LOG_COLUMNS), "judgments": list(dd.JUDGMENT_COLUMNS),
                "truth": list(dd.TRUTH_COLUMNS)}
    assert expected["logs"] == ["query", "item_id", "item_title", "impressions", "clicks", "purchases"]
    assert expected["judgments"] == ["query", "item_id", "relevance"]
    assert expected["truth"] == ["query", "item_id", "true_relevance", "intent"]
    for name, columns in expected.items():
        raw = Path(default_files[name]).read_bytes()
        assert b"\r" not in raw and raw.endswith(b"\n")
        rows = _read(default_files[name])
        assert rows[0] == columns
        assert all(len(row) == len(columns) for row in rows[1:])
        # One physical line per record: no field spans lines.
        assert raw.count(b"\n") == len(rows)


def test_clean_log_rows_are_consistent(default_files, default_data):
    rows = _read(default_files["logs"])[1:]
    faulty = {f["index"] for f in default_data.faults if f["table"] == "logs"}
    clean = [row for i, row in enumerate(rows) if i not in faulty]
    assert len(clean) == len(rows) - len(faulty) > 0
    for query, item_id, title, *counts in clean:
        assert query.strip() and title.strip()
        assert re.fullmatch(r"P\d{6}", item_id)
        impressions, clicks, purchases = (int(c) for c in counts)  # plain integers
        assert 1 <= impressions and 0 <= clicks <= impressions and 0 <= purchases <= clicks
    assert len({(r[0], r[1]) for r in clean}) == len(clean)


def test_clean_judgments_are_rater_means_on_the_1_to_3_scale(default_files, default_data):
    rows = _read(default_files["judgments"])[1:]
    faulty = {f["index"] for f in default_data.faults if f["table"] == "judgments"}
    clean = [row for i, row in enumerate(rows) if i not in faulty]
    values = [float(r[2]) for r in clean]
    assert all(1.0 <= v <= 3.0 for v in values)
    assert set(values) <= RATER_MEANS
    assert len(set(values)) >= 5  # the raters disagree sometimes
    assert len({(r[0], r[1]) for r in clean}) == len(clean)


def test_truth_covers_exactly_the_logged_pairs(default_files, default_data):
    truth = _read(default_files["truth"])[1:]
    assert {int(r[2]) for r in truth} <= {0, 1, 2, 3}
    assert len({int(r[2]) for r in truth}) == 4
    faulty = {f["index"] for f in default_data.faults if f["table"] == "logs"}
    logged = [(r[0], r[1]) for i, r in enumerate(_read(default_files["logs"])[1:]) if i not in faulty]
    assert [(r[0], r[1]) for r in truth] == logged
    # One hidden intent per query string.
    intents = collections.defaultdict(set)
    for query, _, _, intent in truth:
        intents[query].add(intent)
    assert all(len(v) == 1 for v in intents.values())


def test_judgments_follow_true_relevance(default_data):
    truth = {(r["query"], r["item_id"]): r["true_relevance"] for r in default_data.truth}
    by_grade = collections.defaultdict(list)
    for row in default_data.judgments:
        key = (row["query"], row["item_id"])
        if key in truth and isinstance(row["relevance"], float):
            by_grade[truth[key]].append(row["relevance"])
    means = [sum(by_grade[g]) / len(by_grade[g]) for g in range(4)]
    assert means == sorted(means) and means[3] - means[0] > 1.0


def test_catalogue_has_look_alike_brands_and_units(default_data):
    items = default_data.catalogue
    assert len({i["item_id"] for i in items}) == len(items)
    assert len({i["title"] for i in items}) == len(items)
    categories = collections.Counter(i["category"] for i in items)
    assert 10 <= len(categories) <= 15
    brand_categories = collections.defaultdict(set)
    for item in items:
        brand_categories[item["brand"].lower()].add(item["category"])
    assert sum(len(c) > 1 for c in brand_categories.values()) >= 3  # e.g. MAC, Delta, Samsung
    all_tokens = set().union(*(_tokens(i["title"]) for i in items))
    assert {"ghz", "gb", "ml", "oz", "w", "v", "in", "ft", "mm"} <= all_tokens


# ------------------------------------------------------------------------------------ faults


def test_every_fault_kind_is_present_and_rare(default_files, default_data):
    logs = _read(default_files["logs"])[1:]
    judgments = _read(default_files["judgments"])[1:]
    log_kinds = _log_problems(logs)
    judgment_kinds = _judgment_problems(judgments)
    for kind in dd.LOG_FAULT_KINDS:
        assert log_kinds[kind] >= 1, kind
    for kind in dd.JUDGMENT_FAULT_KINDS:
        assert judgment_kinds[kind] >= 1, kind
    assert log_kinds["other"] == 0 and judgment_kinds["other"] == 0
    declared = collections.Counter(f["table"] for f in default_data.faults)
    assert declared["logs"] < 0.01 * len(logs) and declared["judgments"] < 0.01 * len(judgments)
    # The broken rows are spread through the file, not appended at its end.
    positions = [f["index"] for f in default_data.faults if f["table"] == "logs"]
    assert min(positions) < len(logs) - len(positions)


def test_no_faults_when_disabled(tmp_path):
    paths = dd.write(str(tmp_path), dataclasses.replace(SMALL, fault_rate=0.0))
    assert sum(_log_problems(_read(paths["logs"])[1:]).values()) == 0
    assert sum(_judgment_problems(_read(paths["judgments"])[1:]).values()) == 0
    assert dd.generate_tables(dataclasses.replace(SMALL, fault_rate=0.0)).faults == []


def test_small_fault_rate_still_has_one_of_each_kind():
    data = dd.generate_tables(dataclasses.replace(SMALL, fault_rate=1e-6))
    kinds = collections.Counter((f["table"], f["kind"]) for f in data.faults)
    assert {k for _, k in kinds} == set(dd.LOG_FAULT_KINDS) | set(dd.JUDGMENT_FAULT_KINDS)


# ------------------------------------------------------------------------------------ behaviour


def _ambiguous_queries(data: dd.ShopData) -> dict[str, set]:
    """Queries whose every word is in the titles of items from two or more categories."""
    title_tokens = [(_tokens(i["title"]), i["category"]) for i in data.catalogue]
    out = {}
    for query in dict.fromkeys(r["query"] for r in data.truth):
        words = _tokens(query)
        categories = {cat for tokens, cat in title_tokens if words and words <= tokens}
        if len(categories) >= 2:
            out[query] = categories
    return out


def test_ambiguous_queries_exist_and_clicks_follow_the_hidden_intent(default_data):
    ambiguous = _ambiguous_queries(default_data)
    queries = {r["query"] for r in default_data.truth}
    assert 0.12 <= len(ambiguous) / len(queries) <= 0.35
    intent = {r["query"]: r["intent"] for r in default_data.truth}
    intent_category = {q: i.split("|")[0] for q, i in intent.items()}
    # The text fits the hidden intent's category, and another one, about equally.
    assert all(intent_category[q] in cats for q, cats in ambiguous.items())
    assert len({intent_category[q] for q in ambiguous}) >= 4

    item = {i["item_id"]: i for i in default_data.catalogue}
    truth = {(r["query"], r["item_id"]): r["true_relevance"] for r in default_data.truth}
    clicks = collections.Counter()
    impressions = collections.Counter()
    for row in default_data.logs:
        key = (row["query"], row["item_id"])
        if row["query"] not in ambiguous or key not in truth:
            continue
        words = _tokens(row["query"])
        product = item[row["item_id"]]
        if truth[key] == 3:
            group = "relevant"
        elif product["category"] != intent_category[row["query"]] and words <= _tokens(product["title"]):
            group = "look-alike"  # matches the query text as well as a relevant item does
        else:
            continue
        clicks[group] += row["clicks"]
        impressions[group] += row["impressions"]
    assert impressions["relevant"] > 500 and impressions["look-alike"] > 500
    ctr = {g: clicks[g] / impressions[g] for g in ("relevant", "look-alike")}
    assert ctr["relevant"] > 3 * ctr["look-alike"]


def test_ambiguous_queries_have_explicit_siblings_that_click_the_same_items(default_data):
    ambiguous = _ambiguous_queries(default_data)
    intent = {r["query"]: r["intent"] for r in default_data.truth}
    by_intent = collections.defaultdict(list)
    for query, label in intent.items():
        by_intent[label].append(query)
    clicked = collections.defaultdict(set)
    for row in default_data.logs:
        if isinstance(row["clicks"], int) and row["clicks"] > 0:
            clicked[row["query"]].add(row["item_id"])
    with_sibling = shares_click = 0
    for query in ambiguous:
        siblings = [s for s in by_intent[intent[query]] if s != query and s not in ambiguous]
        with_sibling += bool(siblings)
        shares_click += any(clicked[query] & clicked[s] for s in siblings)
    assert with_sibling >= 0.9 * len(ambiguous)
    assert shares_click >= 0.5 * len(ambiguous)


def test_query_frequency_is_skewed(default_data):
    per_query = collections.Counter()
    for row in default_data.logs:
        if isinstance(row["impressions"], int) and row["impressions"] > 0:
            per_query[row["query"]] += row["impressions"]
    volumes = sorted(per_query.values(), reverse=True)
    head = volumes[: max(1, len(volumes) // 10)]
    assert sum(head) > 0.3 * sum(volumes)
    per_pair = [v / dd.ShopSpec().results_per_query for v in volumes]
    assert per_pair[0] >= 300 and per_pair[-1] <= 3  # head in the hundreds+, tail a few


def test_clicks_show_position_bias(default_data):
    # Within relevant results, the top slot draws a higher click rate than the bottom one.
    truth = {(r["query"], r["item_id"]): r["true_relevance"] for r in default_data.truth}
    k = dd.ShopSpec().results_per_query
    rank = {}
    for i, row in enumerate(default_data.truth):
        rank[(row["query"], row["item_id"])] = i % k
    top = collections.Counter()
    bottom = collections.Counter()
    for row in default_data.logs:
        key = (row["query"], row["item_id"])
        if key in rank and truth[key] == 3 and isinstance(row["clicks"], int):
            bucket = top if rank[key] < 3 else bottom if rank[key] >= k - 5 else None
            if bucket is not None:
                bucket["clicks"] += row["clicks"]
                bucket["impressions"] += row["impressions"]
    assert top["clicks"] / top["impressions"] > 1.5 * bottom["clicks"] / bottom["impressions"]


def test_default_size_and_speed(default_files, default_data):
    assert default_files["seconds"] < 5.0
    assert 6000 <= len(default_data.logs) <= 10000
    assert 1500 <= len(default_data.judgments) <= 3000
    assert len({r["query"] for r in default_data.truth}) == dd.ShopSpec().num_queries


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError):
        dd.generate_tables(dd.ShopSpec(judged_query_fraction=1.5))
    with pytest.raises(ValueError):
        dd.generate_tables(dd.ShopSpec(num_items=10))
