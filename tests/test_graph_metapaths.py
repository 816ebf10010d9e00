"""Tests for components.graph.metapaths (DirectRunner; the whole file runs in well under a
minute on two cores: most scenarios share one pipeline, the multi-process determinism
check runs one more)."""
from __future__ import annotations

import glob
import json
import math
import os
import random
from fractions import Fraction as F
from typing import Dict, List

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from components.graph import metapaths as mp
from components.graph import (
    ComputeNeighbourContexts,
    GraphConfig,
    JoinContexts,
    edge_weight,
    joined_feature_names,
    metapath_name,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUTS = ("neighbour_tables", "graph_stats", "capped_hubs")


def row(query, item, clicks, title="t", impressions=10, purchases=0):
    return dict(query=query, item_id=item, item_title=title, impressions=impressions,
                clicks=clicks, purchases=purchases)


# The hand-made graph. Weights use the raw "clicks" scheme so transition probabilities are
# simple fractions:
#   q1: a(2, split over two periods) b(1)   q2: a(1) b(1) c(2)   q3: c(1) d(1)   q4: e(3)
HAND_ROWS = [
    row("q1", "a", 1, "Apple"), row("q1", "a", 1, "Apple"), row("q1", "b", 1, "Banana"),
    row("q2", "a", 1, "apple old"), row("q2", "b", 1, "Aardvark banana"),
    row("q2", "c", 2, "Cherry"), row("q3", "c", 1, "Cherry"), row("q3", "d", 1, "Date"),
    row("q4", "e", 3, "Elder"),
]
HAND_CONFIG = GraphConfig(max_order=3, top_n=10, hub_cap=10, weight_scheme="clicks")
TITLES = {"a": "Apple", "b": "Aardvark banana", "c": "Cherry", "d": "Date", "e": "Elder"}

# Expected neighbours, derived by hand from P(i|q) and P(q|i):
#   P(.|q1) = a 2/3, b 1/3; P(.|q2) = a 1/4, b 1/4, c 1/2; P(.|q3) = c 1/2, d 1/2; P(e|q4) = 1
#   P(.|a) = q1 2/3, q2 1/3; P(.|b) = q1 1/2, q2 1/2; P(.|c) = q2 2/3, q3 1/3; P(q3|d) = P(q4|e) = 1
HAND_EXPECTED = {
    ("query", "q-i"): {
        "q1": [("a", F(2, 3)), ("b", F(1, 3))],
        "q2": [("c", F(1, 2)), ("a", F(1, 4)), ("b", F(1, 4))],
        "q3": [("c", F(1, 2)), ("d", F(1, 2))],
        "q4": [("e", F(1))],
    },
    ("item", "i-q"): {
        "a": [("q1", F(2, 3)), ("q2", F(1, 3))],
        "b": [("q1", F(1, 2)), ("q2", F(1, 2))],
        "c": [("q2", F(2, 3)), ("q3", F(1, 3))],
        "d": [("q3", F(1))],
        "e": [("q4", F(1))],
    },
    ("query", "q-i-q"): {
        # q1->a->q2: 2/3*1/3, q1->b->q2: 1/3*1/2
        "q1": [("q2", F(2, 3) * F(1, 3) + F(1, 3) * F(1, 2))],                       # 7/18
        # q2->a->q1: 1/4*2/3, q2->b->q1: 1/4*1/2; q2->c->q3: 1/2*1/3
        "q2": [("q1", F(1, 4) * F(2, 3) + F(1, 4) * F(1, 2)), ("q3", F(1, 2) * F(1, 3))],
        "q3": [("q2", F(1, 2) * F(2, 3))],                                            # d is a dead end
    },
    ("item", "i-q-i"): {
        "a": [("b", F(2, 3) * F(1, 3) + F(1, 3) * F(1, 4)), ("c", F(1, 3) * F(1, 2))],
        "b": [("a", F(1, 2) * F(2, 3) + F(1, 2) * F(1, 4)), ("c", F(1, 2) * F(1, 2))],
        # three-way tie at 1/6, broken by id
        "c": [("a", F(2, 3) * F(1, 4)), ("b", F(2, 3) * F(1, 4)), ("d", F(1, 3) * F(1, 2))],
        "d": [("c", F(1, 2))],
    },
    ("query", "q-i-q-i"): {
        # q1->a->q2->{b,c}, q1->b->q2->{a,c} (q2->a after q1->a is backtracking, excluded)
        "q1": [("c", F(2, 9) * F(1, 2) + F(1, 6) * F(1, 2)), ("b", F(2, 9) * F(1, 4)),
               ("a", F(1, 6) * F(1, 4))],
        # q2->a->q1->b, q2->b->q1->a, q2->c->q3->d; a and d tie at 1/12
        "q2": [("a", F(1, 8) * F(2, 3)), ("d", F(1, 6) * F(1, 2)), ("b", F(1, 6) * F(1, 3))],
        "q3": [("a", F(1, 3) * F(1, 4)), ("b", F(1, 3) * F(1, 4))],
    },
    ("item", "i-q-i-q"): {
        "a": [("q2", F(2, 9) * F(1, 2)), ("q3", F(1, 6) * F(1, 3)), ("q1", F(1, 12) * F(1, 2))],
        "b": [("q2", F(1, 3) * F(1, 3)), ("q1", F(1, 8) * F(2, 3)), ("q3", F(1, 4) * F(1, 3))],
        "c": [("q1", F(1, 6) * F(2, 3) + F(1, 6) * F(1, 2))],                          # 7/36
        "d": [("q2", F(1, 2) * F(2, 3))],
    },
}

HUB_ROWS = (
    [row("hub", f"i{j}", c) for j, c in zip(range(1, 6), (5, 4, 3, 3, 2))]
    + [row(q, "pop", c) for q, c in zip(("qa", "qb", "qc", "qd"), (1, 2, 3, 4))]
    + [row("qa", "i1", 1)])
HUB_CONFIG = GraphConfig(max_order=2, hub_cap=3, weight_scheme="clicks")

# Default smoothed weights: (1 impression, 0 clicks) is light but positive; min weight 0.1
# drops it; a pair never shown nor clicked weighs 0 and is dropped even at min weight 0.
MIN_WEIGHT_ROWS = [
    row("qa", "x", 0, "X", impressions=1), row("qa", "y", 30, "Y", impressions=100),
    row("qb", "x", 10, "X", impressions=50), row("lonely", "z", 0, "Z", impressions=0),
]
MIN_WEIGHT_CONFIG = GraphConfig(max_order=2, min_edge_weight=0.1)


# A path q0-i0-q1-i1-...-q6 (13 nodes, diameter 12) plus a separate pair: one round of
# label propagation leaves most of the merging to the union-find finish.
CHAIN_ROWS = ([row(f"q{k}", f"i{k}", 1) for k in range(6)]
              + [row(f"q{k + 1}", f"i{k}", 1) for k in range(6)] + [row("x", "y", 1)])


def random_rows(seed=7, n_rows=160, n_queries=25, n_items=30) -> List[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        q = f"q{min(int(rng.paretovariate(1.2)) - 1, n_queries - 1):02d}"
        i = f"i{rng.randrange(n_items):02d}"
        impressions = rng.randint(0, 40)
        clicks = rng.randint(0, impressions // 3)
        purchases = rng.randint(0, clicks // 2) if clicks else 0
        rows.append(row(q, i, clicks, f"title {i} v{rng.randrange(2)}", impressions, purchases))
    return rows


RANDOM_CONFIG = GraphConfig(max_order=3, top_n=3, hub_cap=4, min_edge_weight=0.05, cc_rounds=2)

# Item "m" reaches b through both q1 and q2, but b is only third in each query's list, so
# its title is not shipped with the query lists (only the top_n + 1 = 2 heaviest are): the
# i-q-i table of m must still carry b's title (looked up). Weights ("clicks"):
#   q1: m 10, a 6, b 5    q2: m 10, c 6, b 5   -> from m: b 2 * 1/2 * 5/21 beats a, c 6/42
TITLE_LOOKUP_ROWS = [
    row("q1", "m", 10, "Em"), row("q1", "a", 6, "Ay"), row("q1", "b", 5, "Bee"),
    row("q2", "m", 10, "Em"), row("q2", "c", 6, "Sea"), row("q2", "b", 5, "Bee"),
]
TITLE_LOOKUP_CONFIG = GraphConfig(max_order=3, top_n=1, weight_scheme="clicks")

# Connected components with the numbers of rounds the implementation special-cases
# (rounds 1-3 ride on the graph stages, 4+ on extra exchanges; 1 and 2 are the "chain"
# and "random" scenarios).
ROUNDS_SCENARIOS = (3, 4, 5)

JOIN_EXAMPLES = [
    {"query": "q1", "item_id": "a", "label": 1},
    {"query": "q1", "item_id": "a", "label": 0},
    {"query": "q4", "item_id": "e", "label": 1},
    {"query": "unseen", "item_id": "b", "label": 0},
    {"query": "q2", "item_id": "unseen", "label": 0},
]


# --------------------------------------------------------------------------------------
# Pipeline harness: every scenario writes its outputs as sorted-key JSON lines.
# --------------------------------------------------------------------------------------
def _write(pcoll, path, label):
    return (pcoll
            | f"{label}ToJson" >> beam.Map(json.dumps, sort_keys=True)
            | f"{label}Write" >> beam.io.WriteToText(path, shard_name_template="", num_shards=1))


def _read(path) -> List[dict]:
    lines = []
    for name in sorted(glob.glob(path + "*")):
        with open(name) as f:
            lines += [json.loads(line) for line in f if line.strip()]
    return lines


def run_scenarios(tmp_dir, scenarios: Dict[str, tuple], options=(), join=None):
    """Runs each (rows, config) scenario in one pipeline; returns {name: {output: [..]}}."""
    with beam.Pipeline(options=PipelineOptions(list(options))) as p:
        tables = {}
        for name, (rows, config) in scenarios.items():
            out = (p | f"Create[{name}]" >> beam.Create(rows)
                   | f"Graph[{name}]" >> ComputeNeighbourContexts(config))
            tables[name] = out["neighbour_tables"]
            for output in OUTPUTS:
                _write(out[output], os.path.join(tmp_dir, f"{name}.{output}"), f"{name}.{output}")
        if join:
            source, examples, max_order = join
            joined = (p | "CreateExamples" >> beam.Create(examples)
                      | "Join" >> JoinContexts(tables[source], max_order=max_order))
            _write(joined, os.path.join(tmp_dir, "joined"), "joined")
    results = {name: {output: _read(os.path.join(tmp_dir, f"{name}.{output}")) for output in OUTPUTS}
               for name in scenarios}
    if join:
        results["joined"] = _read(os.path.join(tmp_dir, "joined"))
    return results


def tables_by_key(records):
    out = {}
    for r in records:
        key = (r["side"], r["metapath"], r["node_id"])
        assert key not in out, f"duplicate table row {key}"
        out[key] = r
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    example_rows = [_to_example_bytes(r) for r in HAND_ROWS]
    scenarios = {
        "hand": (HAND_ROWS, HAND_CONFIG),
        "hand_top2": (HAND_ROWS, dataclass_replace(HAND_CONFIG, top_n=2)),
        "hand_k0": (HAND_ROWS, dataclass_replace(HAND_CONFIG, max_order=0)),
        "hand_min20": (HAND_ROWS, dataclass_replace(HAND_CONFIG, table_min_impressions=20)),
        "from_examples": (example_rows, dataclass_replace(HAND_CONFIG, max_order=1)),
        "hubs": (HUB_ROWS, HUB_CONFIG),
        "min_weight": (MIN_WEIGHT_ROWS, MIN_WEIGHT_CONFIG),
        "empty": ([], GraphConfig(max_order=3)),
        "random": (random_rows(), RANDOM_CONFIG),
        "random_beam": (random_rows(), dataclass_replace(RANDOM_CONFIG, order3_beam_width=1)),
        "chain": (CHAIN_ROWS, GraphConfig(max_order=1, weight_scheme="clicks", cc_rounds=1)),
        "title_lookup": (TITLE_LOOKUP_ROWS, TITLE_LOOKUP_CONFIG),
        **{f"rounds{r}": (random_rows(), dataclass_replace(RANDOM_CONFIG, cc_rounds=r))
           for r in ROUNDS_SCENARIOS},
        "rounds_k1": (random_rows(), dataclass_replace(RANDOM_CONFIG, max_order=1, cc_rounds=3)),
    }
    return run_scenarios(str(tmp_path_factory.mktemp("graph")), scenarios,
                         options=["--direct_num_workers=1"], join=("hand", JOIN_EXAMPLES, 3))


def dataclass_replace(config, **changes):
    import dataclasses
    return dataclasses.replace(config, **changes)


def _to_example_bytes(r):
    import tensorflow as tf
    feats = {
        "query": tf.train.Feature(bytes_list=tf.train.BytesList(value=[r["query"].encode()])),
        "item_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[r["item_id"].encode()])),
        "item_title": tf.train.Feature(bytes_list=tf.train.BytesList(value=[r["item_title"].encode()])),
        "impressions": tf.train.Feature(int64_list=tf.train.Int64List(value=[r["impressions"]])),
        "clicks": tf.train.Feature(int64_list=tf.train.Int64List(value=[r["clicks"]])),
    }  # no purchases feature: must default to 0
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


# --------------------------------------------------------------------------------------
# Pure-function tests
# --------------------------------------------------------------------------------------
def test_config_validation():
    for bad in (dict(max_order=4), dict(max_order=-1), dict(top_n=0), dict(hub_cap=0),
                dict(min_edge_weight=-1.0), dict(weight_scheme="nope"), dict(prior_alpha=0.0),
                dict(cc_rounds=0), dict(order3_beam_width=-1), dict(table_min_impressions=-1),
                dict(table_min_impressions=2.5)):
        with pytest.raises(ValueError):
            GraphConfig(**bad)
    cfg = GraphConfig()
    with pytest.raises(Exception):
        cfg.top_n = 3  # frozen
    assert cfg.to_dict()["hub_cap"] == 100


def test_names():
    assert [metapath_name("query", k) for k in (1, 2, 3)] == ["q-i", "q-i-q", "q-i-q-i"]
    assert [metapath_name("item", k) for k in (1, 2, 3)] == ["i-q", "i-q-i", "i-q-i-q"]
    assert joined_feature_names(1) == ["q_o1_ids", "q_o1_texts", "q_o1_weights",
                                       "i_o1_ids", "i_o1_texts", "i_o1_weights"]
    assert len(joined_feature_names(3)) == 18 and joined_feature_names(0) == []


def test_edge_weight_smoothing():
    cfg = GraphConfig()
    unclicked_once = edge_weight(1, 0, 0, cfg)
    assert 0 < unclicked_once < 0.1
    # More clicks at the same impressions -> more weight; purchases add on top.
    series = [edge_weight(100, c, 0, cfg) for c in (0, 1, 5, 20, 60)]
    assert all(a < b for a, b in zip(series, series[1:]))
    assert edge_weight(100, 20, 5, cfg) > edge_weight(100, 20, 0, cfg)
    # A well-clicked pair outweighs a single unclicked impression by far.
    assert edge_weight(100, 20, 0, cfg) > 10 * unclicked_once
    # Confidence: same CTR, more evidence -> more weight.
    assert edge_weight(1000, 100, 0, cfg) > edge_weight(10, 1, 0, cfg)
    # Never shown, never clicked: nothing to count.
    assert edge_weight(0, 0, 0, cfg) == 0.0
    # Exact formula.
    assert edge_weight(10, 2, 1, cfg) == pytest.approx((2 + 2 * 1 + 1) / (10 + 1 + 9) * math.log1p(10))
    log_cfg = GraphConfig(weight_scheme="log_engagement")
    assert 0 < edge_weight(1, 0, 0, log_cfg) < edge_weight(1, 1, 0, log_cfg) < edge_weight(5, 3, 0, log_cfg)
    clicks_cfg = GraphConfig(weight_scheme="clicks", purchase_weight=3.0)
    assert edge_weight(50, 0, 0, clicks_cfg) == 0.0 and edge_weight(50, 2, 1, clicks_cfg) == 5.0


def test_degree_summary():
    summary = mp.degree_summary({1: 5, 2: 3, 3: 1, 9: 1})
    assert summary["count"] == 10 and summary["min"] == 1 and summary["max"] == 9
    assert summary["median"] == 1 and summary["p90"] == 3 and summary["p99"] == 9
    assert summary["mean"] == pytest.approx((5 + 6 + 3 + 9) / 10)
    assert summary["log2_histogram"] == [
        {"lo": 1, "hi": 1, "count": 5}, {"lo": 2, "hi": 3, "count": 4},
        {"lo": 4, "hi": 7, "count": 0}, {"lo": 8, "hi": 15, "count": 1}]
    assert mp.degree_summary({})["count"] == 0


def test_exact_sum_is_order_independent():
    values = [0.1, 1e16, 0.3, -1e16, 1 / 3, 2 / 7] * 3
    fn = mp._ExactSumFn()
    sums = set()
    for seed in range(5):
        shuffled = values[:]
        random.Random(seed).shuffle(shuffled)
        accs = []
        for chunk in (shuffled[:5], shuffled[5:11], shuffled[11:]):
            acc = fn.create_accumulator()
            for v in chunk:
                acc = fn.add_input(acc, ("t", v))
            accs.append(acc)
        sums.add(fn.extract_output(fn.merge_accumulators(accs))[1])
    assert sums == {math.fsum(values)}


def test_tf_example_to_log_row():
    r = mp.tf_example_to_log_row(_to_example_bytes(row("q", "i9", 2, "Title", impressions=7)))
    assert r == {"query": "q", "item_id": "i9", "item_title": "Title", "impressions": 7,
                 "clicks": 2, "purchases": 0}
    assert mp.normalise_log_row({"query": b"q", "item_id": 12, "clicks": [3], "impressions": "4"}) == {
        "query": "q", "item_id": "12", "item_title": "", "impressions": 4, "clicks": 3, "purchases": 0}


# --------------------------------------------------------------------------------------
# Pipeline tests
# --------------------------------------------------------------------------------------
def _assert_table(tables, side, metapath, node, expected):
    record = tables[(side, metapath, node)]
    assert record["order"] == metapath.count("-")
    assert record["neighbour_ids"] == [n for n, _ in expected], (metapath, node)
    for got, (_, want) in zip(record["neighbour_weights"], expected):
        assert got == pytest.approx(float(want), abs=1e-9, rel=1e-9), (metapath, node)
    ends_on_item = metapath.endswith("i")
    texts = [TITLES[n] if ends_on_item else n for n in record["neighbour_ids"]]
    assert record["neighbour_texts"] == texts


def test_hand_graph_all_orders(results):
    tables = tables_by_key(results["hand"]["neighbour_tables"])
    expected_keys = set()
    for (side, metapath), nodes in HAND_EXPECTED.items():
        for node, neighbours in nodes.items():
            _assert_table(tables, side, metapath, node, neighbours)
            expected_keys.add((side, metapath, node))
    # Nothing else: q4/e have no order >= 2 neighbours, d has no i-q-i-q... rows at all.
    assert set(tables) == expected_keys
    assert ("query", "q-i-q", "q4") not in tables and ("item", "i-q-i", "e") not in tables


def test_hand_graph_top_n_ties(results):
    tables = tables_by_key(results["hand_top2"]["neighbour_tables"])
    assert tables[("item", "i-q-i", "c")]["neighbour_ids"] == ["a", "b"]  # 3-way tie -> by id
    assert tables[("query", "q-i-q-i", "q2")]["neighbour_ids"] == ["a", "d"]
    assert tables[("query", "q-i", "q2")]["neighbour_ids"] == ["c", "a"]
    assert all(len(r["neighbour_ids"]) <= 2 for r in tables.values())


def test_hand_graph_stats(results):
    stats = results["hand"]["graph_stats"]
    assert len(stats) == 1
    stats = stats[0]
    assert stats["num_log_rows"] == 9 and stats["num_invalid_rows"] == 0
    assert stats["edges"] == {"total": 8, "after_min_weight": 8, "after_hub_cap": 8}
    assert stats["nodes"] == {"query": 4, "item": 5}
    assert stats["connected_components"]["num_components"] == 2
    assert stats["connected_components"]["largest_component_size"] == 7
    q = stats["degree"]["query"]
    assert (q["min"], q["median"], q["max"]) == (1, 2, 3)
    assert stats["capped_hubs"]["total"] == 0 and results["hand"]["capped_hubs"] == []
    assert stats["config"]["max_order"] == 3


def test_table_min_impressions_drops_only_the_quiet_nodes_tables(results):
    # Impressions per node (10 a row): q1 30, q2 30, q3 20, q4 10; a 30, b 20, c 20, d 10, e 10.
    hand = tables_by_key(results["hand"]["neighbour_tables"])
    kept = tables_by_key(results["hand_min20"]["neighbour_tables"])
    quiet = {("query", "q4"), ("item", "d"), ("item", "e")}
    assert {(side, node) for side, _, node in hand} >= quiet
    # The others keep their records unchanged: quiet nodes still appear in their lists.
    assert kept == {k: v for k, v in hand.items() if (k[0], k[2]) not in quiet}
    assert "d" in kept[("query", "q-i", "q3")]["neighbour_ids"]
    stats = results["hand_min20"]["graph_stats"][0]
    # q4 and d, e: 10 impressions each, of the log's 90.
    assert stats["nodes_without_tables"] == {"query": 1, "item": 2, "query_impressions": 10,
                                             "item_impressions": 20, "num_impressions": 90}
    assert stats["nodes"] == results["hand"]["graph_stats"][0]["nodes"]
    assert set(results["hand"]["graph_stats"][0]["nodes_without_tables"].values()) == {0}


def test_max_order_zero_gives_stats_only(results):
    assert results["hand_k0"]["neighbour_tables"] == []
    assert results["hand_k0"]["graph_stats"][0]["edges"]["after_hub_cap"] == 8


def test_tf_example_input_matches_dicts(results):
    from_examples = tables_by_key(results["from_examples"]["neighbour_tables"])
    from_dicts = {k: v for k, v in tables_by_key(results["hand"]["neighbour_tables"]).items()
                  if v["order"] == 1}
    assert from_examples == from_dicts


def test_hub_capping(results):
    capped = sorted(results["hubs"]["capped_hubs"], key=lambda r: r["side"])
    assert capped == [
        {"side": "item", "node_id": "pop", "original_degree": 4, "kept_degree": 3},
        {"side": "query", "node_id": "hub", "original_degree": 5, "kept_degree": 3},
    ]
    tables = tables_by_key(results["hubs"]["neighbour_tables"])
    hub = tables[("query", "q-i", "hub")]
    assert hub["neighbour_ids"] == ["i1", "i2", "i3"]  # i3 beats i4 on the tie by id
    assert hub["neighbour_weights"] == pytest.approx([5 / 12, 4 / 12, 3 / 12])
    assert tables[("item", "i-q", "pop")]["neighbour_ids"] == ["qd", "qc", "qb"]
    # qa lost its edge to the capped hub "pop" but keeps i1; i1 links qa and hub.
    assert tables[("query", "q-i", "qa")]["neighbour_ids"] == ["i1"]
    assert tables[("query", "q-i-q", "qa")]["neighbour_ids"] == ["hub"]
    assert ("item", "i-q", "i4") not in tables
    stats = results["hubs"]["graph_stats"][0]
    assert stats["capped_hubs"] == {"query": 1, "item": 1, "total": 2}
    assert stats["edges"]["after_min_weight"] == 10 and stats["edges"]["after_hub_cap"] == 7
    assert stats["degree"]["query"]["max"] == 5
    assert stats["degree_after_hub_cap"]["query"]["max"] == 3
    assert stats["degree_after_hub_cap"]["item"]["max"] == 3


def test_min_weight_and_nodes_without_neighbours(results):
    out = results["min_weight"]
    stats = out["graph_stats"][0]
    assert stats["edges"] == {"total": 4, "after_min_weight": 2, "after_hub_cap": 2}
    assert stats["nodes"] == {"query": 2, "item": 2}  # "lonely" and its z are gone
    tables = tables_by_key(out["neighbour_tables"])
    assert tables[("query", "q-i", "qa")]["neighbour_ids"] == ["y"]
    assert tables[("query", "q-i", "qb")]["neighbour_ids"] == ["x"]
    assert not any(k[2] in ("lonely", "z") for k in tables)
    # qa and qb no longer share x: no order-2 rows at all.
    assert not any(r["order"] == 2 for r in tables.values())


def test_connected_components_long_chain(results):
    components = results["chain"]["graph_stats"][0]["connected_components"]
    assert components["num_components"] == 2
    assert components["largest_component_size"] == 13
    assert components["rounds"] == 1


def test_empty_log(results):
    out = results["empty"]
    assert out["neighbour_tables"] == [] and out["capped_hubs"] == []
    assert len(out["graph_stats"]) == 1
    stats = out["graph_stats"][0]
    assert stats["num_log_rows"] == 0
    assert stats["edges"] == {"total": 0, "after_min_weight": 0, "after_hub_cap": 0}
    assert stats["nodes"] == {"query": 0, "item": 0}
    assert stats["degree"]["item"]["max"] == 0 and stats["degree"]["query"]["log2_histogram"] == []
    assert stats["connected_components"]["num_components"] == 0
    assert stats["capped_hubs"]["total"] == 0


# Independent brute-force reference: aggregate, weight, cap, then enumerate every
# non-backtracking walk explicitly.
def reference_tables(rows, cfg):
    counts, titles = {}, {}
    for r in rows:
        key = (r["query"], r["item_id"])
        c = counts.setdefault(key, [0, 0, 0])
        c[0] += r["impressions"]; c[1] += r["clicks"]; c[2] += r["purchases"]
        titles.setdefault(r["item_id"], {}).setdefault(r["item_title"], 0)
        titles[r["item_id"]][r["item_title"]] += 1
    title = {i: sorted(t.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for i, t in titles.items()}
    w = {k: edge_weight(*v, cfg) for k, v in counts.items()}
    w = {k: v for k, v in w.items() if v > 0 and v >= cfg.min_edge_weight}
    kept = {}
    for side in (0, 1):
        adj = {}
        for (q, i), x in w.items():
            node, nb = ((q, i) if side == 0 else (i, q))
            adj.setdefault(node, []).append((nb, x))
        for node, nbs in adj.items():
            for nb, x in sorted(nbs, key=lambda t: (-t[1], t[0]))[:cfg.hub_cap]:
                pair = (node, nb) if side == 0 else (nb, node)
                kept[pair] = kept.get(pair, 0) + 1
    edges = {k: w[k] for k, n in kept.items() if n == 2}
    adj = {"query": {}, "item": {}}
    for (q, i), x in edges.items():
        adj["query"].setdefault(q, {})[i] = x
        adj["item"].setdefault(i, {})[q] = x
    prob = {s: {u: {v: x / math.fsum(nb.values()) for v, x in nb.items()} for u, nb in a.items()}
            for s, a in adj.items()}
    text = lambda side, n: title[n] if side == "item" else n
    out = {"_edges": sorted(edges)}
    for side in ("query", "item"):
        for start in prob[side]:
            walks = [([start], 1.0)]
            cur_side = side
            for order in range(1, cfg.max_order + 1):
                if order == 3 and cfg.order3_beam_width:
                    # Only the order3_beam_width heaviest order-2 nodes are continued.
                    kept_mids = {v for v, _ in sorted(two_hop.items(), key=lambda t: (-t[1], t[0]))
                                 [:cfg.order3_beam_width]}
                    walks = [(path, p) for path, p in walks if path[-1] in kept_mids]
                nxt = []
                for path, p in walks:
                    for v, pv in prob[cur_side][path[-1]].items():
                        if len(path) >= 2 and v == path[-2]:
                            continue
                        nxt.append((path + [v], p * pv))
                walks = nxt
                cur_side = "item" if cur_side == "query" else "query"
                sums = {}
                for path, p in walks:
                    sums.setdefault(path[-1], []).append(p)
                totals = {v: math.fsum(ps) for v, ps in sums.items()}
                if order == 2:
                    two_hop = totals
                ranked = sorted(totals.items(), key=lambda t: (-t[1], t[0]))[:cfg.top_n]
                if ranked:
                    out[(side, metapath_name(side, order), start)] = (
                        [v for v, _ in ranked], [text(cur_side, v) for v, _ in ranked],
                        [x for _, x in ranked])
    return out


@pytest.mark.parametrize("scenario,beam_width", [("random", 0), ("random_beam", 1)])
def test_random_graph_matches_brute_force(results, scenario, beam_width):
    rows = random_rows()
    config = dataclass_replace(RANDOM_CONFIG, order3_beam_width=beam_width)
    expected = reference_tables(rows, config)
    edges = expected.pop("_edges")
    got = tables_by_key(results[scenario]["neighbour_tables"])
    assert set(got) == set(expected)
    assert any(k[1] == "q-i-q-i" for k in got) and any(k[1] == "i-q-i-q" for k in got)
    for key, (ids, texts, weights) in expected.items():
        record = got[key]
        assert record["neighbour_texts"] == texts, key
        assert record["neighbour_weights"] == pytest.approx(weights, rel=1e-12, abs=1e-15), key
        # Ids must match exactly except where floating ties could reorder.
        assert record["neighbour_ids"] == ids, key
    stats = results[scenario]["graph_stats"][0]
    assert stats["capped_hubs"]["total"] == len(results[scenario]["capped_hubs"]) > 0
    assert stats["edges"]["after_hub_cap"] == len(edges)
    # Components of the capped graph by plain BFS (the pipeline used only 2 propagation
    # rounds, so its union-find finish had work to do).
    count, largest = bfs_components(edges)
    components = stats["connected_components"]
    assert components["num_components"] == count > 1
    assert components["largest_component_size"] == largest


def test_beam_width_only_changes_order_three(results):
    exact = tables_by_key(results["random"]["neighbour_tables"])
    pruned = tables_by_key(results["random_beam"]["neighbour_tables"])
    assert {k: v for k, v in exact.items() if v["order"] < 3} == \
        {k: v for k, v in pruned.items() if v["order"] < 3}
    assert any(exact[k] != pruned.get(k) for k in exact if k[1] in ("q-i-q-i", "i-q-i-q"))


def test_join_contexts(results):
    joined = results["joined"]
    assert len(joined) == len(JOIN_EXAMPLES)
    names = joined_feature_names(3)
    for ex in joined:
        assert set(names) <= set(ex)
    hand = tables_by_key(results["hand"]["neighbour_tables"])
    q1a = [ex for ex in joined if ex["query"] == "q1" and ex["item_id"] == "a"]
    assert sorted(ex["label"] for ex in q1a) == [0, 1]
    for ex in q1a:
        # A pair is not its own context: q1's items without a, a's queries without q1.
        q1_items = hand[("query", "q-i", "q1")]
        assert q1_items["neighbour_ids"] == ["a", "b"]
        assert ex["q_o1_ids"] == ["b"] and ex["q_o1_texts"] == ["Aardvark banana"]
        assert ex["q_o1_weights"] == q1_items["neighbour_weights"][1:]
        assert ex["q_o2_ids"] == ["q2"] and ex["q_o3_ids"] == ["c", "b", "a"]
        assert ex["i_o1_ids"] == ["q2"] and ex["i_o2_ids"] == ["b", "c"]
        assert ex["q_o2_weights"] == hand[("query", "q-i-q", "q1")]["neighbour_weights"]
        assert ex["i_o3_weights"] == hand[("item", "i-q-i-q", "a")]["neighbour_weights"]
    q4e = next(ex for ex in joined if ex["query"] == "q4")
    assert q4e["q_o1_ids"] == [] and q4e["i_o1_ids"] == []  # q4's only item is e, and e's only query q4
    assert q4e["q_o2_ids"] == [] and q4e["i_o2_weights"] == [] and q4e["q_o3_texts"] == []
    unseen_q = next(ex for ex in joined if ex["query"] == "unseen")
    assert all(unseen_q[f"q_o{k}_ids"] == [] for k in (1, 2, 3))
    assert unseen_q["i_o1_ids"] == ["q1", "q2"]
    unseen_i = next(ex for ex in joined if ex["item_id"] == "unseen")
    assert unseen_i["q_o1_ids"] == ["c", "a", "b"] and unseen_i["i_o1_ids"] == []


def test_determinism_across_workers_and_modes(results, tmp_path, monkeypatch):
    # Worker subprocesses must import components.* (and this module, should anything in
    # it be pickled by reference); they inherit PYTHONPATH.
    paths = [REPO_ROOT, os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    multi = run_scenarios(
        str(tmp_path), {"random": (random_rows(), RANDOM_CONFIG)},
        options=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])["random"]
    single = results["random"]  # ran with the default: one worker, in memory
    for output in OUTPUTS:
        a = sorted(json.dumps(r, sort_keys=True) for r in single[output])
        b = sorted(json.dumps(r, sort_keys=True) for r in multi[output])
        assert a == b, output


# --------------------------------------------------------------------------------------
# Added with the scale work: paths the implementation takes only in some cases
# --------------------------------------------------------------------------------------
def bfs_components(edges):
    """(number of components, largest size) of the bipartite graph on (query, item) edges."""
    neighbours = {}
    for q, i in edges:
        neighbours.setdefault(("q", q), set()).add(("i", i))
        neighbours.setdefault(("i", i), set()).add(("q", q))
    seen, sizes = set(), []
    for node in neighbours:
        if node in seen:
            continue
        frontier, size = [node], 0
        seen.add(node)
        while frontier:
            size += 1
            for nb in neighbours[frontier.pop()]:
                if nb not in seen:
                    seen.add(nb)
                    frontier.append(nb)
        sizes.append(size)
    return len(sizes), max(sizes, default=0)


def test_titles_outside_the_shipped_top_are_looked_up(results):
    tables = tables_by_key(results["title_lookup"]["neighbour_tables"])
    record = tables[("item", "i-q-i", "m")]
    assert record["neighbour_ids"] == ["b"] and record["neighbour_texts"] == ["Bee"]
    assert record["neighbour_weights"] == pytest.approx([5 / 21])
    expected = reference_tables(TITLE_LOOKUP_ROWS, TITLE_LOOKUP_CONFIG)
    expected.pop("_edges")
    assert set(tables) == set(expected)
    for key, (ids, texts, weights) in expected.items():
        assert tables[key]["neighbour_ids"] == ids, key
        assert tables[key]["neighbour_texts"] == texts, key
        assert tables[key]["neighbour_weights"] == pytest.approx(weights, rel=1e-12), key


@pytest.mark.parametrize("scenario", [f"rounds{r}" for r in ROUNDS_SCENARIOS] + ["rounds_k1"])
def test_connected_components_any_number_of_rounds(results, scenario):
    config = RANDOM_CONFIG if scenario != "rounds_k1" else dataclass_replace(RANDOM_CONFIG, max_order=1)
    edges = reference_tables(random_rows(), config)["_edges"]
    stats = results[scenario]["graph_stats"][0]
    num, largest = bfs_components(edges)
    assert num > 1
    assert stats["connected_components"]["num_components"] == num
    assert stats["connected_components"]["largest_component_size"] == largest
    # Everything but the echoed config is the same as with the default scenario's rounds.
    strip = lambda s: {k: v for k, v in s.items() if k not in ("config", "connected_components")}
    assert strip(stats) == strip(results["random"]["graph_stats"][0])
    if scenario != "rounds_k1":
        dump = lambda records: sorted(json.dumps(r, sort_keys=True) for r in records)
        assert dump(results[scenario]["neighbour_tables"]) == dump(results["random"]["neighbour_tables"])


def test_row_fast_path_matches_normalise_log_row():
    rng = random.Random(5)
    values = [0, 3, -2, 2 ** 60 + 1, 7.0, 2.5, "4", b"5", [6], None, True, ""]
    texts = ["q", "", b"bytes", 12, 1.0, None, ["listed"], "é"]
    fn = mp._NormaliseRowFn()
    for _ in range(400):
        r = {"query": rng.choice(texts), "item_id": rng.choice(texts),
             "item_title": rng.choice(texts), "impressions": rng.choice(values),
             "clicks": rng.choice(values)}
        if rng.random() < 0.7:
            r["purchases"] = rng.choice(values)
        try:
            want = mp.normalise_log_row(r)
        except (TypeError, ValueError):
            with pytest.raises((TypeError, ValueError)):
                list(fn.process(r))
            continue
        got = list(fn.process(r))
        assert len(got) == 1
        if want["query"] and want["item_id"]:
            assert got[0] == (want["query"], (want["item_id"], want["impressions"], want["clicks"],
                                              want["purchases"], want["item_title"]))
        else:
            assert got[0].tag == mp._NormaliseRowFn.INVALID and got[0].value == want
