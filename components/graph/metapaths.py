"""Metapath neighbour contexts over the query-item click graph (pure Apache Beam).

Liu et al. (EMNLP 2022) enrich each (query, item) pair with the *context* of both ends in
the bipartite user-behaviour graph: the items a query led to, the queries that led to an
item, and higher-order neighbours reached along alternating metapaths. This module builds
that graph from the validated search logs and computes, for every node, its top-N
neighbours along each metapath up to order ``k``. Everything is expressed with
``GroupByKey``/``CombinePerKey`` so it runs unchanged on DirectRunner, Dataflow and Flink,
and nothing collects the graph on one worker (the single bounded exception is the
connected-components finish, see ``graph_stats`` below).

Pipeline, in order
------------------
1. **Rows -> pairs.** Log rows (dicts, ``tf.train.Example`` or serialised Examples) are
   normalised; rows sharing a (query, item_id) pair (different periods) are summed.
   An item's text is its most frequent non-empty ``item_title`` (by number of rows), ties
   broken by the lexicographically smallest title. A query's text is the query itself.
2. **Edge weights** (:func:`edge_weight`, scheme ``smoothed_ctr`` by default)::

       n = max(impressions, clicks, purchases)
       w = (clicks + purchase_weight * purchases + alpha) / (n + alpha + beta) * log1p(n)

   The first factor is the posterior-mean CTR under a Beta(alpha, beta) prior (prior CTR
   alpha / (alpha + beta)), so an unclicked pair with one impression still gets a small
   positive weight, a clicked pair gets more, and a pair shown 1000 times and never clicked
   sinks towards zero (that is evidence of irrelevance). The ``log1p(n)`` factor is the
   confidence: more evidence, more weight, with diminishing returns so head queries do
   not drown the tail. Edges with weight <= 0 or < ``min_edge_weight`` are dropped.
3. **Hub capping** before expansion: a node of degree > ``hub_cap`` keeps only its
   ``hub_cap`` heaviest edges (ties: smaller neighbour id first). An edge survives only if
   both of its endpoints keep it, so every node's degree is <= ``hub_cap`` afterwards and
   the work per node at order ``k`` is bounded by ``hub_cap ** k``. Each capped node is
   reported once (``capped_hubs``); its ``kept_degree`` is what the node itself kept
   (= ``hub_cap``); its final degree can be lower when some of its neighbours are capped
   hubs themselves.
4. **Random-walk weights.** ``P(v|u) = w(u, v) / sum_v' w(u, v')`` on the capped graph. A
   path's weight is the product of its step probabilities (multiplied left to right); the
   weight of a neighbour is the sum over all paths of the metapath ending there.
   Walks are *non-backtracking*: a step may not return to the node visited two steps
   before. At order 2 that is exactly "exclude the start node" (q->i->q with q' != q); at
   order 3 (q->i->q'->i') it also excludes i' == i, i.e. walks that go back through the
   same item they came from. Weights are not renormalised after this exclusion, so they
   are the probability mass of the plain random walk restricted to non-backtracking paths
   (a node's order-k weights sum to <= 1). A start node can still appear at order 3 on the
   other side of the graph (q->i->q'->i' may end at an item that q clicked directly); it
   is kept, since that is a genuinely different, corroborating path.

   Order 2 enumerates the 2-paths (at most ``hub_cap**2`` per start node) with a join on
   the middle node. Order 3 groups those 2-paths by (start, mid2), remembering the
   share of each first hop, and takes the third step once per (start, mid2, end) rather
   than once per path: a third step onto one of the remembered first-hop nodes uses the
   exact sum of the other shares (that is the i' != i exclusion). Exact order 3 can
   still cost ``hub_cap**3`` per start node; ``order3_beam_width`` bounds it by keeping
   only the heaviest order-2 nodes of each start (an approximation, off by default).
5. **Top-N**: neighbours sorted by weight descending, then by id ascending.

Determinism: integer sums are exact, floating sums use Shewchuk's exact partials and are
rounded once (:class:`_ExactSumFn`), every top-N / title / label choice uses a total order,
so outputs do not depend on bundle boundaries, worker count or arrival order.

Outputs of :class:`ComputeNeighbourContexts` (a :class:`NeighbourContexts` named tuple,
also indexable by name)
------------------------------------------------------------------------------------
``neighbour_tables``: one dict per (side, node, metapath) that has >= 1 neighbour::

    {"side": "query" | "item", "node_id": str, "metapath": "q-i-q", "order": 2,
     "neighbour_ids": [str], "neighbour_texts": [str], "neighbour_weights": [float]}

Metapaths by side and order: query: ``q-i`` (1), ``q-i-q`` (2), ``q-i-q-i`` (3);
item: ``i-q`` (1), ``i-q-i`` (2), ``i-q-i-q`` (3). Lists are parallel and sorted as in 5.
:func:`neighbour_record_to_tf_example` turns a record into a ``tf.train.Example``.

``graph_stats``: exactly one JSON-serialisable dict (zeros for an empty log), see
:func:`_finalise_stats` for the keys. Degree quantiles are exact nearest-rank quantiles,
computed from a histogram of degree values (memory: number of distinct degrees).
Connected components are computed on the final (capped) graph with ``cc_rounds`` rounds of
min-label propagation followed by an exact union-find over the label pairs still in
conflict (usually few after a few rounds; memory is the number of such labels, which for
pathological long chains can approach the number of nodes), so the count is exact.

``capped_hubs``: ``{"side", "node_id", "original_degree", "kept_degree"}`` per capped node.

Joined features (:class:`JoinContexts`)
---------------------------------------
For each example dict with ``query`` and ``item_id`` it adds, for k = 1..max_order::

    q_o{k}_ids, q_o{k}_texts, q_o{k}_weights   # the query's neighbours, metapath of order k
    i_o{k}_ids, i_o{k}_texts, i_o{k}_weights   # the item's neighbours, metapath of order k

(``q_o1`` = items of the query, ``q_o2`` = related queries, ``q_o3`` = items of related
queries; ``i_o1`` = queries of the item, ``i_o2`` = related items, ``i_o3`` = queries of
related items). Missing contexts give empty lists, so every example has every key.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

_LOG = logging.getLogger(__name__)

QUERY = "query"
ITEM = "item"
SIDES = (QUERY, ITEM)
MAX_ORDER = 3
WEIGHT_SCHEMES = ("smoothed_ctr", "log_engagement", "clicks")

_LETTER = {QUERY: "q", ITEM: "i"}
_OTHER = {QUERY: ITEM, ITEM: QUERY}

_METRICS_NS = "relkd.graph"


def metapath_name(side: str, order: int) -> str:
    """``metapath_name("query", 3) == "q-i-q-i"``: the node letters along the metapath."""
    letters = [_LETTER[side], _LETTER[_OTHER[side]]]
    return "-".join(letters[j % 2] for j in range(order + 1))


def feature_prefix(side: str, order: int) -> str:
    """Prefix of the joined features, e.g. ``q_o2`` for a query's order-2 context."""
    return f"{_LETTER[side]}_o{order}"


def joined_feature_names(max_order: int) -> List[str]:
    """All feature names :class:`JoinContexts` adds, in a stable order."""
    names = []
    for side in SIDES:
        for order in range(1, max_order + 1):
            prefix = feature_prefix(side, order)
            names += [f"{prefix}_ids", f"{prefix}_texts", f"{prefix}_weights"]
    return names


# --------------------------------------------------------------------------------------
# Configuration and edge weights
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """Knobs of the graph build; frozen and picklable so it travels to workers unchanged.

    Attributes:
      max_order: highest metapath order k to expand (0..3). 0 builds stats only.
      top_n: neighbours kept per (node, metapath).
      min_edge_weight: edges lighter than this are dropped (edges <= 0 always are).
      hub_cap: max degree a node keeps before expansion; bounds order-k work by hub_cap**k.
      weight_scheme: ``smoothed_ctr`` (default, see module docstring), ``log_engagement``
        (``log1p(clicks + purchase_weight*purchases + prior_ctr*n)``, grows with volume
        and never penalises impressions) or ``clicks`` (raw ``clicks +
        purchase_weight*purchases``; unsmoothed, unclicked pairs get 0 and are dropped).
      purchase_weight: how many clicks a purchase is worth.
      prior_alpha, prior_beta: Beta prior pseudo-counts (clicks, non-clicks); prior CTR is
        alpha / (alpha + beta).
      order3_beam_width: order 3 only continues from the ``order3_beam_width`` heaviest
        order-2 nodes of each start node (0 = all: exact). Exact order 3 costs up to
        ``hub_cap**3`` path contributions per start node; with a width W it is at most
        ``W * hub_cap``. Results are exact whenever a node has <= W order-2 neighbours.
      compute_components: whether to compute connected components (extra shuffles).
      cc_rounds: rounds of label propagation before the exact union-find finish; more
        rounds -> fewer labels left for the single-worker finish.
    """

    max_order: int = 2
    top_n: int = 10
    min_edge_weight: float = 0.0
    hub_cap: int = 100
    weight_scheme: str = "smoothed_ctr"
    purchase_weight: float = 2.0
    prior_alpha: float = 1.0
    prior_beta: float = 9.0
    order3_beam_width: int = 0
    compute_components: bool = True
    cc_rounds: int = 4

    def __post_init__(self):
        if not (isinstance(self.max_order, int) and 0 <= self.max_order <= MAX_ORDER):
            raise ValueError(f"max_order must be an int in 0..{MAX_ORDER}, got {self.max_order!r}")
        if not (isinstance(self.top_n, int) and self.top_n >= 1):
            raise ValueError(f"top_n must be an int >= 1, got {self.top_n!r}")
        if not (isinstance(self.hub_cap, int) and self.hub_cap >= 1):
            raise ValueError(f"hub_cap must be an int >= 1, got {self.hub_cap!r}")
        if not (isinstance(self.order3_beam_width, int) and self.order3_beam_width >= 0):
            raise ValueError(f"order3_beam_width must be an int >= 0, got {self.order3_beam_width!r}")
        if not (isinstance(self.cc_rounds, int) and self.cc_rounds >= 1):
            raise ValueError(f"cc_rounds must be an int >= 1, got {self.cc_rounds!r}")
        if self.weight_scheme not in WEIGHT_SCHEMES:
            raise ValueError(f"weight_scheme must be one of {WEIGHT_SCHEMES}, got {self.weight_scheme!r}")
        for name in ("min_edge_weight", "purchase_weight", "prior_beta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.prior_alpha, (int, float)) and math.isfinite(self.prior_alpha)
                and self.prior_alpha > 0):
            raise ValueError(f"prior_alpha must be a finite number > 0, got {self.prior_alpha!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def edge_weight(impressions: int, clicks: int, purchases: int, config: GraphConfig) -> float:
    """Weight of an aggregated (query, item) pair; see the module docstring for why.

    ``n = max(impressions, clicks, purchases)`` guards against logs where clicks were
    counted without their impression; negative counts are treated as 0.
    """
    impressions, clicks, purchases = (max(int(v), 0) for v in (impressions, clicks, purchases))
    engaged = clicks + config.purchase_weight * purchases
    n = max(impressions, clicks, purchases)
    if config.weight_scheme == "smoothed_ctr":
        ctr = (engaged + config.prior_alpha) / (n + config.prior_alpha + config.prior_beta)
        return ctr * math.log1p(n)
    if config.weight_scheme == "log_engagement":
        prior_ctr = config.prior_alpha / (config.prior_alpha + config.prior_beta)
        return math.log1p(engaged + prior_ctr * n)
    return float(engaged)  # "clicks"


# --------------------------------------------------------------------------------------
# Row normalisation (dicts, tf.train.Example, serialised Examples)
# --------------------------------------------------------------------------------------
_LOG_FIELDS = ("query", "item_id", "item_title", "impressions", "clicks", "purchases")
_COUNT_FIELDS = ("impressions", "clicks", "purchases")


def _scalar(value: Any) -> Any:
    """First element of list-like values (TFXIO / Example features are lists)."""
    if isinstance(value, (str, bytes, bytearray)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return _scalar(value[0]) if value else None
    return value


def _as_text(value: Any) -> str:
    value = _scalar(value)
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _as_count(value: Any) -> int:
    value = _scalar(value)
    if value is None or value == "" or value == b"":
        return 0
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8")
    count = int(float(value))
    return max(count, 0)


def tf_example_to_log_row(example: Any) -> Dict[str, Any]:
    """Converts a ``tf.train.Example`` (or its serialised bytes) with the log features to
    the plain dict the graph transforms use. Missing ``purchases`` (and any missing count)
    become 0, missing text becomes "". TensorFlow is only imported to parse bytes."""
    if isinstance(example, (bytes, bytearray)):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        example = tf.train.Example.FromString(bytes(example))
    feature_map = example.features.feature
    raw = {}
    for name in _LOG_FIELDS:
        if name in feature_map:
            feature = feature_map[name]
            kind = feature.WhichOneof("kind")
            raw[name] = list(getattr(feature, kind).value) if kind else []
    return normalise_log_row(raw)


def normalise_log_row(row: Any) -> Dict[str, Any]:
    """Canonical log row ``{query, item_id, item_title: str, impressions, clicks,
    purchases: int >= 0}`` from a mapping, a ``tf.train.Example`` or serialised bytes."""
    if isinstance(row, (bytes, bytearray)) or hasattr(row, "features"):
        return tf_example_to_log_row(row)
    if not isinstance(row, Mapping):
        raise TypeError(f"log rows must be mappings or tf.train.Example, got {type(row).__name__}")
    out: Dict[str, Any] = {
        "query": _as_text(row.get("query")),
        "item_id": _as_text(row.get("item_id")),
        "item_title": _as_text(row.get("item_title")),
    }
    for name in _COUNT_FIELDS:
        out[name] = _as_count(row.get(name))
    return out


class TFExampleToLogRow(beam.DoFn):
    """DoFn form of :func:`tf_example_to_log_row` for pipelines reading TFRecords."""

    def process(self, element: Any) -> Iterator[Dict[str, Any]]:
        yield tf_example_to_log_row(element)


def neighbour_record_to_tf_example(record: Mapping[str, Any]):
    """A ``neighbour_tables`` record as a ``tf.train.Example`` (imports TensorFlow)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    def _bytes(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8") for v in values]))

    features = {
        "side": _bytes([record["side"]]),
        "node_id": _bytes([record["node_id"]]),
        "metapath": _bytes([record["metapath"]]),
        "order": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(record["order"])])),
        "neighbour_ids": _bytes(record["neighbour_ids"]),
        "neighbour_texts": _bytes(record["neighbour_texts"]),
        "neighbour_weights": tf.train.Feature(
            float_list=tf.train.FloatList(value=list(record["neighbour_weights"]))),
    }
    return tf.train.Example(features=tf.train.Features(feature=features))


# Tagged outputs defeat Beam's output type inference; declare Any.
@beam.typehints.with_output_types(Any)
class _NormaliseRowFn(beam.DoFn):
    INVALID = "invalid"

    def __init__(self):
        self._invalid = Metrics.counter(_METRICS_NS, "invalid_log_rows")

    def process(self, element: Any):
        row = normalise_log_row(element)
        if not row["query"] or not row["item_id"]:
            self._invalid.inc()
            yield pvalue.TaggedOutput(self.INVALID, row)
            return
        yield row


# --------------------------------------------------------------------------------------
# CombineFns (all associative and commutative with a total order -> deterministic)
# --------------------------------------------------------------------------------------
def _msum_add(partials: List[float], x: float) -> None:
    """Adds x to Shewchuk's non-overlapping partials in place (exact; Python recipe)."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]


class _ExactSumFn(beam.CombineFn):
    """Sums (text, weight) values exactly; the result is the correctly rounded sum whatever
    the order of inputs and merges. The text (identical for one key) is kept as the min."""

    def create_accumulator(self):
        return [None, []]

    def add_input(self, acc, element):
        text, weight = element
        if acc[0] is None or text < acc[0]:
            acc[0] = text
        _msum_add(acc[1], weight)
        return acc

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        merged = next(accumulators, None) or self.create_accumulator()
        for acc in accumulators:
            if acc[0] is not None and (merged[0] is None or acc[0] < merged[0]):
                merged[0] = acc[0]
            for partial in acc[1]:
                _msum_add(merged[1], partial)
        return merged

    def extract_output(self, acc):
        return acc[0], math.fsum(acc[1])


def _rank_key(element: Tuple[str, str, float]):
    """Order of (id, text, weight) neighbours: heavier first, then smaller id."""
    return (-element[2], element[0], element[1])


def _state_rank_key(element: Tuple[str, float, Tuple]):
    """Order of aggregated (mid, weight, via) walk states: heavier first, then smaller id."""
    return (-element[1], element[0])


class _TopNFn(beam.CombineFn):
    """Top-n tuples under ``key`` (a total order on one key's values; default
    :func:`_rank_key` for (id, text, weight)); accumulators never exceed 2n."""

    def __init__(self, n: int, key=_rank_key):
        self._n = n
        self._key = key

    def _trim(self, acc):
        acc.sort(key=self._key)
        del acc[self._n:]
        return acc

    def create_accumulator(self):
        return []

    def add_input(self, acc, element):
        acc.append(tuple(element))
        if len(acc) >= 2 * self._n:
            self._trim(acc)
        return acc

    def merge_accumulators(self, accumulators):
        merged = []
        for acc in accumulators:
            merged.extend(acc)
        return self._trim(merged)

    def compact(self, acc):
        return self._trim(acc)

    def extract_output(self, acc):
        return self._trim(list(acc))


class _CountAndTopFn(beam.CombineFn):
    """(degree, the cap heaviest (neighbour, weight)) of a node, without materialising its
    full adjacency: this is what keeps a million-edge hub from blowing up a worker."""

    def __init__(self, cap: int):
        self._cap = cap

    @staticmethod
    def _key(element):
        return (-element[1], element[0])

    def _trim(self, top):
        top.sort(key=self._key)
        del top[self._cap:]
        return top

    def create_accumulator(self):
        return [0, []]

    def add_input(self, acc, element):
        acc[0] += 1
        acc[1].append(tuple(element))
        if len(acc[1]) >= 2 * self._cap:
            self._trim(acc[1])
        return acc

    def merge_accumulators(self, accumulators):
        count, top = 0, []
        for acc in accumulators:
            count += acc[0]
            top.extend(acc[1])
        return [count, self._trim(top)]

    def extract_output(self, acc):
        return acc[0], self._trim(list(acc[1]))


class _SumCountsFn(beam.CombineFn):
    """Element-wise integer sum of (impressions, clicks, purchases, rows)."""

    def create_accumulator(self):
        return (0, 0, 0, 0)

    def add_input(self, acc, element):
        return tuple(a + b for a, b in zip(acc, element))

    def merge_accumulators(self, accumulators):
        totals = [0, 0, 0, 0]
        for acc in accumulators:
            for j, value in enumerate(acc):
                totals[j] += value
        return tuple(totals)

    def extract_output(self, acc):
        return acc


def _title_key(candidate: Tuple[str, int]):
    title, rows = candidate
    return (title == "", -rows, title)


class _BestTitleFn(beam.CombineFn):
    """Most frequent non-empty (title, rows); ties -> lexicographically smallest title."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, element):
        element = tuple(element)
        return element if acc is None or _title_key(element) < _title_key(acc) else acc

    def merge_accumulators(self, accumulators):
        best = None
        for acc in accumulators:
            if acc is not None and (best is None or _title_key(acc) < _title_key(best)):
                best = acc
        return best

    def extract_output(self, acc):
        return "" if acc is None else acc[0]


class _DegreeSummaryFn(beam.CombineFn):
    """Exact degree distribution summary from a histogram of degree values."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, degree):
        acc[degree] = acc.get(degree, 0) + 1
        return acc

    def merge_accumulators(self, accumulators):
        merged: Dict[int, int] = {}
        for acc in accumulators:
            for degree, count in acc.items():
                merged[degree] = merged.get(degree, 0) + count
        return merged

    def extract_output(self, acc):
        return degree_summary(acc)


def degree_summary(histogram: Mapping[int, int]) -> Dict[str, Any]:
    """count/min/median/p90/p99/max/mean and a log2-bucket histogram of a degree histogram.

    Quantiles are nearest-rank: the smallest degree d with #(degree <= d) >= ceil(q * n).
    Bucket b holds degrees in [2**b, 2**(b+1) - 1]; all buckets up to the max are listed.
    """
    n = sum(histogram.values())
    if n == 0:
        return {"count": 0, "min": 0, "median": 0, "p90": 0, "p99": 0, "max": 0,
                "mean": 0.0, "log2_histogram": []}
    degrees = sorted(histogram)
    quantiles = {}
    for name, q in (("median", 0.5), ("p90", 0.9), ("p99", 0.99)):
        rank = max(1, math.ceil(q * n))
        cumulative = 0
        for degree in degrees:
            cumulative += histogram[degree]
            if cumulative >= rank:
                quantiles[name] = degree
                break
    buckets: Dict[int, int] = {}
    for degree in degrees:
        bucket = max(degree, 1).bit_length() - 1
        buckets[bucket] = buckets.get(bucket, 0) + histogram[degree]
    log2_histogram = [
        {"lo": 2 ** b, "hi": 2 ** (b + 1) - 1, "count": buckets.get(b, 0)}
        for b in range(max(buckets) + 1)
    ]
    total = sum(degree * count for degree, count in histogram.items())
    return {"count": n, "min": degrees[0], "median": quantiles["median"],
            "p90": quantiles["p90"], "p99": quantiles["p99"], "max": degrees[-1],
            "mean": total / n, "log2_histogram": log2_histogram}


class _UnionFindFn(beam.CombineFn):
    """Union-find over label pairs; every label maps to the smallest label of its set, so
    the result is independent of merge order."""

    @staticmethod
    def _find(parent, x):
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    def _union(self, parent, a, b):
        ra, rb = self._find(parent, a), self._find(parent, b)
        if ra == rb:
            parent.setdefault(a, ra)
            return
        lo, hi = (ra, rb) if ra < rb else (rb, ra)
        parent[hi] = lo
        parent.setdefault(lo, lo)
        parent.setdefault(a, lo)
        parent.setdefault(b, lo)

    def create_accumulator(self):
        return {}

    def add_input(self, acc, pair):
        self._union(acc, pair[0], pair[1])
        return acc

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        merged = next(accumulators, None) or {}
        for acc in accumulators:
            for x, p in acc.items():
                self._union(merged, x, p)
        return merged

    def extract_output(self, acc):
        return {x: self._find(acc, x) for x in acc}


class _ComponentSummaryFn(beam.CombineFn):
    def create_accumulator(self):
        return (0, 0)

    def add_input(self, acc, size):
        return acc[0] + 1, max(acc[1], size)

    def merge_accumulators(self, accumulators):
        count, largest = 0, 0
        for acc in accumulators:
            count += acc[0]
            largest = max(largest, acc[1])
        return count, largest

    def extract_output(self, acc):
        return {"num_components": acc[0], "largest_component_size": acc[1]}


class _CollectStatsFn(beam.CombineFn):
    """Collects (path, value) stat pieces into one dict; paths are unique."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, element):
        acc[element[0]] = element[1]
        return acc

    def merge_accumulators(self, accumulators):
        merged = {}
        for acc in accumulators:
            merged.update(acc)
        return merged

    def extract_output(self, acc):
        return acc


# --------------------------------------------------------------------------------------
# Small element functions (module level so they pickle by reference)
# --------------------------------------------------------------------------------------
def _pair_counts(row):
    return (row["query"], row["item_id"]), (row["impressions"], row["clicks"], row["purchases"], 1)


def _to_edge(pair, config):
    (query, item), (impressions, clicks, purchases, _) = pair
    return query, item, edge_weight(impressions, clicks, purchases, config)


def _keep_edge(edge, min_weight):
    return edge[2] > 0 and edge[2] >= min_weight


def _tag(element, tag):
    return element[0], (tag, element[1])


def _lookup(tagged_values):
    """The single tag-0 value of a tagged group, or None (first pass over the iterable)."""
    for tag, value in tagged_values:
        if tag == 0:
            return value
    return None


def _tagged_join(label: str, lookup, main):
    """Groups ``lookup`` (few values per key, tag 0) with ``main`` (tag 1) by key.

    A Flatten+GroupByKey rather than CoGroupByKey: consumers scan the grouped iterable
    twice (find the lookup value, then stream the main values), so on Dataflow a hot key's
    values are paged from the shuffle instead of being materialised in lists.
    """
    return (
        (lookup | f"{label}TagLookup" >> beam.Map(_tag, 0),
         main | f"{label}TagMain" >> beam.Map(_tag, 1))
        | f"{label}Flatten" >> beam.Flatten()
        | f"{label}Group" >> beam.GroupByKey())


# --------------------------------------------------------------------------------------
# Graph construction transforms
# --------------------------------------------------------------------------------------
@beam.ptransform_fn
def _AggregatePairs(rows):  # pylint: disable=invalid-name
    """((query, item), (impressions, clicks, purchases, rows)) summed over periods."""
    return (rows
            | "PairCounts" >> beam.Map(_pair_counts)
            | "SumPairCounts" >> beam.CombinePerKey(_SumCountsFn()))


@beam.ptransform_fn
def _ChooseItemTitles(rows):  # pylint: disable=invalid-name
    """(item_id, title): the most frequent title, smallest on ties (see module docstring)."""
    return (rows
            | "ItemTitle" >> beam.Map(lambda row: ((row["item_id"], row["item_title"]), 1))
            | "CountTitles" >> beam.CombinePerKey(sum)
            | "KeyByItem" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[1])))
            | "BestTitle" >> beam.CombinePerKey(_BestTitleFn()))


# Tagged outputs defeat Beam's output type inference; declare Any.
@beam.typehints.with_output_types(Any)
class _EmitCappedFn(beam.DoFn):
    CAPPED = "capped"
    DEGREE = "degree"

    def __init__(self, side: str, cap: int):
        self._side = side
        self._cap = cap
        self._capped = Metrics.counter(_METRICS_NS, f"capped_{side}_hubs")

    def process(self, element):
        node, (degree, top) = element
        yield pvalue.TaggedOutput(self.DEGREE, degree)
        if degree > self._cap:
            self._capped.inc()
            yield pvalue.TaggedOutput(self.CAPPED, {
                "side": self._side, "node_id": node,
                "original_degree": degree, "kept_degree": len(top)})
        for neighbour, weight in top:
            pair = (node, neighbour) if self._side == QUERY else (neighbour, node)
            yield pair, weight


def _both_kept(element):
    (query, item), weights = element
    weights = list(weights)
    if len(weights) == 2:
        yield query, item, weights[0]


class _CapHubs(beam.PTransform):
    """Caps every node to its ``cap`` heaviest edges; an edge survives if both ends keep it.

    Returns a dict: ``edges`` (query, item, weight), ``capped_hubs`` records and the
    pre-cap degree of every node per side (``degrees_query``, ``degrees_item``).
    """

    def __init__(self, cap: int, label: Optional[str] = None):
        super().__init__(label)
        self._cap = cap

    def expand(self, edges):
        kept, capped, degrees = [], [], {}
        for side in SIDES:
            name = side.capitalize()
            if side == QUERY:
                keyed = edges | f"KeyBy{name}" >> beam.Map(lambda e: (e[0], (e[1], e[2])))
            else:
                keyed = edges | f"KeyBy{name}" >> beam.Map(lambda e: (e[1], (e[0], e[2])))
            split = (keyed
                     | f"{name}DegreeAndTop" >> beam.CombinePerKey(_CountAndTopFn(self._cap))
                     | f"{name}Cap" >> beam.ParDo(_EmitCappedFn(side, self._cap)).with_outputs(
                         _EmitCappedFn.CAPPED, _EmitCappedFn.DEGREE, main="kept"))
            kept.append(split.kept)
            capped.append(split[_EmitCappedFn.CAPPED])
            degrees[f"degrees_{side}"] = split[_EmitCappedFn.DEGREE]
        final = (kept
                 | "FlattenKept" >> beam.Flatten()
                 | "GroupKept" >> beam.GroupByKey()
                 | "KeptByBoth" >> beam.FlatMap(_both_kept))
        return dict(edges=final, capped_hubs=capped | "FlattenCapped" >> beam.Flatten(), **degrees)


def _normalised(neighbours):
    """Sorted (id, P, text) from (id, weight, text); P = weight / exact total."""
    neighbours = sorted(neighbours)
    total = math.fsum(weight for _, weight, _ in neighbours)
    return [(nid, weight / total, text) for nid, weight, text in neighbours]


# Tagged outputs defeat Beam's output type inference; declare Any.
@beam.typehints.with_output_types(Any)
class _ItemAdjacencyFn(beam.DoFn):
    TO_QUERY = "to_query"

    def process(self, element):
        item, tagged = element
        title = _lookup(tagged)
        title = "" if title is None else title
        edges = [(value[0], value[1], value[0]) for tag, value in tagged if tag == 1]
        if not edges:
            return
        yield item, _normalised(edges)
        for query, weight, _ in edges:
            yield pvalue.TaggedOutput(self.TO_QUERY, (query, (item, weight, title)))


def _query_adjacency(element):
    query, neighbours = element
    return query, _normalised(neighbours)


class _BuildAdjacency(beam.PTransform):
    """Random-walk adjacency per side: (node, [(neighbour, P(neighbour|node), text)])
    sorted by neighbour id. Item titles are attached here, once per edge."""

    def __init__(self, titles, label: Optional[str] = None):
        super().__init__(label)
        self._titles = titles

    def expand(self, edges):
        by_item = edges | "EdgesByItem" >> beam.Map(lambda e: (e[1], (e[0], e[2])))
        items = (_tagged_join("ItemTitles", self._titles, by_item)
                 | "ItemAdjacency" >> beam.ParDo(_ItemAdjacencyFn()).with_outputs(
                     _ItemAdjacencyFn.TO_QUERY, main="adjacency"))
        queries = (items[_ItemAdjacencyFn.TO_QUERY]
                   | "GroupByQuery" >> beam.GroupByKey()
                   | "QueryAdjacency" >> beam.Map(_query_adjacency))
        return {QUERY: queries, ITEM: items.adjacency}


# --------------------------------------------------------------------------------------
# Metapath expansion
# --------------------------------------------------------------------------------------
def _table_record(side, order, node, neighbours):
    return {
        "side": side, "node_id": node, "metapath": metapath_name(side, order), "order": order,
        "neighbour_ids": [n[0] for n in neighbours],
        "neighbour_texts": [n[1] for n in neighbours],
        "neighbour_weights": [float(n[2]) for n in neighbours],
    }


def _order_one_record(element, side, top_n):
    node, adjacency = element
    ranked = sorted(((nid, text, p) for nid, p, text in adjacency), key=_rank_key)[:top_n]
    return _table_record(side, 1, node, ranked)


def _initial_states(element):
    """Order-1 walk states keyed by the node reached: (cur, (start, prev, weight, text))."""
    start, adjacency = element
    for neighbour, p, text in adjacency:
        yield neighbour, (start, start, p, text)


class _ExtendPathsFn(beam.DoFn):
    """One non-backtracking random-walk step: states at ``cur`` x adjacency of ``cur``
    (used for order 2, where "non-backtracking" means "not back to the start")."""

    def __init__(self):
        self._paths = Metrics.counter(_METRICS_NS, "walk_paths")

    def process(self, element):
        cur, tagged = element
        adjacency = _lookup(tagged)
        if not adjacency:
            return
        emitted = 0
        for tag, state in tagged:
            if tag != 1:
                continue
            start, prev, weight, _ = state
            for neighbour, p, text in adjacency:
                if neighbour == prev:
                    continue
                emitted += 1
                yield neighbour, (start, cur, weight * p, text)
        self._paths.inc(emitted)


def _state_to_path_end(element):
    end, (start, _, weight, text) = element
    return (start, end), (text, weight)


def _path_end_to_candidate(element):
    (start, end), (text, weight) = element
    return start, (end, text, weight)


@beam.ptransform_fn
def _RankPathEnds(path_ends, side: str, order: int, top_n: int):  # pylint: disable=invalid-name
    """((start, end), (text, weight)) contributions -> top-N table records."""
    return (path_ends
            | "SumPaths" >> beam.CombinePerKey(_ExactSumFn())
            | "Candidates" >> beam.Map(_path_end_to_candidate)
            | "TopN" >> beam.CombinePerKey(_TopNFn(top_n))
            | "Record" >> beam.MapTuple(lambda node, top: _table_record(side, order, node, top)))


@beam.ptransform_fn
def _MetapathTable(states, side: str, order: int, top_n: int):  # pylint: disable=invalid-name
    """Top-N table of one metapath from the walk states that end it."""
    return (states
            | "PathEnds" >> beam.Map(_state_to_path_end)
            | "Rank" >> _RankPathEnds(side, order, top_n))  # pylint: disable=no-value-for-parameter


def _state_to_pair(element):
    mid2, (start, mid1, weight, _) = element
    return (start, mid2), (mid1, weight)


def _aggregate_pair(element):
    """(start, (mid2, total weight of all 2-paths, ((mid1, weight), ...) sorted))."""
    (start, mid2), via = element
    via = tuple(sorted(via))
    return start, (mid2, math.fsum(weight for _, weight in via), via)


def _key_by_mid(element):
    start, (mid2, total, via) = element
    return mid2, (start, total, via)


def _explode_top(element):
    start, top = element
    for state in top:
        yield start, state


class _ExtendAggregatedFn(beam.DoFn):
    """Order-3 step from aggregated order-2 states, keeping walks non-backtracking.

    A state (start, total, via) at ``mid2`` sums all 2-paths start->mid1->mid2; ``via``
    lists each mid1 with its share. A third step to ``end`` must not return to the mid1 it
    came through, so when ``end`` is one of the ``via`` nodes its share is left out (an
    exact fsum of the others); otherwise the whole total continues. This emits one
    contribution per (start, mid2, end) instead of one per 3-path.
    """

    def __init__(self):
        self._contributions = Metrics.counter(_METRICS_NS, "order3_contributions")

    def process(self, element):
        mid2, tagged = element
        adjacency = _lookup(tagged)
        if not adjacency:
            return
        emitted = 0
        for tag, state in tagged:
            if tag != 1:
                continue
            start, total, via = state
            via_ids = {mid1 for mid1, _ in via}
            for end, p, text in adjacency:
                if end in via_ids:
                    weight = math.fsum(w for mid1, w in via if mid1 != end)
                    if weight <= 0:
                        continue
                else:
                    weight = total
                emitted += 1
                yield (start, end), (text, weight * p)
        self._contributions.inc(emitted)


class _ExpandMetapaths(beam.PTransform):
    """All metapath tables of orders 1..max_order for walks starting on ``side``.

    Order 2 enumerates 2-paths (<= hub_cap**2 per start) and sums them per end node.
    Order 3 first groups the 2-paths by (start, mid2) (optionally keeping only the
    ``order3_beam_width`` heaviest mid2 per start), then takes one more step.
    """

    def __init__(self, side: str, adjacency: Mapping[str, Any], config: GraphConfig,
                 label: Optional[str] = None):
        super().__init__(label)
        self._side = side
        self._adjacency = adjacency
        self._config = config

    def expand(self, pbegin):
        side, cfg = self._side, self._config
        other = _OTHER[side]
        start_adjacency = self._adjacency[side]
        tables = [start_adjacency
                  | "Order1" >> beam.Map(_order_one_record, side, cfg.top_n)]
        if cfg.max_order >= 2:
            states1 = start_adjacency | "InitialStates" >> beam.FlatMap(_initial_states)
            states2 = (_tagged_join("Step2", self._adjacency[other], states1)
                       | "Extend2" >> beam.ParDo(_ExtendPathsFn()))
            tables.append(states2 | "Order2" >> _MetapathTable(side, 2, cfg.top_n))  # pylint: disable=no-value-for-parameter
        if cfg.max_order >= 3:
            pairs = (states2
                     | "KeyByStartAndMid" >> beam.Map(_state_to_pair)
                     | "GroupTwoPaths" >> beam.GroupByKey()
                     | "AggregateTwoPaths" >> beam.Map(_aggregate_pair))
            if cfg.order3_beam_width:
                pairs = (pairs
                         | "BeamTop" >> beam.CombinePerKey(
                             _TopNFn(cfg.order3_beam_width, key=_state_rank_key))
                         | "BeamStates" >> beam.FlatMap(_explode_top))
            keyed = pairs | "KeyByMid" >> beam.Map(_key_by_mid)
            ends = (_tagged_join("Step3", self._adjacency[side], keyed)
                    | "Extend3" >> beam.ParDo(_ExtendAggregatedFn()))
            tables.append(ends | "Order3" >> _RankPathEnds(side, 3, cfg.top_n))  # pylint: disable=no-value-for-parameter
        return tables | "FlattenOrders" >> beam.Flatten()


# --------------------------------------------------------------------------------------
# Connected components
# --------------------------------------------------------------------------------------
def _cc_adjacency(element, letter, other_letter):
    node, adjacency = element
    return (letter, node), [(other_letter, neighbour) for neighbour, _, _ in adjacency]


def _initial_messages(element):
    node, neighbours = element
    yield node, node
    for neighbour in neighbours:
        yield neighbour, node


def _propagate(element):
    node, tagged = element
    label = _lookup(tagged)
    for tag, neighbours in tagged:
        if tag == 1:
            yield node, label
            for neighbour in neighbours:
                yield neighbour, label


# Tagged outputs defeat Beam's output type inference; declare Any.
@beam.typehints.with_output_types(Any)
class _FinalLabelFn(beam.DoFn):
    PAIRS = "pairs"

    def process(self, element):
        node, labels = element
        labels = set(labels)
        label = min(labels)
        yield node, label
        for other in sorted(labels):
            if other != label:
                yield pvalue.TaggedOutput(self.PAIRS, (label, other))


def _resolve_label(element, roots):
    label, size = element
    return roots.get(label, label), size


class _ConnectedComponents(beam.PTransform):
    """{num_components, largest_component_size} of the graph given by both adjacencies.

    ``rounds`` rounds of min-label propagation (each one hop), then every node emits the
    pairs (its new label, each label it heard) and a single union-find over those pairs
    (:class:`_UnionFindFn`) merges labels that met; the result is exact for any number of
    rounds, more rounds only shrink the union-find input.
    """

    def __init__(self, rounds: int, label: Optional[str] = None):
        super().__init__(label)
        self._rounds = rounds

    def expand(self, adjacency):
        nodes = ((adjacency[QUERY] | "QueryNodes" >> beam.Map(_cc_adjacency, "q", "i"),
                  adjacency[ITEM] | "ItemNodes" >> beam.Map(_cc_adjacency, "i", "q"))
                 | "FlattenNodes" >> beam.Flatten())
        messages = nodes | "Round1" >> beam.FlatMap(_initial_messages)
        for round_ in range(2, self._rounds + 1):
            labels = messages | f"MinLabel{round_ - 1}" >> beam.CombinePerKey(min)
            messages = (_tagged_join(f"Round{round_}", labels, nodes)
                        | f"Propagate{round_}" >> beam.FlatMap(_propagate))
        final = (messages
                 | "GroupFinalMessages" >> beam.GroupByKey()
                 | "FinalLabels" >> beam.ParDo(_FinalLabelFn()).with_outputs(
                     _FinalLabelFn.PAIRS, main="labels"))
        roots = (final[_FinalLabelFn.PAIRS]
                 | "DistinctPairs" >> beam.Distinct()
                 | "UnionFind" >> beam.CombineGlobally(_UnionFindFn()))
        return (final.labels
                | "Labels" >> beam.Map(lambda kv: kv[1])
                | "LabelSizes" >> beam.combiners.Count.PerElement()
                | "ResolveLabels" >> beam.Map(_resolve_label, beam.pvalue.AsSingleton(roots))
                | "ComponentSizes" >> beam.CombinePerKey(sum)
                | "Sizes" >> beam.Map(lambda kv: kv[1])
                | "Summarise" >> beam.CombineGlobally(_ComponentSummaryFn()))


# --------------------------------------------------------------------------------------
# Stats
# --------------------------------------------------------------------------------------
def _finalise_stats(pieces: Mapping[str, Any], config: GraphConfig) -> Dict[str, Any]:
    """The ``graph_stats`` dict. Keys:

    num_log_rows, num_invalid_rows; edges {total, after_min_weight, after_hub_cap};
    nodes {query, item} (after min weight) and nodes_after_hub_cap; degree and
    degree_after_hub_cap {query, item: :func:`degree_summary`}; capped_hubs {query, item,
    total}; connected_components {computed, rounds, num_components,
    largest_component_size} (on the capped graph); config.
    """
    def get(key, default=0):
        return pieces.get(key, default)

    empty_degrees = degree_summary({})
    degree = {side: get(f"degree.{side}", empty_degrees) for side in SIDES}
    degree_after = {side: get(f"degree_after_hub_cap.{side}", empty_degrees) for side in SIDES}
    components = get("connected_components", {"num_components": 0, "largest_component_size": 0})
    capped = {side: get(f"capped_hubs.{side}") for side in SIDES}
    return {
        "num_log_rows": get("num_log_rows"),
        "num_invalid_rows": get("num_invalid_rows"),
        "edges": {"total": get("edges.total"),
                  "after_min_weight": get("edges.after_min_weight"),
                  "after_hub_cap": get("edges.after_hub_cap")},
        "nodes": {side: degree[side]["count"] for side in SIDES},
        "nodes_after_hub_cap": {side: degree_after[side]["count"] for side in SIDES},
        "degree": degree,
        "degree_after_hub_cap": degree_after,
        "capped_hubs": dict(capped, total=sum(capped.values())),
        "connected_components": dict(
            components, computed=config.compute_components, rounds=config.cc_rounds),
        "config": config.to_dict(),
    }


def _named(pcoll, name: str):
    return pcoll | f"Stat[{name}]" >> beam.Map(lambda value: (name, value))


# --------------------------------------------------------------------------------------
# Public transforms
# --------------------------------------------------------------------------------------
class NeighbourContexts(NamedTuple):
    """Outputs of :class:`ComputeNeighbourContexts`; also indexable by field name."""

    neighbour_tables: Any
    graph_stats: Any
    capped_hubs: Any
    # (item_id, title): the canonical title chosen for each logged item (module docstring, 1.).
    item_titles: Any

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            return getattr(self, key)
        return tuple.__getitem__(self, key)


class ComputeNeighbourContexts(beam.PTransform):
    """Log rows -> :class:`NeighbourContexts` (see the module docstring for formats)."""

    def __init__(self, config: Optional[GraphConfig] = None, label: Optional[str] = None):
        super().__init__(label)
        self._config = config or GraphConfig()

    def expand(self, rows):
        cfg = self._config
        _LOG.info("Building metapath contexts with %s", cfg)
        parsed = rows | "NormaliseRows" >> beam.ParDo(_NormaliseRowFn()).with_outputs(
            _NormaliseRowFn.INVALID, main="valid")
        valid = parsed.valid
        pairs = valid | "AggregatePairs" >> _AggregatePairs()  # pylint: disable=no-value-for-parameter
        titles = valid | "ChooseItemTitles" >> _ChooseItemTitles()  # pylint: disable=no-value-for-parameter
        all_edges = pairs | "EdgeWeights" >> beam.Map(_to_edge, cfg)
        edges = all_edges | "DropLightEdges" >> beam.Filter(_keep_edge, cfg.min_edge_weight)
        capped = edges | "CapHubs" >> _CapHubs(cfg.hub_cap)
        adjacency = capped["edges"] | "BuildAdjacency" >> _BuildAdjacency(titles)

        if cfg.max_order >= 1:
            tables = ([rows.pipeline | f"Expand{side.capitalize()}" >> _ExpandMetapaths(side, adjacency, cfg)
                       for side in SIDES]
                      | "FlattenTables" >> beam.Flatten())
        else:
            tables = rows.pipeline | "NoTables" >> beam.Create([])

        count = beam.combiners.Count.Globally
        pieces = [
            _named(valid | "CountRows" >> count(), "num_log_rows"),
            _named(parsed[_NormaliseRowFn.INVALID] | "CountInvalid" >> count(), "num_invalid_rows"),
            _named(all_edges | "CountEdges" >> count(), "edges.total"),
            _named(edges | "CountWeighted" >> count(), "edges.after_min_weight"),
            _named(capped["edges"] | "CountCapped" >> count(), "edges.after_hub_cap"),
        ]
        for side in SIDES:
            name = side.capitalize()
            pieces.append(_named(
                capped[f"degrees_{side}"] | f"{name}Degrees" >> beam.CombineGlobally(_DegreeSummaryFn()),
                f"degree.{side}"))
            pieces.append(_named(
                adjacency[side]
                | f"{name}FinalDegree" >> beam.Map(lambda kv: len(kv[1]))
                | f"{name}FinalDegrees" >> beam.CombineGlobally(_DegreeSummaryFn()),
                f"degree_after_hub_cap.{side}"))
            pieces.append(_named(
                capped["capped_hubs"]
                | f"Capped{name}" >> beam.Filter(lambda r, s=side: r["side"] == s)
                | f"CountCapped{name}" >> count(),
                f"capped_hubs.{side}"))
        if cfg.compute_components:
            pieces.append(_named(
                adjacency | "ConnectedComponents" >> _ConnectedComponents(cfg.cc_rounds),
                "connected_components"))
        stats = (pieces
                 | "FlattenStats" >> beam.Flatten()
                 | "CollectStats" >> beam.CombineGlobally(_CollectStatsFn())
                 | "FinaliseStats" >> beam.Map(_finalise_stats, cfg))
        return NeighbourContexts(
            neighbour_tables=tables, graph_stats=stats, capped_hubs=capped["capped_hubs"],
            item_titles=titles)


def _example_key(example: Mapping[str, Any], key: str) -> str:
    return _as_text(example.get(key))


class _AttachContextsFn(beam.DoFn):
    def __init__(self, side: str, max_order: int):
        self._side = side
        self._max_order = max_order

    def process(self, element):
        _, tagged = element
        by_order = {}
        for tag, record in tagged:
            if tag == 0:
                by_order[record["order"]] = record
        for tag, example in tagged:
            if tag != 1:
                continue
            out = dict(example)
            for order in range(1, self._max_order + 1):
                prefix = feature_prefix(self._side, order)
                record = by_order.get(order)
                out[f"{prefix}_ids"] = list(record["neighbour_ids"]) if record else []
                out[f"{prefix}_texts"] = list(record["neighbour_texts"]) if record else []
                out[f"{prefix}_weights"] = list(record["neighbour_weights"]) if record else []
            yield out


class JoinContexts(beam.PTransform):
    """Example dicts -> the same dicts plus the query's and item's neighbour contexts.

    Applied to examples with ``query_key`` / ``item_key`` fields; ``neighbour_tables`` is the
    output of :class:`ComputeNeighbourContexts`. Adds the features listed by
    :func:`joined_feature_names` (empty lists where a context is missing), leaving the
    input dicts unmodified. Two keyed shuffles (by query, then by item) whose grouped
    iterables are streamed, so a hot query does not need all its examples in memory.
    """

    def __init__(self, neighbour_tables, max_order: int, query_key: str = "query",
                 item_key: str = "item_id", label: Optional[str] = None):
        super().__init__(label)
        if not 0 <= max_order <= MAX_ORDER:
            raise ValueError(f"max_order must be in 0..{MAX_ORDER}, got {max_order}")
        self._tables = neighbour_tables
        self._max_order = max_order
        self._keys = {QUERY: query_key, ITEM: item_key}

    def expand(self, examples):
        out = examples
        for side in SIDES:
            name = side.capitalize()
            key = self._keys[side]
            contexts = (self._tables
                        | f"{name}Contexts" >> beam.Filter(lambda r, s=side: r["side"] == s)
                        | f"Key{name}Contexts" >> beam.Map(lambda r: (r["node_id"], r)))
            keyed = out | f"KeyBy{name}" >> beam.Map(lambda ex, k=key: (_example_key(ex, k), ex))
            out = (_tagged_join(f"Join{name}", contexts, keyed)
                   | f"Attach{name}" >> beam.ParDo(_AttachContextsFn(side, self._max_order)))
        return out
