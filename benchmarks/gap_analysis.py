"""Where a student's scores part from its teacher's: between queries or within them.

AUC over all judged pairs mixes two skills: ranking a query's items (per-query AUC, NDCG) and
judging whole queries (does this query have relevant results at all?). On Home Depot most of the
score variance lies between queries, so a student that orders each query's items as well as the
teacher can still trail it on AUC. These functions split the difference, in plain NumPy, on the
same flat, aligned arrays as `relevance_metrics` (one entry per judged pair).

Scores are probabilities (both models end in a sigmoid) and are compared as logits, as they
are: the student's pointwise term against the teacher's scores pins it to the teacher's scale, so
no rescaling is fitted (a fitted one would mix the two parts below). Each pair's logit is its
query's mean (the *level*) plus its deviation from that mean (the *order*):

  * `between_query_share_teacher`: the share of the teacher's logit variance that lies between
    query means;
  * `error_between_query_share`: the same share for the error, teacher minus student (NaN when
    the student is the teacher);
  * `correlation`: Pearson correlation of the two models' logits;
  * `<model>_query_level_auc`: AUC with every pair scored by its query's level only;
  * `student_order_teacher_levels_auc`: AUC of the teacher's query levels plus the student's
    order within each query, and `teacher_order_student_levels_auc` the reverse. Whichever of
    the two sits closer to the teacher's own AUC says which skill the student lacks.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from benchmarks import relevance_metrics as rm

LOGIT_EPSILON = 1e-6


def logits(probabilities) -> np.ndarray:
    """log(p / (1 - p)), with p clipped away from 0 and 1 so a saturated score stays finite."""
    p = np.clip(np.asarray(probabilities, dtype=float), LOGIT_EPSILON, 1.0 - LOGIT_EPSILON)
    return np.log(p) - np.log1p(-p)


def query_means(query_ids, values) -> np.ndarray:
    """Each pair's query mean of `values` (aligned with the input)."""
    values = np.asarray(values, dtype=float)
    means = np.empty_like(values)
    for indices in rm.query_groups(query_ids):
        means[indices] = values[indices].mean()
    return means


def between_query_share(query_ids, values) -> float:
    """Between-query sum of squares over the total (0: every query has the same mean; 1:
    values are constant within each query). NaN when the values do not vary at all."""
    values = np.asarray(values, dtype=float)
    total = float(np.sum((values - values.mean()) ** 2))
    if total == 0.0:
        return float("nan")
    return float(np.sum((query_means(query_ids, values) - values.mean()) ** 2)) / total


def analyse(query_ids, student, teacher, relevance,
            threshold: float = rm.RELEVANT_THRESHOLD) -> Dict[str, float]:
    """The split described in the module docstring, as a flat JSON-ready dict."""
    query_ids = list(query_ids)
    student = np.asarray(student, dtype=float)
    teacher = np.asarray(teacher, dtype=float)
    lengths = {len(query_ids), len(student), len(teacher), len(relevance)}
    if len(lengths) > 1:
        raise ValueError(f"query_ids, student, teacher and relevance must have one entry per pair, "
                         f"got lengths {len(query_ids)}, {len(student)}, {len(teacher)}, {len(relevance)}")
    teacher_logits = logits(teacher)
    student_logits = logits(student)
    teacher_levels = query_means(query_ids, teacher_logits)
    student_levels = query_means(query_ids, student_logits)
    student_order = student_logits - student_levels
    teacher_order = teacher_logits - teacher_levels
    if np.std(student_logits) == 0.0 or np.std(teacher_logits) == 0.0:
        correlation = float("nan")
    else:
        correlation = float(np.corrcoef(student_logits, teacher_logits)[0, 1])
    return {
        "correlation": correlation,
        "between_query_share_teacher": between_query_share(query_ids, teacher_logits),
        "error_between_query_share": between_query_share(query_ids, teacher_logits - student_logits),
        "teacher_query_level_auc": rm.auc(teacher_levels, relevance, threshold),
        "student_query_level_auc": rm.auc(student_levels, relevance, threshold),
        "student_order_teacher_levels_auc": rm.auc(teacher_levels + student_order, relevance, threshold),
        "teacher_order_student_levels_auc": rm.auc(student_levels + teacher_order, relevance, threshold),
    }


def level_correction(query_ids, student, teacher, features, relevance, folds: int = 5,
                     l2: float = 10.0, seeds=(0, 1, 2),
                     threshold: float = rm.RELEVANT_THRESHOLD) -> Dict[str, float]:
    """Can the query levels the student misses be told from the query alone?

    Per query, the target is the teacher's level minus the student's (logits); `features`
    [pairs, F] describe the query (equal within a query). A ridge fit on the other folds' queries
    (`folds`, assigned at random by each of `seeds`; standardised features, penalty `l2`)
    predicts each held-out query's target, which is added to its pairs' student logits.
    `auc` is that corrected student's AUC (mean over the seeds) next to the student's own
    (`student_auc`); `correlation` is the predictions' with the targets (first seed). The fit
    never sees a held-out query's own teacher scores, so the gain is what a correction learnt
    on some unseen queries would carry to others.
    """
    features = np.asarray(features, dtype=float).reshape(len(query_ids), -1)
    student_logits, teacher_logits = logits(student), logits(teacher)
    groups = list(rm.query_groups(list(query_ids)))
    if len(groups) < folds:
        raise ValueError(f"level_correction needs at least {folds} queries, got {len(groups)}")
    x = np.stack([features[g[0]] for g in groups])
    target = np.array([teacher_logits[g].mean() - student_logits[g].mean() for g in groups])
    aucs, correlation = [], float("nan")
    for seed in seeds:
        fold = np.random.default_rng(seed).permutation(len(groups)) % folds
        predicted = np.empty(len(groups))
        for f in range(folds):
            train, held = fold != f, fold == f
            mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-9
            design = lambda rows: np.c_[(x[rows] - mean) / std, np.ones(int(rows.sum()))]
            a = design(train)
            penalty = l2 * np.eye(a.shape[1])
            penalty[-1, -1] = 0.0  # the intercept is not shrunk
            weights = np.linalg.solve(a.T @ a + penalty, a.T @ target[train])
            predicted[held] = design(held) @ weights
        corrected = student_logits.copy()
        for g, level in zip(groups, predicted):
            corrected[g] += level
        aucs.append(rm.auc(corrected, relevance, threshold))
        if seed == seeds[0]:
            correlation = float(np.corrcoef(predicted, target)[0, 1])
    return {"auc": float(np.mean(aucs)), "aucs": [float(a) for a in aucs],
            "student_auc": rm.auc(student_logits, relevance, threshold), "correlation": correlation,
            "queries": len(groups), "features": int(x.shape[1])}
