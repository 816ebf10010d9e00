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

   Order 2 of a start node is summed where the start node is grouped: each middle node
   sends its whole (capped) neighbour list, with its transition probabilities, to each
   of its neighbours, which adds up P(mid|start) * P(end|mid) per end node in memory
   (at most ``hub_cap**2`` terms per start node). Order 3 groups the 2-paths by
   (start, mid2), remembering the share of each first hop, and takes the third step once
   per (start, mid2, end) rather than once per path: a third step onto one of the
   remembered first-hop nodes uses the exact sum of the other shares (that is the
   i' != i exclusion). Exact order 3 can still cost ``hub_cap**3`` per start node;
   ``order3_beam_width`` bounds it by keeping only the heaviest order-2 nodes of each
   start (an approximation, off by default).
5. **Top-N**: neighbours sorted by weight descending, then by id ascending.

Shuffles: pairs are aggregated with a per-query ``CombinePerKey`` (1.), then the graph
goes query -> item (weights and query caps; item titles, caps, order 1, item lists) ->
query (order 1 and 2 of queries, query lists) -> item (order 2 of items): each kept edge
is crossed once per direction, carrying both the neighbour lists and the labels of the
connected-components propagation (see ``graph_stats``). Neighbour lists travel as packed
bytes. The query -> item lists (sum over queries of degree**2 entries, the largest
exchange) carry titles only for each query's ``top_n + 1`` heaviest items; an item whose
top-N includes another item gets that title from a small lookup join.

Determinism: integer sums are exact, floating sums are exact and rounded once
(``math.fsum``, or Shewchuk's partials in :class:`_ExactSumFn`), every top-N / title /
label choice uses a total order, so outputs do not depend on bundle boundaries, worker
count or arrival order.

Outputs of :class:`ComputeNeighbourContexts` (a :class:`NeighbourContexts` named tuple,
also indexable by name)
------------------------------------------------------------------------------------
``neighbour_tables``: one dict per (side, node, metapath) that has >= 1 neighbour (and, with
``table_min_impressions``, whose node was logged with at least that many impressions)::

    {"side": "query" | "item", "node_id": str, "metapath": "q-i-q", "order": 2,
     "neighbour_ids": [str], "neighbour_texts": [str], "neighbour_weights": [float]}

Metapaths by side and order: query: ``q-i`` (1), ``q-i-q`` (2), ``q-i-q-i`` (3);
item: ``i-q`` (1), ``i-q-i`` (2), ``i-q-i-q`` (3). Lists are parallel and sorted as in 5.
:func:`neighbour_record_to_tf_example` turns a record into a ``tf.train.Example``.

``graph_stats``: exactly one JSON-serialisable dict (zeros for an empty log), see
:func:`_finalise_stats` for the keys. Degree quantiles are exact nearest-rank quantiles,
computed from a histogram of degree values (memory: number of distinct degrees).
Connected components are computed on the final (capped) graph with ``cc_rounds`` rounds of
min-label propagation (rounds 1-3 ride on the graph's own query/item exchanges, later ones
take one exchange per two rounds) followed by an exact union-find over the label pairs
still in conflict (usually few after a few rounds; memory is the number of such labels,
which for pathological long chains can approach the number of nodes), so the count is
exact.

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
import heapq
import logging
import math
import pickle
import zlib
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
      table_min_impressions: a node logged with fewer impressions in all (summed over its
        rows) gets no ``neighbour_tables`` records, so the examples joined here and BERM-O
        alike treat it as a node without context (0 = every node keeps its tables). The
        graph itself is unchanged: such a node still appears in other nodes' lists. It bounds
        what BERM-O stores when the logs' long tail runs to millions of nodes.
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
    table_min_impressions: int = 0

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
        if not (isinstance(self.table_min_impressions, int) and self.table_min_impressions >= 0):
            raise ValueError(f"table_min_impressions must be an int >= 0, got "
                             f"{self.table_min_impressions!r}")
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
    """Log row -> ``(query, (item_id, impressions, clicks, purchases, item_title))``
    (:func:`normalise_log_row` semantics; plain ``str``/``int`` dict rows take a fast path
    that gives the same values). Rows without a query or item go to ``INVALID``."""

    INVALID = "invalid"

    def __init__(self):
        self._invalid = Metrics.counter(_METRICS_NS, "invalid_log_rows")

    def process(self, element: Any):
        if type(element) is dict:  # pylint: disable=unidiomatic-typecheck
            keyed = _fast_row(element)
            if keyed is not None and keyed[0] and keyed[1][0]:
                yield keyed
                return
        row = normalise_log_row(element)
        if not row["query"] or not row["item_id"]:
            self._invalid.inc()
            yield pvalue.TaggedOutput(self.INVALID, row)
            return
        yield (row["query"],
               (row["item_id"], row["impressions"], row["clicks"], row["purchases"], row["item_title"]))


_EXACT_INT = 2 ** 53  # ints below this survive _as_count's int(float(v)) unchanged


def _fast_count(value: Any) -> Optional[int]:
    if value is None:
        return 0
    if type(value) is int and -_EXACT_INT < value < _EXACT_INT:  # pylint: disable=unidiomatic-typecheck
        return value if value > 0 else 0
    return None


def _fast_row(row: dict) -> Optional[Tuple]:
    """:class:`_NormaliseRowFn`'s output for a dict row whose fields are already
    ``str``/``int``/None, or None when the general path is needed (values identical to
    normalise_log_row)."""
    get = row.get
    query, item, title = get("query"), get("item_id"), get("item_title")
    if title is None:
        title = ""
    if type(query) is not str or type(item) is not str or type(title) is not str:  # pylint: disable=unidiomatic-typecheck
        return None
    impressions, clicks, purchases = get("impressions"), get("clicks"), get("purchases")
    # Common case inline: non-negative exact ints are their own counts.
    if not (type(impressions) is int and 0 <= impressions < _EXACT_INT):  # pylint: disable=unidiomatic-typecheck
        impressions = _fast_count(impressions)
    if not (type(clicks) is int and 0 <= clicks < _EXACT_INT):  # pylint: disable=unidiomatic-typecheck
        clicks = _fast_count(clicks)
    if not (type(purchases) is int and 0 <= purchases < _EXACT_INT):  # pylint: disable=unidiomatic-typecheck
        purchases = _fast_count(purchases)
    if impressions is None or clicks is None or purchases is None:
        return None
    return query, (item, impressions, clicks, purchases, title)


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
    the order of inputs and merges (equal to ``math.fsum`` of all the weights). The text
    (identical for one key) is kept as the min."""

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


def _cap_key(edge: Tuple[str, float]):
    """Order in which a node keeps its (neighbour, weight, ...) edges when capped."""
    return (-edge[1], edge[0])


def _top(candidates, n: int, key):
    """``sorted(candidates, key=key)[:n]`` without sorting everything."""
    if len(candidates) <= n:
        return sorted(candidates, key=key)
    return heapq.nsmallest(n, candidates, key=key)


def _merge_titles(titles, rows, other, other_rows):
    """Merges two title tallies; a tally is a title (all its rows had it) or a dict
    {title: rows}, so the common single-title pair costs one string."""
    if other is None:
        return titles
    if titles is None:
        return other if other.__class__ is str else dict(other)
    if titles.__class__ is str:
        if other.__class__ is str and other == titles:
            return titles
        titles = {titles: rows}
    else:
        titles = dict(titles)
    if other.__class__ is str:
        titles[other] = titles.get(other, 0) + other_rows
    else:
        for title, count in other.items():
            titles[title] = titles.get(title, 0) + count
    return titles


class _QueryPairsFn(beam.CombineFn):
    """Per query: {item: (impressions, clicks, purchases, rows, titles)} summed over the
    query's log rows (element-wise integer sums; titles: see :func:`_merge_titles`).
    Inputs are (item, impressions, clicks, purchases, title) rows. Keyed by query rather
    than by pair so that the pairs arrive grouped for capping without another shuffle; a
    query's accumulator holds one entry per distinct item it was logged with."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, element):
        item, impressions, clicks, purchases, title = element
        counts = acc.get(item)
        if counts is None:
            acc[item] = (impressions, clicks, purchases, 1, title)
        else:
            titles = counts[4]
            if titles.__class__ is not str or titles != title:
                titles = _merge_titles(titles, counts[3], title, 1)
            acc[item] = (counts[0] + impressions, counts[1] + clicks, counts[2] + purchases,
                         counts[3] + 1, titles)
        return acc

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        merged = next(accumulators, None)
        if merged is None:
            return {}
        for acc in accumulators:
            for item, other in acc.items():
                counts = merged.get(item)
                if counts is None:
                    merged[item] = other
                else:
                    merged[item] = (counts[0] + other[0], counts[1] + other[1],
                                    counts[2] + other[2], counts[3] + other[3],
                                    _merge_titles(counts[4], counts[3], other[4], other[3]))
        return merged

    def extract_output(self, acc):
        return acc


def _title_key(candidate: Tuple[str, int]):
    title, rows = candidate
    return (title == "", -rows, title)


def _best_title(tallies) -> str:
    """Most frequent non-empty title over (rows, titles) tallies of one item's pairs;
    ties -> lexicographically smallest title ("" if the item never had one)."""
    counts: Dict[str, int] = {}
    for rows, titles in tallies:
        if titles.__class__ is str:
            counts[titles] = counts.get(titles, 0) + rows
        else:
            for title, count in titles.items():
                counts[title] = counts.get(title, 0) + count
    return min(counts.items(), key=_title_key)[0] if counts else ""


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


# Node stat elements emitted by the graph stages (one small tuple per node and stage).
_QUERY_STAT, _ITEM_STAT, _QUERY_FINAL_STAT = 0, 1, 2


class _NodeStatsFn(beam.CombineFn):
    """All per-node counts of ``graph_stats`` in one pass over one tuple per node and stage:

    ``(_QUERY_STAT, rows, pairs, degree)`` per query of the log (``degree`` after the min
    weight, 0 if every pair was dropped), ``(_ITEM_STAT, degree, final_degree)`` per item
    with an edge and ``(_QUERY_FINAL_STAT, final_degree)`` per query with a kept edge.
    Integer histograms only, so the result is exact whatever the merge order; edge counts
    and capped-hub counts follow from them (a node is capped iff its degree > hub_cap).
    """

    def __init__(self, hub_cap: int, partial: bool = False, merge: bool = False):
        self._cap = hub_cap
        self._partial = partial  # output the accumulator (to be merged)
        self._merge = merge  # inputs are partial accumulators

    def create_accumulator(self):
        return [0, 0, {}, {}, {}, {}]  # rows, pairs, query/item degree, query/item final degree

    def add_input(self, acc, element):
        if self._merge:
            return self.merge_accumulators([acc, element])
        kind = element[0]
        if kind == _QUERY_STAT:
            acc[0] += element[1]
            acc[1] += element[2]
            if element[3]:
                acc[2][element[3]] = acc[2].get(element[3], 0) + 1
        elif kind == _ITEM_STAT:
            acc[3][element[1]] = acc[3].get(element[1], 0) + 1
            if element[2]:
                acc[5][element[2]] = acc[5].get(element[2], 0) + 1
        else:
            acc[4][element[1]] = acc[4].get(element[1], 0) + 1
        return acc

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            merged[0] += acc[0]
            merged[1] += acc[1]
            for j in range(2, 6):
                target = merged[j]
                for degree, count in acc[j].items():
                    target[degree] = target.get(degree, 0) + count
        return merged

    def extract_output(self, acc):
        if self._partial:
            return acc
        rows, pairs, query, item, query_final, item_final = acc
        edges = lambda hist: sum(d * c for d, c in hist.items())  # pylint: disable=unnecessary-lambda-assignment
        capped = lambda hist: sum(c for d, c in hist.items() if d > self._cap)  # pylint: disable=unnecessary-lambda-assignment
        return {
            "num_log_rows": rows,
            "edges.total": pairs,
            "edges.after_min_weight": edges(query),
            "edges.after_hub_cap": edges(item_final),
            f"degree.{QUERY}": degree_summary(query),
            f"degree.{ITEM}": degree_summary(item),
            f"degree_after_hub_cap.{QUERY}": degree_summary(query_final),
            f"degree_after_hub_cap.{ITEM}": degree_summary(item_final),
            f"capped_hubs.{QUERY}": capped(query),
            f"capped_hubs.{ITEM}": capped(item),
        }


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
def _tag(element, tag):
    return element[0], (tag, element[1])


def _lookup(tagged_values):
    """The single tag-0 value of a tagged group, or None (first pass over the iterable)."""
    for tag, value in tagged_values:
        if tag == 0:
            return value
    return None


def _tagged_join(label: str, lookup, main):
    """Groups ``lookup`` (few values per key, tag 0) with ``main`` (tag 1) by key; either
    may be a PCollection or a list of them.

    A Flatten+GroupByKey rather than CoGroupByKey: consumers scan the grouped iterable
    twice (find the lookup value, then stream the main values), so on Dataflow a hot key's
    values are paged from the shuffle instead of being materialised in lists.
    """
    def parts(pcolls, tag, name):
        pcolls = pcolls if isinstance(pcolls, (list, tuple)) else [pcolls]
        return [pcoll | f"{label}Tag{name}{j or ''}" >> beam.Map(_tag, tag)
                for j, pcoll in enumerate(pcolls)]

    return (parts(lookup, 0, "Lookup") + parts(main, 1, "Main")
            | f"{label}Flatten" >> beam.Flatten()
            | f"{label}Group" >> beam.GroupByKey())


# Neighbour lists travel between stages as one opaque byte string per node (pickled
# parallel tuples ``(ids, probabilities[, texts])`` sorted by id): a node's list is sent to
# each of its neighbours, and bytes are copied by the coders instead of re-encoded and
# re-decoded object by object. Query-side lists carry the item titles; item-side lists
# carry query ids, which are their own texts.
def _pack(*columns) -> bytes:
    return pickle.dumps(columns, protocol=pickle.HIGHEST_PROTOCOL)


_unpack = pickle.loads


def _table_record(side, order, node, neighbours):
    return {
        "side": side, "node_id": node, "metapath": metapath_name(side, order), "order": order,
        "neighbour_ids": [n[0] for n in neighbours],
        "neighbour_texts": [n[1] for n in neighbours],
        "neighbour_weights": [float(n[2]) for n in neighbours],
    }


def _rank(sums, top_n):
    """The top-N (-weight, end) of {end: weight | [weight, ...]} path weights (several
    weights are summed exactly). Ends are unique, so (-weight, end) is the total order of
    :func:`_rank_key`."""
    fsum = math.fsum
    ranked = [(-(fsum(value) if value.__class__ is list else value), end)
              for end, value in sums.items()]
    if len(ranked) > 4096:
        return heapq.nsmallest(top_n, ranked)
    ranked.sort()
    del ranked[top_n:]
    return ranked


def _ranked_record(side, order, node, ranked, texts):
    """Table record from :func:`_rank` output; ``texts`` maps ends to texts (None: the id
    is the text)."""
    ids = [end for _, end in ranked]
    return {
        "side": side, "node_id": node, "metapath": metapath_name(side, order), "order": order,
        "neighbour_ids": ids,
        "neighbour_texts": list(ids) if texts is None else [texts[end] for end in ids],
        "neighbour_weights": [-negative for negative, _ in ranked],
    }


def _two_step_states(sums_via, start, beam_width):
    """Order-2 walk states of ``start`` keyed by the node reached:
    (mid2, (start, total, ((mid1, weight), ...) sorted)), optionally the beam_width best."""
    states = []
    for mid2, via in sums_via.items():
        via = tuple(sorted(via))
        states.append((mid2, math.fsum(weight for _, weight in via), via))
    if beam_width:
        states = _top(states, beam_width, _state_rank_key)
    return [(mid2, (start, total, via)) for mid2, total, via in states]


# --------------------------------------------------------------------------------------
# Graph construction and expansion
# --------------------------------------------------------------------------------------
class _Tags:
    TITLES = "titles"
    STATS = "stats"
    CAPPED = "capped"
    TABLES = "tables"
    CC_LABELS = "cc_labels"
    CC_PAIRS = "cc_pairs"
    CC_STATE = "cc_state"
    CC_MESSAGES = "cc_messages"
    ADJACENCY = "adjacency"
    STATES = "states"
    PENDING = "pending"
    TITLE_REQUESTS = "title_requests"


def _capped_record(side, node, degree, kept):
    return {"side": side, "node_id": node, "original_degree": degree, "kept_degree": kept}


def _top_edges(edges, cap):
    """The ``cap`` edges a node keeps (by _cap_key) in one pass, in memory O(cap)."""
    top = []
    for edge in edges:
        top.append(edge)
        if len(top) >= 2 * cap:
            top.sort(key=_cap_key)
            del top[cap:]
    top.sort(key=_cap_key)
    del top[cap:]
    return top


# Tagged outputs defeat Beam's output type inference; declare Any.
@beam.typehints.with_output_types(Any)
class _CapQueriesFn(beam.DoFn):
    """Per query: its aggregated pairs ({item: counts}, :class:`_QueryPairsFn`). Weighs
    them, drops light edges, counts the query's degree, picks the ``hub_cap`` edges it keeps
    and sends every pair to its item as (item, (query, weight, kept_by_query, rows,
    titles)); weight is None for a dropped pair (which still counts towards the item's
    title)."""

    def __init__(self, config: GraphConfig):
        self._config = config
        self._cap = config.hub_cap
        self._min_weight = config.min_edge_weight
        self._capped = Metrics.counter(_METRICS_NS, f"capped_{QUERY}_hubs")

    def process(self, element):
        query, counts = element
        config, min_weight = self._config, self._min_weight
        pairs = []
        rows = degree = 0
        for item, (impressions, clicks, purchases, n, titles) in counts.items():
            weight = edge_weight(impressions, clicks, purchases, config)
            rows += n
            if weight > 0 and weight >= min_weight:
                degree += 1
            else:
                weight = None
            pairs.append((item, weight, n, titles))
        yield pvalue.TaggedOutput(_Tags.STATS, (_QUERY_STAT, rows, len(pairs), degree))
        kept = None
        if degree > self._cap:
            kept = {item for item, _ in _top_edges(
                ((item, weight) for item, weight, _, _ in pairs if weight is not None), self._cap)}
            self._capped.inc()
            yield pvalue.TaggedOutput(_Tags.CAPPED, _capped_record(QUERY, query, degree, len(kept)))
        for item, weight, n, titles in pairs:
            yield item, (query, weight, weight is not None and (kept is None or item in kept),
                         n, titles)


# Tagged outputs defeat Beam's output type inference; declare Any.
@beam.typehints.with_output_types(Any)
class _ItemNodeFn(beam.DoFn):
    """Per item: all its pairs (query, weight | None, kept_by_query, rows, titles). Chooses
    the item's title, caps the item, keeps the edges both ends kept, and emits the item's
    order-1 table, its neighbour list (for order 3 through it) and, to each kept query,
    (query, (item, weight, title, packed item neighbour list))."""

    def __init__(self, config: GraphConfig):
        self._cap = config.hub_cap
        self._top_n = config.top_n
        self._max_order = config.max_order
        self._rounds = config.cc_rounds if config.compute_components else 0
        self._capped = Metrics.counter(_METRICS_NS, f"capped_{ITEM}_hubs")

    def process(self, element):
        item, pairs = element
        title = _best_title((pair[3], pair[4]) for pair in pairs)
        yield pvalue.TaggedOutput(_Tags.TITLES, (item, title))
        degree = 0
        for pair in pairs:
            if pair[1] is not None:
                degree += 1
        if not degree:
            return
        edges = (pair for pair in pairs if pair[1] is not None)
        if degree > self._cap:
            top = _top_edges(edges, self._cap)
            self._capped.inc()
            yield pvalue.TaggedOutput(_Tags.CAPPED, _capped_record(ITEM, item, degree, len(top)))
        else:
            top = edges
        kept = sorted((edge[0], edge[1]) for edge in top if edge[2])
        yield pvalue.TaggedOutput(_Tags.STATS, (_ITEM_STAT, degree, len(kept)))
        if not kept:
            return
        ids = tuple(query for query, _ in kept)
        total = math.fsum(weight for _, weight in kept)
        probs = tuple(weight / total for _, weight in kept)
        if self._max_order >= 1:
            yield pvalue.TaggedOutput(_Tags.TABLES, _table_record(
                ITEM, 1, item, _top(list(zip(ids, ids, probs)), self._top_n, _rank_key)))
        packed = None
        if self._max_order >= 2:
            packed = _pack(ids, probs)
            if self._max_order >= 3:
                yield pvalue.TaggedOutput(_Tags.ADJACENCY, (item, packed))
        label = None
        if self._rounds:
            # Components, round 1 for the item (it hears itself and its queries).
            heard = {"q" + query for query in ids}
            heard.add("i" + item)
            label = min(heard)
            if self._rounds == 1:
                yield from _final_label(heard)
        for query, weight in kept:
            yield query, (item, weight, title, packed, label)


# Tagged outputs defeat Beam's output type inference; declare Any.
@beam.typehints.with_output_types(Any)
class _QueryNodeFn(beam.DoFn):
    """Per query: its kept edges (item, weight, title, packed item list). Emits the q-i and
    q-i-q tables (order 2 summed per end node here, from the items' neighbour lists), the
    order-2 states for q-i-q-i, and to each item (item, (query, weight, packed query
    list)) for the item side's order 2, on the item's shard output (_list_shard_tag)."""

    def __init__(self, config: GraphConfig):
        self._top_n = config.top_n
        self._max_order = config.max_order
        self._beam_width = config.order3_beam_width
        self._rounds = config.cc_rounds if config.compute_components else 0
        self._to_items = _needs_item_lists(config)
        self._paths = Metrics.counter(_METRICS_NS, "walk_paths")

    def process(self, element):
        query, edges = element
        edges = sorted(edges, key=_first)
        yield pvalue.TaggedOutput(_Tags.STATS, (_QUERY_FINAL_STAT, len(edges)))
        ids = tuple(edge[0] for edge in edges)
        total = math.fsum(edge[1] for edge in edges)
        probs = tuple(edge[1] / total for edge in edges)
        labels = ()
        if self._rounds:
            # Components, rounds 1 and 2 for the query (its items sent their round-1 labels).
            own = "q" + query
            heard = {"i" + item for item in ids}
            heard.add(own)
            label_1 = min(heard)
            if self._rounds == 1:
                yield from _final_label(heard)
            else:
                heard = {edge[4] for edge in edges}
                heard.add(label_1)
                label_2 = min(heard)
                if self._rounds == 2:
                    yield from _final_label(heard)
                elif self._rounds > 2:
                    yield pvalue.TaggedOutput(_Tags.CC_STATE, (own, label_2))
                labels = (label_1, label_2)
        # The query's items heaviest first (the order of its q-i table).
        ranked = sorted(range(len(edges)), key=lambda j: (-probs[j], ids[j]))
        if self._max_order >= 1:
            yield pvalue.TaggedOutput(_Tags.TABLES, _table_record(
                QUERY, 1, query, [(ids[j], edges[j][2], probs[j]) for j in ranked[:self._top_n]]))
        packed = None
        if self._max_order >= 2:
            # For the items' i-q-i tables: the whole list, but titles only for the
            # top_n + 1 heaviest items (an item's top-N related items nearly always are
            # among them; the rare others are looked up, see _ItemOrderTwoFn). This keeps
            # most titles out of the largest shuffle, whose volume is
            # sum(degree(query)**2).
            packed = _pack(tuple(ids[j] for j in ranked), tuple(probs[j] for j in ranked),
                           tuple(edges[j][2] for j in ranked[:self._top_n + 1]))
        if self._to_items:
            for edge in edges:
                yield pvalue.TaggedOutput(_list_shard_tag(edge[0]),
                                          (edge[0], (query, edge[1], packed) + labels))
        if self._max_order < 2:
            return
        if self._max_order >= 3:
            yield pvalue.TaggedOutput(_Tags.ADJACENCY, (
                query, _pack(ids, probs, tuple(edge[2] for edge in edges))))
        yield from _order_two(QUERY, query, probs, (edge[3] for edge in edges), self._top_n,
                              self._max_order, self._beam_width, self._paths, mids=ids)


# The query lists sent to items (for i-q-i) are the largest shuffle of the build: sum over
# queries of degree**2 entries. They go through _LIST_SHARDS independent GroupByKeys, by a
# stable hash of the item. Any runner computes the same thing either way; runners that
# hold a whole shuffle stage's input in memory (the DirectRunner keeps several encoded
# copies of it while handing it to a worker) then hold one shard at a time, not all.
_LIST_SHARDS = 8
_LIST_SHARD_TAGS = tuple(f"to_items_{j}" for j in range(_LIST_SHARDS))


def _list_shard_tag(item: str) -> str:
    return _LIST_SHARD_TAGS[zlib.crc32(item.encode("utf-8", "surrogatepass")) % _LIST_SHARDS]


def _needs_item_lists(config: GraphConfig) -> bool:
    """Whether queries send their lists/labels to their items (_ItemOrderTwoFn)."""
    return config.max_order >= 2 or (config.compute_components and config.cc_rounds >= 2)


def _first(edge):
    return edge[0]


_TITLE_LOOKUPS = Metrics.counter(_METRICS_NS, "title_lookups")


def _order_two(side, start, probs, packed_lists, top_n, max_order, beam_width, paths_counter,
               mids):
    """Order-2 table of ``start`` (and its order-2 states if max_order >= 3) from the
    packed neighbour lists of its neighbours: weight(end) = sum over mid of
    P(mid|start) * P(end|mid), end != start, summed exactly."""
    sums: Dict[str, Any] = {}
    get = sums.get
    texts = None
    states = max_order >= 3
    count = 0
    for mid, p_mid, packed in zip(mids, probs, packed_lists):
        columns = _unpack(packed)
        if len(columns) == 3:  # query lists: titles of the first (heaviest) items
            ids, end_probs, end_texts = columns
            if texts is None:
                texts = {}
            texts.update(zip(ids, end_texts))
        else:
            ids, end_probs = columns
        count += len(ids)
        # sums[end]: one path weight, or a list of them (summed exactly when ranking);
        # (mid, weight) pairs when the order-2 states are needed.
        if not sums and not states:  # first list: its ends are distinct
            sums.update(zip(ids, [p_mid * p for p in end_probs]))
            continue
        for end, p in zip(ids, end_probs):
            value = (mid, p_mid * p) if states else p_mid * p
            previous = get(end)
            if previous is None:
                sums[end] = value
            elif previous.__class__ is list:
                previous.append(value)
            else:
                sums[end] = [previous, value]
    # Non-backtracking: a 2-walk may not return to the start (it is in every mid's list).
    if sums.pop(start, None) is not None:
        count -= len(mids)
    paths_counter.inc(count)
    if not sums:
        return
    if states:
        via_by_end = {end: (value if value.__class__ is list else [value])
                      for end, value in sums.items()}
        sums = {end: [weight for _, weight in via] for end, via in via_by_end.items()}
        for state in _two_step_states(via_by_end, start, beam_width):
            yield pvalue.TaggedOutput(_Tags.STATES, state)
    ranked = _rank(sums, top_n)
    if texts is not None:
        missing = [end for _, end in ranked if end not in texts]
        if missing:
            # Titles not shipped with the lists: look them up (_CompleteTitles).
            _TITLE_LOOKUPS.inc(len(missing))
            for end in missing:
                yield pvalue.TaggedOutput(_Tags.TITLE_REQUESTS, (end, start))
            yield pvalue.TaggedOutput(_Tags.PENDING, (
                start, (tuple(ranked), tuple(texts.get(end) for _, end in ranked))))
            return
    yield pvalue.TaggedOutput(_Tags.TABLES, _ranked_record(side, 2, start, ranked, texts))


# Tagged outputs defeat Beam's output type inference; declare Any.
@beam.typehints.with_output_types(Any)
class _ItemOrderTwoFn(beam.DoFn):
    """Per item: (query, weight, packed query list[, round-1 and round-2 labels]) from each
    kept query -> the i-q-i table, the order-2 states for i-q-i-q and components rounds 2
    and 3 for the item."""

    def __init__(self, config: GraphConfig):
        self._top_n = config.top_n
        self._max_order = config.max_order
        self._beam_width = config.order3_beam_width
        self._rounds = config.cc_rounds if config.compute_components else 0
        self._paths = Metrics.counter(_METRICS_NS, "walk_paths")

    def process(self, element):
        item, edges = element
        edges = sorted(edges, key=_first)
        if self._rounds >= 2:
            yield from _item_rounds(item, edges, self._rounds)
        if self._max_order < 2:
            return
        total = math.fsum(edge[1] for edge in edges)
        probs = [edge[1] / total for edge in edges]
        yield from _order_two(ITEM, item, probs, (edge[2] for edge in edges), self._top_n,
                              self._max_order, self._beam_width, self._paths,
                              mids=[edge[0] for edge in edges])


def _item_rounds(item, edges, rounds):
    """Components rounds 2 and 3 for an item, from its queries' round-1 and round-2 labels
    (edge[3], edge[4]); sends (round-2, round-3) labels on if the queries need them."""
    own = "i" + item
    label_1 = min(min("q" + edge[0] for edge in edges), own)
    heard = {edge[3] for edge in edges}
    heard.add(label_1)
    label_2 = min(heard)
    if rounds == 2:
        yield from _final_label(heard)
        return
    heard = {edge[4] for edge in edges}
    heard.add(label_2)
    label_3 = min(heard)
    if rounds == 3:
        yield from _final_label(heard)
    else:
        yield pvalue.TaggedOutput(_Tags.CC_STATE, (own, label_3))
    for edge in edges:
        yield pvalue.TaggedOutput(_Tags.CC_MESSAGES, ("q" + edge[0], (own, label_2, label_3)))


def _answer_titles(element):
    """(item, [title (tag 0), requesting start (tag 1), ...]) -> (start, (item, title))."""
    item, tagged = element
    title = _lookup(tagged)
    for tag, start in tagged:
        if tag == 1:
            yield start, (item, "" if title is None else title)


def _complete_record(element):
    """(start, [pending ranked ends and known texts (tag 0), (item, title) answers (tag 1)])
    -> the i-q-i record."""
    start, tagged = element
    ranked, known = _lookup(tagged)
    texts = {end: text for (_, end), text in zip(ranked, known) if text is not None}
    for tag, value in tagged:
        if tag == 1:
            texts[value[0]] = value[1]
    return _ranked_record(ITEM, 2, start, ranked, texts)


def _complete_titles(label: str, pending, requests, titles):
    """i-q-i records whose top-N included items without a shipped title: one lookup join
    against (item, title), then one join back to the pending record. ``pending`` and
    ``requests`` may be lists of PCollections."""
    answers = (_tagged_join(f"{label}Lookup", titles, requests)
               | f"{label}Answer" >> beam.FlatMap(_answer_titles))
    return (_tagged_join(f"{label}Attach", pending, answers)
            | f"{label}Records" >> beam.Map(_complete_record))


# Tagged outputs defeat Beam's output type inference; declare Any.
@beam.typehints.with_output_types(Any)
class _ShipListFn(beam.DoFn):
    """Order-3 step, part 1: at ``mid2``, attaches its packed neighbour list (tag 0) to
    every order-2 state (start, total, via) that reached it (tag 1), keyed by start."""

    def process(self, element):
        _, tagged = element
        packed = _lookup(tagged)
        if packed is None:
            return
        for tag, state in tagged:
            if tag == 1:
                start, total, via = state
                yield start, (total, via, packed)


class _OrderThreeFn(beam.DoFn):
    """Order-3 step, part 2, per start: for each order-2 state (total, via) at mid2 and
    each neighbour ``end`` of mid2, the third step continues the whole total unless end is
    one of the ``via`` first-hop nodes, whose own share is then left out (an exact fsum of
    the others: non-backtracking). One contribution per (start, mid2, end); contributions
    are summed exactly per end and ranked."""

    def __init__(self, side: str, top_n: int):
        self._side = side
        self._top_n = top_n
        self._contributions = Metrics.counter(_METRICS_NS, "order3_contributions")

    def process(self, element):
        start, states = element
        sums: Dict[str, Any] = {}
        texts = None
        emitted = 0
        get = sums.get
        for total, via, packed in states:
            columns = _unpack(packed)
            if len(columns) == 3:
                ids, end_probs, end_texts = columns
                if texts is None:
                    texts = {}
                texts.update(zip(ids, end_texts))
            else:
                ids, end_probs = columns
            via_ids = {mid1 for mid1, _ in via}
            for end, p in zip(ids, end_probs):
                if end in via_ids:
                    weight = math.fsum(w for mid1, w in via if mid1 != end)
                    if weight <= 0:
                        continue
                else:
                    weight = total
                emitted += 1
                value = weight * p
                previous = get(end)
                if previous is None:
                    sums[end] = value
                elif previous.__class__ is list:
                    previous.append(value)
                else:
                    sums[end] = [previous, value]
        self._contributions.inc(emitted)
        if sums:
            yield _ranked_record(self._side, 3, start, _rank(sums, self._top_n), texts)


def _order_three(label: str, states, packed_lists, side: str, top_n: int):
    """q-i-q-i / i-q-i-q tables from the order-2 states keyed by mid2 (a PCollection or a
    list of them) and the packed neighbour lists of the mid2 side."""
    return (_tagged_join(f"{label}AttachLists", packed_lists, states)
            | f"{label}ShipLists" >> beam.ParDo(_ShipListFn())
            | f"{label}GroupByStart" >> beam.GroupByKey()
            | f"{label}Rank" >> beam.ParDo(_OrderThreeFn(side, top_n)))


# --------------------------------------------------------------------------------------
# Connected components
# --------------------------------------------------------------------------------------
# Components: synchronous min-label propagation. Node labels are "q" + query and "i" +
# item; L0(v) = v, H_r(v) = {L_{r-1}(u) : u = v or a neighbour of v}, L_r(v) = min H_r(v).
# Every edge of the capped graph is already crossed by the graph stages (item -> query ->
# item), so those messages carry the labels: items get H1 in _ItemNodeFn, queries H1 and
# H2 in _QueryNodeFn, items H2 and H3 in _ItemOrderTwoFn. Later rounds alternate sides in
# _LabelExchangeFn, two rounds per exchange. After ``cc_rounds`` rounds every node
# emits its label L_R and the pairs (L_R, x) for each label x in H_R; a union-find over
# those pairs merges labels that met (exact for any number of rounds).
def _final_label(heard):
    label = min(heard)
    yield pvalue.TaggedOutput(_Tags.CC_LABELS, label)
    for other in sorted(heard):
        if other != label:
            yield pvalue.TaggedOutput(_Tags.CC_PAIRS, (label, other))


# Tagged outputs defeat Beam's output type inference; declare Any.
@beam.typehints.with_output_types(Any)
class _LabelExchangeFn(beam.DoFn):
    """Rounds a + 1 and a + 2 for one side: per node, its label L_a (tag 0) and, from each
    neighbour u, (u, L_a(u), L_{a+1}(u)) (tag 1). Emits the final label (if cc_rounds is
    a + 1 or a + 2), (L_{a+1}, L_{a+2}) to the neighbours if they need more rounds, and
    L_{a+2} as the node's state for its next exchange."""

    def __init__(self, rounds: int, a: int):
        self._rounds = rounds
        self._a = a

    def process(self, element):
        node, tagged = element
        label = _lookup(tagged)
        neighbours = [value for tag, value in tagged if tag == 1]
        heard = {value[1] for value in neighbours}
        heard.add(label)
        label_1 = min(heard)
        if self._rounds == self._a + 1:
            yield from _final_label(heard)
        else:
            heard = {value[2] for value in neighbours}
            heard.add(label_1)
            label_2 = min(heard)
            if self._rounds == self._a + 2:
                yield from _final_label(heard)
            else:
                yield pvalue.TaggedOutput(_Tags.CC_STATE, (node, label_2))
            for value in neighbours:
                yield pvalue.TaggedOutput(_Tags.CC_MESSAGES, (value[0], (node, label_1, label_2)))


def _resolve_label(element, roots):
    label, size = element
    return roots.get(label, label), size


def _connected_components(label: str, rounds: int, state_query, state_item, messages,
                          labels, pairs):
    """{num_components, largest_component_size} from the graph stages' component outputs:
    the remaining exchanges (rounds 4.. need them; see above), then the union-find finish.
    ``labels`` and ``pairs`` are lists of PCollections, extended here."""
    states = {QUERY: state_query, ITEM: state_item}
    side, a = QUERY, 2
    while rounds > a:
        exchange = (_tagged_join(f"{label}Exchange{a + 1}", states[side], messages)
                    | f"{label}Rounds{a + 1}" >> beam.ParDo(_LabelExchangeFn(rounds, a)).with_outputs(
                        _Tags.CC_LABELS, _Tags.CC_PAIRS, _Tags.CC_STATE, _Tags.CC_MESSAGES))
        labels.append(exchange[_Tags.CC_LABELS])
        pairs.append(exchange[_Tags.CC_PAIRS])
        states[side] = exchange[_Tags.CC_STATE]
        messages = exchange[_Tags.CC_MESSAGES]
        side, a = _OTHER[side], a + 1
    roots = (pairs
             | f"{label}FlattenPairs" >> beam.Flatten()
             | f"{label}DistinctPairs" >> beam.Distinct()
             | f"{label}UnionFind" >> beam.CombineGlobally(_UnionFindFn()))
    return (labels
            | f"{label}FlattenLabels" >> beam.Flatten()
            | f"{label}LabelSizes" >> beam.combiners.Count.PerElement()
            | f"{label}ResolveLabels" >> beam.Map(_resolve_label, beam.pvalue.AsSingleton(roots))
            | f"{label}ComponentSizes" >> beam.CombinePerKey(sum)
            | f"{label}Sizes" >> beam.Map(lambda kv: kv[1])
            | f"{label}Summarise" >> beam.CombineGlobally(_ComponentSummaryFn()))


# --------------------------------------------------------------------------------------
# Stats
# --------------------------------------------------------------------------------------
def _finalise_stats(pieces: Mapping[str, Any], config: GraphConfig) -> Dict[str, Any]:
    """The ``graph_stats`` dict. Keys:

    num_log_rows, num_invalid_rows; edges {total, after_min_weight, after_hub_cap};
    nodes {query, item} (after min weight) and nodes_after_hub_cap; degree and
    degree_after_hub_cap {query, item: :func:`degree_summary`}; capped_hubs {query, item,
    total}; nodes_without_tables {query, item, query_impressions, item_impressions,
    num_impressions} (how many nodes ``table_min_impressions`` left without tables, their
    impressions, and the log's; zeros without a bound); connected_components {computed, rounds, num_components,
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
        "nodes_without_tables": dict(
            {side: get(f"nodes_without_tables.{side}") for side in SIDES},
            **{f"{side}_impressions": get(f"nodes_without_tables.{side}_impressions")
               for side in SIDES},
            num_impressions=get("num_impressions")),
        "connected_components": dict(
            components, computed=config.compute_components, rounds=config.cc_rounds),
        "config": config.to_dict(),
    }


def _named(pcoll, name: str):
    return pcoll | f"Stat[{name}]" >> beam.Map(lambda value: (name, value))


def _node_impressions(keyed_row):
    query, (item_id, impressions, _clicks, _purchases, _title) = keyed_row
    yield (QUERY, query), impressions
    yield (ITEM, item_id), impressions


# Tagged outputs defeat Beam's output type inference; declare Any.
@beam.typehints.with_output_types(Any)
class _KeepBusyNodeTablesFn(beam.DoFn):
    """``((side, node), [(0, impressions)..., (1, record)...])`` -> the node's table records
    if its impressions sum to at least ``min_impressions``; otherwise none, and
    ``(side, impressions)`` once to ``DROPPED`` (for ``graph_stats``)."""

    DROPPED = "dropped"

    def __init__(self, min_impressions: int):
        self._min_impressions = min_impressions
        self._dropped = Metrics.counter(_METRICS_NS, "nodes_without_tables_below_min_impressions")

    def process(self, element):
        (side, _), tagged = element
        impressions = sum(value for tag, value in tagged if tag == 0)
        busy = impressions >= self._min_impressions
        dropped = False
        for tag, record in tagged:
            if tag != 1:
                continue
            if busy:
                yield record
            else:
                dropped = True
        if dropped:
            self._dropped.inc()
            yield pvalue.TaggedOutput(self.DROPPED, (side, impressions))


def _sum_pairs(pairs):
    count = total = 0
    for c, t in pairs:
        count, total = count + c, total + t
    return count, total


def _busy_node_tables(label: str, tables, keyed_rows, min_impressions: int):
    """(the records of nodes logged with >= min_impressions impressions, ``graph_stats``
    pieces: per side the number of nodes whose records were dropped and their impressions,
    and the log's impressions in all). Every logged node has a volume, so a record always
    meets its node's."""
    volumes = (keyed_rows
               | f"{label}NodeImpressions" >> beam.FlatMap(_node_impressions)
               | f"{label}SumImpressions" >> beam.CombinePerKey(sum))
    keyed_tables = tables | f"{label}KeyTables" >> beam.Map(
        lambda r: ((r["side"], r["node_id"]), r))
    kept = (_tagged_join(label, volumes, keyed_tables)
            | f"{label}Keep" >> beam.ParDo(_KeepBusyNodeTablesFn(min_impressions)).with_outputs(
                _KeepBusyNodeTablesFn.DROPPED, main="tables"))
    dropped = (kept[_KeepBusyNodeTablesFn.DROPPED]
               | f"{label}DroppedCounts" >> beam.Map(lambda d: (d[0], (1, d[1])))
               | f"{label}SumDropped" >> beam.CombinePerKey(_sum_pairs)
               | f"{label}DroppedStats" >> beam.FlatMap(lambda kv: [
                   (f"nodes_without_tables.{kv[0]}", kv[1][0]),
                   (f"nodes_without_tables.{kv[0]}_impressions", kv[1][1])]))
    # Each impression counts once per side: the query side's sum is the log's total.
    total = (volumes
             | f"{label}QueryVolumes" >> beam.FlatMap(
                 lambda kv: [kv[1]] if kv[0][0] == QUERY else [])
             | f"{label}TotalImpressions" >> beam.CombineGlobally(sum)
             | f"{label}TotalStat" >> beam.Map(lambda n: ("num_impressions", n)))
    return kept.tables, (dropped, total) | f"{label}Stats" >> beam.Flatten()


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
        queries = (parsed.valid
                   | "AggregatePairs" >> beam.CombinePerKey(_QueryPairsFn())
                   | "CapQueries" >> beam.ParDo(_CapQueriesFn(cfg)).with_outputs(
                       _Tags.STATS, _Tags.CAPPED, main="pairs"))
        items = (queries.pairs
                 | "GroupPairsByItem" >> beam.GroupByKey()
                 | "ItemNodes" >> beam.ParDo(_ItemNodeFn(cfg)).with_outputs(
                     _Tags.TITLES, _Tags.STATS, _Tags.CAPPED, _Tags.TABLES, _Tags.ADJACENCY,
                     _Tags.CC_LABELS, _Tags.CC_PAIRS, main="to_queries"))
        titles = items[_Tags.TITLES]
        query_nodes = (items.to_queries
                       | "GroupEdgesByQuery" >> beam.GroupByKey()
                       | "QueryNodes" >> beam.ParDo(_QueryNodeFn(cfg)).with_outputs(
                           _Tags.STATS, _Tags.TABLES, _Tags.ADJACENCY, _Tags.STATES,
                           _Tags.CC_LABELS, _Tags.CC_PAIRS, _Tags.CC_STATE, *_LIST_SHARD_TAGS))
        item_lists = {tag: [] for tag in (_Tags.TABLES, _Tags.STATES, _Tags.PENDING,
                                          _Tags.TITLE_REQUESTS, _Tags.CC_LABELS, _Tags.CC_PAIRS,
                                          _Tags.CC_STATE, _Tags.CC_MESSAGES)}
        if _needs_item_lists(cfg):
            for j, shard in enumerate(_LIST_SHARD_TAGS):
                outputs = (query_nodes[shard]
                           | f"GroupListsByItem{j}" >> beam.GroupByKey()
                           | f"ItemOrderTwo{j}" >> beam.ParDo(_ItemOrderTwoFn(cfg)).with_outputs(
                               *item_lists))
                for tag, parts in item_lists.items():
                    parts.append(outputs[tag])
        # Lists of PCollections are flattened only where consumed: a Flatten of Flattens
        # costs the DirectRunner one more buffered copy.

        if cfg.max_order >= 1:
            table_parts = [items[_Tags.TABLES], query_nodes[_Tags.TABLES]]
            if cfg.max_order >= 2:
                table_parts.extend(item_lists[_Tags.TABLES])
                table_parts.append(_complete_titles(
                    "CompleteItemTitles", item_lists[_Tags.PENDING],
                    item_lists[_Tags.TITLE_REQUESTS], titles))
            if cfg.max_order >= 3:
                table_parts.append(_order_three(
                    "QueryOrderThree", query_nodes[_Tags.STATES], query_nodes[_Tags.ADJACENCY],
                    QUERY, cfg.top_n))
                table_parts.append(_order_three(
                    "ItemOrderThree", item_lists[_Tags.STATES], items[_Tags.ADJACENCY],
                    ITEM, cfg.top_n))
            tables = table_parts | "FlattenTables" >> beam.Flatten()
        else:
            tables = rows.pipeline | "NoTables" >> beam.Create([])
        table_stats = None
        if cfg.table_min_impressions > 0:
            tables, table_stats = _busy_node_tables(
                "BusyNodeTables", tables, parsed.valid, cfg.table_min_impressions)

        capped_hubs = ((queries[_Tags.CAPPED], items[_Tags.CAPPED])
                       | "FlattenCapped" >> beam.Flatten())
        # Node stats: one partial combine per producing stage (no Flatten of the per-node
        # elements), merged into the stat pieces.
        node_stats = ([stage[_Tags.STATS] | f"{name}Stats" >> beam.CombineGlobally(
                           _NodeStatsFn(cfg.hub_cap, partial=True))
                       for name, stage in (("Query", queries), ("Item", items),
                                           ("QueryFinal", query_nodes))]
                      | "FlattenNodeStats" >> beam.Flatten()
                      | "NodeStats" >> beam.CombineGlobally(_NodeStatsFn(cfg.hub_cap, merge=True))
                      | "NodeStatPieces" >> beam.FlatMap(lambda pieces: sorted(pieces.items())))
        pieces = [
            node_stats,
            _named(parsed[_NormaliseRowFn.INVALID] | "CountInvalid" >> beam.combiners.Count.Globally(),
                   "num_invalid_rows"),
        ]
        if table_stats is not None:
            pieces.append(table_stats)
        if cfg.compute_components:
            components = _connected_components(
                "Components", cfg.cc_rounds, query_nodes[_Tags.CC_STATE],
                item_lists[_Tags.CC_STATE] or None, item_lists[_Tags.CC_MESSAGES],
                labels=[stage[_Tags.CC_LABELS] for stage in (items, query_nodes)]
                + item_lists[_Tags.CC_LABELS],
                pairs=[stage[_Tags.CC_PAIRS] for stage in (items, query_nodes)]
                + item_lists[_Tags.CC_PAIRS])
            pieces.append(_named(components, "connected_components"))
        stats = (pieces
                 | "FlattenStats" >> beam.Flatten()
                 | "CollectStats" >> beam.CombineGlobally(_CollectStatsFn())
                 | "FinaliseStats" >> beam.Map(_finalise_stats, cfg))
        return NeighbourContexts(
            neighbour_tables=tables, graph_stats=stats, capped_hubs=capped_hubs,
            item_titles=titles)


def _example_key(example: Mapping[str, Any], key: str) -> str:
    return _as_text(example.get(key))


class _AttachContextsFn(beam.DoFn):
    def __init__(self, side: str, max_order: int, exclude_pair: bool, other_key: str):
        self._side = side
        self._max_order = max_order
        self._exclude_pair = exclude_pair
        self._other_key = other_key

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
            other = _example_key(example, self._other_key)
            for order in range(1, self._max_order + 1):
                prefix = feature_prefix(self._side, order)
                record = by_order.get(order)
                entries = (list(zip(record["neighbour_ids"], record["neighbour_texts"],
                                    record["neighbour_weights"])) if record else [])
                if self._exclude_pair and order == 1:
                    entries = [e for e in entries if e[0] != other]
                out[f"{prefix}_ids"] = [e[0] for e in entries]
                out[f"{prefix}_texts"] = [e[1] for e in entries]
                out[f"{prefix}_weights"] = [e[2] for e in entries]
            yield out


class JoinContexts(beam.PTransform):
    """Example dicts -> the same dicts plus the query's and item's neighbour contexts.

    Applied to examples with ``query_key`` / ``item_key`` fields; ``neighbour_tables`` is the
    output of :class:`ComputeNeighbourContexts`. Adds the features listed by
    :func:`joined_feature_names` (empty lists where a context is missing), leaving the
    input dicts unmodified. Two keyed shuffles (by query, then by item) whose grouped
    iterables are streamed, so a hot query does not need all its examples in memory.

    With ``exclude_pair`` (the default) a pair is not its own context: the example's item is
    dropped from its query's order-1 list and its query from its item's. Otherwise every
    logged pair would find itself among its neighbours, a model would learn to lean on that,
    and a query or item never logged (which has no such neighbour) would be scored worse.
    BERM-O's in-model lookup drops the same entries (trainer/berm_serving.py).
    """

    def __init__(self, neighbour_tables, max_order: int, query_key: str = "query",
                 item_key: str = "item_id", label: Optional[str] = None, exclude_pair: bool = True):
        super().__init__(label)
        self._exclude_pair = exclude_pair
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
                   | f"Attach{name}" >> beam.ParDo(_AttachContextsFn(
                       side, self._max_order, self._exclude_pair,
                       self._keys[ITEM if side == QUERY else QUERY])))
        return out
