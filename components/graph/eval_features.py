"""Evaluation features of judged pairs: the binary label and the slices TFMA reports by.

GraphContexts adds them to the judgment examples because most of them describe a pair's place in
the behaviour graph, which only the logs know:

  relevant       1.0 if relevance >= relevant_threshold else 0.0: the label of AUC and calibration.
  gain           relevance - relevance_min: the NDCG gain, so an item at the bottom of the
                 scale adds nothing (as in benchmarks/relevance_metrics.py).
  query_segment  head / torso / tail by the query's log volume (impressions): head is the busiest
                 queries that together hold `head_share` of all impressions, torso the next
                 `torso_share`, tail the rest; `unlogged` for a query absent from the logs.
  item_degree    the item's number of distinct logged queries, bucketed by `item_degree_edges`
                 ((1, 2, 5) gives "0", "1", "2-4", "5+").
  graph_context  `warm` if the pair has any neighbour context, else `cold` (the student falls
                 back to its 0-order path).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np

from components.graph import metapaths

RELEVANT = "relevant"
GAIN = "gain"
QUERY_SEGMENT = "query_segment"
ITEM_DEGREE = "item_degree"
GRAPH_CONTEXT = "graph_context"
SLICE_FEATURES = (QUERY_SEGMENT, ITEM_DEGREE, GRAPH_CONTEXT)
HEAD, TORSO, TAIL, UNLOGGED = "head", "torso", "tail", "unlogged"
WARM, COLD = "warm", "cold"


@dataclasses.dataclass(frozen=True)
class EvalFeatureConfig:
    relevant_threshold: float = 2.33
    relevance_min: float = 1.0
    head_share: float = 0.5
    torso_share: float = 0.3
    item_degree_edges: Tuple[int, ...] = (1, 2, 5)

    def __post_init__(self):
        if not (0 < self.head_share and 0 <= self.torso_share and self.head_share + self.torso_share <= 1):
            raise ValueError(f"head_share ({self.head_share}) and torso_share ({self.torso_share}) "
                             "must be shares of traffic: head_share > 0, sum <= 1")
        edges = tuple(self.item_degree_edges)
        if not edges or any(e < 1 for e in edges) or list(edges) != sorted(set(edges)):
            raise ValueError(f"item_degree_edges must be increasing whole numbers >= 1, got {edges}")
        object.__setattr__(self, "item_degree_edges", tuple(int(e) for e in edges))

    def to_dict(self) -> Dict[str, Any]:
        values = dataclasses.asdict(self)
        values["item_degree_edges"] = list(self.item_degree_edges)
        return values


def is_relevant(relevance: float, threshold: float) -> bool:
    """relevance >= threshold, compared in float32.

    Judgments travel as float32 in tf.Example, so a judged 2.33 arrives as 2.3299999; against the
    float64 threshold 2.33 it would not count as relevant. Both sides at the stored precision.
    """
    return bool(np.float32(relevance) >= np.float32(threshold))


def degree_bucket(degree: int, edges: Sequence[int]) -> str:
    """(1, 2, 5): 0 -> "0", 1 -> "1", 2..4 -> "2-4", >= 5 -> "5+"."""
    if degree < edges[0]:
        return "0" if edges[0] == 1 else f"0-{edges[0] - 1}"
    for low, high in zip(edges, edges[1:]):
        if low <= degree < high:
            return str(low) if high == low + 1 else f"{low}-{high - 1}"
    return f"{edges[-1]}+"


def segment_thresholds(volume_counts: Mapping[int, int], head_share: float, torso_share: float
                       ) -> Tuple[float, float]:
    """(head_min, torso_min) volumes from {query volume: number of queries}.

    Queries are taken busiest first; the volume at which the cumulative share of impressions
    reaches head_share is the smallest head volume (queries tied at that volume are all head),
    likewise for torso at head_share + torso_share. No traffic at all: everything is tail.
    """
    total = sum(v * n for v, n in volume_counts.items() if v > 0)
    head_min = torso_min = float("inf")
    if total <= 0:
        return head_min, torso_min
    cumulative = 0
    for volume in sorted((v for v in volume_counts if v > 0), reverse=True):
        cumulative += volume * volume_counts[volume]
        share = cumulative / total
        if head_min == float("inf") and share >= head_share:
            head_min = volume
        if share >= head_share + torso_share:
            torso_min = volume
            break
    return head_min, torso_min


def query_segment(volume: Optional[int], thresholds: Tuple[float, float]) -> str:
    if volume is None:
        return UNLOGGED
    head_min, torso_min = thresholds
    if volume >= head_min:
        return HEAD
    if volume >= torso_min:
        return TORSO
    return TAIL


def has_context(example: Mapping[str, Any], max_order: int) -> bool:
    return any(example.get(f"{metapaths.feature_prefix(side, k)}_ids")
               for side in metapaths.SIDES for k in range(1, max_order + 1))


class _CountVolumes(beam.CombineFn):
    """{volume: number of queries} of (query, volume) pairs."""

    def create_accumulator(self):
        return {}

    def add_input(self, accumulator, element):
        accumulator[element[1]] = accumulator.get(element[1], 0) + 1
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[Dict[int, int]]):
        merged: Dict[int, int] = {}
        for accumulator in accumulators:
            for volume, count in accumulator.items():
                merged[volume] = merged.get(volume, 0) + count
        return merged

    def extract_output(self, accumulator):
        return accumulator


def _attach(element, field: str):
    _, grouped = element
    values = list(grouped["value"])
    for example in grouped["example"]:
        yield {**example, field: values[0] if values else None}


def _finalise(example: Dict[str, Any], thresholds, config: EvalFeatureConfig, max_order: int):
    out = dict(example)
    volume, degree = out.pop("_query_volume"), out.pop("_item_degree")
    relevance = float(out.get("relevance", 0.0))
    out[RELEVANT] = 1.0 if is_relevant(relevance, config.relevant_threshold) else 0.0
    out[GAIN] = max(0.0, relevance - config.relevance_min)
    out[QUERY_SEGMENT] = query_segment(volume, thresholds)
    out[ITEM_DEGREE] = degree_bucket(degree or 0, config.item_degree_edges)
    out[GRAPH_CONTEXT] = WARM if has_context(out, max_order) else COLD
    return out


class AttachEvalFeatures(beam.PTransform):
    """Judged example dicts (already joined with their contexts) -> the same plus the features above.

    `log_rows` are the canonical log rows the graph was built from.
    """

    def __init__(self, log_rows, config: EvalFeatureConfig, max_order: int, label: Optional[str] = None):
        super().__init__(label)
        self._logs = log_rows
        self._config = config
        self._max_order = max_order

    def expand(self, examples):
        logs = self._logs | "NormaliseLogs" >> beam.Map(metapaths.normalise_log_row)
        volumes = (logs
                   | "QueryImpressions" >> beam.Map(lambda r: (r["query"], r["impressions"]))
                   | "SumPerQuery" >> beam.CombinePerKey(sum))
        thresholds = (volumes
                      | "CountVolumes" >> beam.CombineGlobally(_CountVolumes())
                      | "Thresholds" >> beam.Map(segment_thresholds, self._config.head_share,
                                                 self._config.torso_share))
        degrees = (logs
                   | "ItemQueryPairs" >> beam.Map(lambda r: (r["item_id"], r["query"]))
                   | "DistinctPairs" >> beam.Distinct()
                   | "OnePerPair" >> beam.Map(lambda pair: (pair[0], 1))
                   | "DegreePerItem" >> beam.CombinePerKey(sum))
        with_volume = (
            {"example": examples | "KeyByQuery" >> beam.Map(lambda e: (e.get("query", ""), e)),
             "value": volumes}
            | "GroupVolume" >> beam.CoGroupByKey()
            | "AttachVolume" >> beam.FlatMap(_attach, "_query_volume"))
        with_degree = (
            {"example": with_volume | "KeyByItem" >> beam.Map(lambda e: (e.get("item_id", ""), e)),
             "value": degrees}
            | "GroupDegree" >> beam.CoGroupByKey()
            | "AttachDegree" >> beam.FlatMap(_attach, "_item_degree"))
        return with_degree | "Finalise" >> beam.Map(
            _finalise, beam.pvalue.AsSingleton(thresholds), self._config, self._max_order)
