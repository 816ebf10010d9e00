"""Relevance metrics and a lexical baseline, in plain NumPy, for the benchmarks.

Every metric takes flat, aligned arrays: one entry per judged (query, item) pair, with the
pair's query id (any hashable: the query string, an integer id), the model's score (higher
means more relevant) and the human relevance judgment on a graded scale (Home Depot: 1..3,
averaged over raters). Nothing here knows about the teacher, the student or TensorFlow, so
the same functions score every model of the project on the same footing.

  * `auc`: ROC AUC over all pairs of the set, with a binary label
    (relevant iff relevance >= threshold, default 2.33, the pipeline's
    `relevant_threshold`). Ties in score count one half (average ranks, as
    sklearn's `roc_auc_score`).
  * `per_query_auc`: the same AUC inside each query, averaged (unweighted) over the
    queries that have at least one relevant and one non-relevant pair; the number
    of queries that counted is returned with it.
  * `ndcg_at_k`: NDCG@k with graded linear gains gain = relevance - relevance_min
    (0..2 on 1..3) and discount 1 / log2(1 + rank). The ideal DCG of a query is
    that of its own judged pairs sorted by gain; queries whose ideal DCG is 0 (all
    pairs at relevance_min) are skipped and the number that counted is returned.
    Tied scores get the expected DCG over all orders of the tied items
    (McSherry & Najork 2008; sklearn's `ndcg_score` default), so a scorer that
    ties a lot (the lexical baseline) is neither flattered nor punished by
    the input order.
  * `IdfOverlapScorer`: an IDF-weighted query/title token-overlap baseline. IDF is
    fitted on a collection of titles (the training part); a pair scores the share of
    the query's IDF mass whose tokens occur in the title, in [0, 1].
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Dict, Hashable, Iterable, Iterator, List, Sequence

import numpy as np

RELEVANT_THRESHOLD = 2.33
RELEVANCE_MIN = 1.0


@dataclasses.dataclass(frozen=True)
class QueryAveraged:
    """A metric averaged over queries: the mean and how many queries counted.

    `value` is NaN when no query counted.
    """

    value: float
    num_queries: int
    num_queries_total: int

    def to_dict(self) -> Dict[str, float]:
        return dataclasses.asdict(self)


def _as_1d(name: str, values, dtype=None) -> np.ndarray:
    array = np.asarray(values, dtype=dtype)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _check_aligned(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have one entry per pair, got lengths {lengths}")


def binary_labels(relevance, threshold: float = RELEVANT_THRESHOLD) -> np.ndarray:
    """1 where relevance >= threshold, else 0, compared in float32 as the pipeline does
    (`components.graph.eval_features.is_relevant`): a judgment read back from tf.Example
    as 2.3299999 meets the threshold 2.33."""
    values = _as_1d("relevance", relevance, float).astype(np.float32)
    return (values >= np.float32(threshold)).astype(np.int64)


def average_ranks(values) -> np.ndarray:
    """1-based ranks of `values` in ascending order; tied values share their mean rank."""
    values = _as_1d("values", values, float)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of every run of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_ranks = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=float)
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks


def binary_auc(labels, scores) -> float:
    """ROC AUC of 0/1 `labels` by `scores` (Mann-Whitney U with average ranks).

    Equals the share of (positive, negative) pairs that the scores order
    correctly, a tie counting one half. NaN when a class is empty.
    """
    labels = _as_1d("labels", labels).astype(bool)
    scores = _as_1d("scores", scores, float)
    _check_aligned(labels=labels, scores=scores)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    num_pos = int(labels.sum())
    num_neg = len(labels) - num_pos
    if num_pos == 0 or num_neg == 0:
        return math.nan
    ranks = average_ranks(scores)
    u = ranks[labels].sum() - num_pos * (num_pos + 1) / 2.0
    return float(u / (num_pos * num_neg))


def auc(scores, relevance, threshold: float = RELEVANT_THRESHOLD) -> float:
    """ROC AUC over all pairs, relevant iff relevance >= threshold (NaN if one class is empty)."""
    return binary_auc(binary_labels(relevance, threshold), scores)


def query_groups(query_ids) -> Iterator[np.ndarray]:
    """Index arrays of the pairs of each query, queries in order of first appearance."""
    query_ids = list(query_ids)
    positions: Dict[Hashable, List[int]] = {}
    for i, q in enumerate(query_ids):
        positions.setdefault(q, []).append(i)
    for indices in positions.values():
        yield np.asarray(indices, dtype=np.int64)


def per_query_auc(query_ids, scores, relevance,
                  threshold: float = RELEVANT_THRESHOLD) -> QueryAveraged:
    """Mean over queries of the within-query AUC.

    Only queries with at least one relevant and one non-relevant pair count;
    each counts once, whatever its number of pairs.
    """
    scores = _as_1d("scores", scores, float)
    labels = binary_labels(relevance, threshold)
    query_ids = list(query_ids)
    _check_aligned(query_ids=np.empty(len(query_ids)), scores=scores, relevance=labels)
    values = []
    total = 0
    for indices in query_groups(query_ids):
        total += 1
        value = binary_auc(labels[indices], scores[indices])
        if not math.isnan(value):
            values.append(value)
    return QueryAveraged(float(np.mean(values)) if values else math.nan, len(values), total)


def _discounts(n: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, n + 2, dtype=float))


def dcg_at_k(scores, gains, k: int) -> float:
    """DCG@k of one query's items ranked by descending score, ties averaged.

    Tied items share the mean of their gains over the positions they occupy
    together, which is the expected DCG over all orders of the tie.
    """
    scores = _as_1d("scores", scores, float)
    gains = _as_1d("gains", gains, float)
    _check_aligned(scores=scores, gains=gains)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_gains = scores[order], gains[order]
    discounts = _discounts(len(scores))
    discounts[k:] = 0.0
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    total = 0.0
    for start, end in zip(starts, ends):
        if start >= k:
            break
        total += sorted_gains[start:end].mean() * discounts[start:end].sum()
    return float(total)


def ndcg_at_k(query_ids, scores, relevance, k: int = 10,
              relevance_min: float = RELEVANCE_MIN) -> QueryAveraged:
    """Mean NDCG@k over queries with gain = relevance - relevance_min.

    The ideal DCG of a query is the DCG@k of its judged pairs sorted by gain;
    queries whose ideal DCG is 0 (every pair at relevance_min) are skipped.
    """
    scores = _as_1d("scores", scores, float)
    gains = _as_1d("relevance", relevance, float) - relevance_min
    query_ids = list(query_ids)
    _check_aligned(query_ids=np.empty(len(query_ids)), scores=scores, relevance=gains)
    if (gains < 0).any():
        raise ValueError(f"relevance below relevance_min={relevance_min}")
    values = []
    total = 0
    for indices in query_groups(query_ids):
        total += 1
        query_gains = gains[indices]
        ideal = np.sort(query_gains)[::-1][:k]
        ideal_dcg = float((ideal * _discounts(len(ideal))).sum())
        if ideal_dcg <= 0.0:
            continue
        values.append(dcg_at_k(scores[indices], query_gains, k) / ideal_dcg)
    return QueryAveraged(float(np.mean(values)) if values else math.nan, len(values), total)


# --- Lexical baseline -------------------------------------------------------------------

_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)


def tokenize(text: str) -> List[str]:
    """Lower-cased runs of letters and digits ("1/2-in. PVC" -> ["1", "2", "in", "pvc"])."""
    return _TOKEN.findall(text.lower())


class IdfOverlapScorer:
    """IDF-weighted token overlap of a query with an item title.

    score(query, title) = sum of idf(t) over the distinct query tokens t that
    occur in the title, divided by the sum of idf(t) over all distinct query
    tokens (0 for a query without tokens). So the score is the share of the
    query's information that the title covers, in [0, 1], and comparable across
    queries.

    idf(t) = ln((1 + N) / (1 + df(t))) + 1 over the N fitted documents (sklearn's
    smoothed IDF): a token never seen in fitting gets the largest weight,
    ln(1 + N) + 1, and every weight is positive.
    """

    def __init__(self):
        self._df: Counter = Counter()
        self._num_documents = 0

    def fit(self, documents: Iterable[str]) -> "IdfOverlapScorer":
        """Counts document frequencies; every document passed counts once (dedupe first if needed)."""
        df: Counter = Counter()
        n = 0
        for document in documents:
            df.update(set(tokenize(document)))
            n += 1
        self._df, self._num_documents = df, n
        return self

    @property
    def num_documents(self) -> int:
        return self._num_documents

    def idf(self, token: str) -> float:
        return math.log((1.0 + self._num_documents) / (1.0 + self._df.get(token, 0))) + 1.0

    def score_pair(self, query: str, title: str) -> float:
        query_tokens = set(tokenize(query))
        if not query_tokens:
            return 0.0
        title_tokens = set(tokenize(title))
        weights = {t: self.idf(t) for t in query_tokens}
        return sum(w for t, w in weights.items() if t in title_tokens) / sum(weights.values())

    def score(self, queries: Sequence[str], titles: Sequence[str]) -> np.ndarray:
        """Scores of aligned queries and titles, as float64 [N]."""
        if len(queries) != len(titles):
            raise ValueError(f"{len(queries)} queries but {len(titles)} titles")
        return np.fromiter((self.score_pair(q, t) for q, t in zip(queries, titles)),
                           dtype=float, count=len(queries))


def evaluate(query_ids, scores, relevance, threshold: float = RELEVANT_THRESHOLD,
             k: int = 10, relevance_min: float = RELEVANCE_MIN) -> Dict[str, float]:
    """All metrics of one scorer on one set, as a flat JSON-ready dict."""
    query_ids = list(query_ids)
    per_query = per_query_auc(query_ids, scores, relevance, threshold)
    ndcg = ndcg_at_k(query_ids, scores, relevance, k, relevance_min)
    return {
        "auc": auc(scores, relevance, threshold),
        "per_query_auc": per_query.value,
        "per_query_auc_queries": per_query.num_queries,
        f"ndcg@{k}": ndcg.value,
        f"ndcg@{k}_queries": ndcg.num_queries,
        "queries": per_query.num_queries_total,
        "pairs": len(query_ids),
        "relevant_pairs": int(binary_labels(relevance, threshold).sum()),
    }
