"""What the Evaluator needs beyond stock TFMA: three metrics, and model loading with TF Text's ops.

The Evaluator is given this module as `module_path`, so TFMA finds the metrics by class name
(`MetricConfig(class_name=..., module="components.tfma_extensions")`) and the executor calls
`custom_eval_shared_model` to load each model.

  * `ScoreCorrelation`: Pearson correlation of the model's score with a numeric feature of the
    same example; with `teacher_score` it is the student-teacher agreement.
  * `JudgmentMSE`: mean squared error of the score against a feature rescaled to [0, 1]; with
    `gain` (relevance - relevance_min) and the judgment scale's width it is the MSE against
    the human judgments.
  * `QueryCount`: the queries in a slice, in a metrics spec with a query key (each element TFMA
    hands a query-keyed metric is one query's pairs): how many queries a slice's NDCG averages.
    TFMA's own QueryStatistics counts a query's documents as `len(element.prediction)`, the
    number of models once a baseline is evaluated alongside (TFMA 0.46).
"""
from typing import Any, Dict, Iterable

import apache_beam as beam
import numpy as np
import tensorflow_model_analysis as tfma
from tensorflow_model_analysis.metrics import metric_types, metric_util
from tensorflow_model_analysis.utils import util as tfma_util

SCORE_CORRELATION_NAME = "score_correlation"
JUDGMENT_MSE_NAME = "judgment_mse"
QUERY_COUNT_NAME = "query_count"


class _Moments:
    __slots__ = ["n", "sx", "sy", "sxx", "syy", "sxy"]

    def __init__(self):
        self.n = self.sx = self.sy = self.sxx = self.syy = self.sxy = 0.0

    def add(self, x: float, y: float, w: float) -> None:
        self.n += w
        self.sx += w * x
        self.sy += w * y
        self.sxx += w * x * x
        self.syy += w * y * y
        self.sxy += w * x * y

    def merge(self, other: "_Moments") -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class _FeatureScoreCombiner(beam.CombineFn):
    """Moments of (feature / scale, prediction) over the examples of a slice."""

    def __init__(self, key: metric_types.MetricKey, eval_config, feature_key: str, scale: float,
                 output: str):
        self._key = key
        self._eval_config = eval_config
        self._feature_key = feature_key
        self._scale = scale
        self._output = output

    def create_accumulator(self) -> _Moments:
        return _Moments()

    def add_input(self, accumulator: _Moments, element: metric_types.StandardMetricInputs) -> _Moments:
        _, predictions, weights = next(metric_util.to_label_prediction_example_weight(
            element, eval_config=self._eval_config, model_name=self._key.model_name,
            output_name=self._key.output_name, flatten=False, allow_none=True,
            example_weighted=self._key.example_weighted))
        feature = tfma_util.get_by_keys(element.features, [self._feature_key], optional=True)
        if feature is None or predictions is None:
            return accumulator
        xs = np.asarray(feature, dtype=float).reshape(-1) / self._scale
        ys = np.asarray(predictions, dtype=float).reshape(-1)
        w = float(np.asarray(weights, dtype=float).reshape(-1)[0]) if weights is not None else 1.0
        for x, y in zip(xs, ys):
            accumulator.add(float(x), float(y), w)
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[_Moments]) -> _Moments:
        accumulators = iter(accumulators)
        result = next(accumulators)
        for accumulator in accumulators:
            result.merge(accumulator)
        return result

    def extract_output(self, m: _Moments) -> Dict[metric_types.MetricKey, float]:
        value = float("nan")
        if m.n > 0:
            if self._output == "mse":
                value = (m.syy - 2 * m.sxy + m.sxx) / m.n
            else:
                cov = m.sxy - m.sx * m.sy / m.n
                var_x, var_y = m.sxx - m.sx ** 2 / m.n, m.syy - m.sy ** 2 / m.n
                if var_x > 0 and var_y > 0:
                    value = cov / float(np.sqrt(var_x * var_y))
        return {self._key: value}


def _computations(name: str, feature_key: str, scale: float, output: str, eval_config,
                  model_names, output_names, example_weighted) -> metric_types.MetricComputations:
    computations = []
    for model_name in model_names or [""]:
        for output_name in output_names or [""]:
            key = metric_types.MetricKey(name=name, model_name=model_name, output_name=output_name,
                                         example_weighted=example_weighted)
            computations.append(metric_types.MetricComputation(
                keys=[key],
                preprocessors=[metric_types.FeaturePreprocessor(feature_keys=[feature_key])],
                combiner=_FeatureScoreCombiner(key, eval_config, feature_key, scale, output)))
    return computations


# TFMA passes eval_config, model_names, output_names and example_weighted to the arguments a
# computations function declares by name.
def _score_correlation(name: str = SCORE_CORRELATION_NAME, feature_key: str = "teacher_score",
                       eval_config=None, model_names=None, output_names=None,
                       example_weighted: bool = False) -> metric_types.MetricComputations:
    return _computations(name, feature_key, 1.0, "pearson", eval_config, model_names, output_names,
                         example_weighted)


def _judgment_mse(name: str = JUDGMENT_MSE_NAME, feature_key: str = "gain", scale: float = 2.0,
                  eval_config=None, model_names=None, output_names=None,
                  example_weighted: bool = False) -> metric_types.MetricComputations:
    return _computations(name, feature_key, float(scale), "mse", eval_config, model_names,
                         output_names, example_weighted)


class ScoreCorrelation(metric_types.Metric):
    """Pearson correlation between the model's score and the numeric feature `feature_key`."""

    def __init__(self, feature_key: str = "teacher_score", name: str = SCORE_CORRELATION_NAME):
        super().__init__(_score_correlation, feature_key=feature_key, name=name)


class JudgmentMSE(metric_types.Metric):
    """Mean of (score - feature_key / scale)^2: the MSE against judgments rescaled to [0, 1]."""

    def __init__(self, feature_key: str = "gain", scale: float = 2.0, name: str = JUDGMENT_MSE_NAME):
        super().__init__(_judgment_mse, feature_key=feature_key, scale=scale, name=name)


class _QueryCountCombiner(beam.CombineFn):
    """Counts the elements (one per query) and reports the count under every model's key."""

    def __init__(self, keys):
        self._keys = keys

    def create_accumulator(self) -> int:
        return 0

    def add_input(self, count: int, element: metric_types.StandardMetricInputs) -> int:
        return count + 1

    def merge_accumulators(self, counts: Iterable[int]) -> int:
        return sum(counts)

    def extract_output(self, count: int) -> Dict[metric_types.MetricKey, float]:
        return {key: float(count) for key in self._keys}


def _query_count(name: str = QUERY_COUNT_NAME, model_names=None, output_names=None,
                 query_key: str = "", example_weighted: bool = False
                 ) -> metric_types.MetricComputations:
    if not query_key:
        raise ValueError("QueryCount counts queries: give its metrics spec a query_key")
    keys = [metric_types.MetricKey(name=name, model_name=model_name, output_name=output_name,
                                   example_weighted=example_weighted)
            for model_name in model_names or [""] for output_name in output_names or [""]]
    return [metric_types.MetricComputation(keys=keys, preprocessors=None,
                                           combiner=_QueryCountCombiner(keys))]


class QueryCount(metric_types.Metric):
    """The number of queries in a slice (a metrics spec with a query_key)."""

    def __init__(self, name: str = QUERY_COUNT_NAME):
        super().__init__(_query_count, name=name)


metric_types.register_metric(ScoreCorrelation)
metric_types.register_metric(JudgmentMSE)
metric_types.register_metric(QueryCount)


class _WithTextOps:
    """A model constructor that first registers TF Text's ops (the models tokenise in-graph).

    A Beam worker in another process unpickles only this callable, not the module that made the
    EvalSharedModel, so the import must happen here.
    """

    def __init__(self, construct_fn):
        self._construct_fn = construct_fn

    def __call__(self):
        import tensorflow_text  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

        return self._construct_fn()


def custom_eval_shared_model(eval_saved_model_path: str, model_name: str, eval_config: Any,
                             **kwargs) -> tfma.types.EvalSharedModel:
    """The Evaluator's hook: TFMA's default shared model, loaded with TF Text's ops present."""
    import tensorflow_text  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

    shared = tfma.default_eval_shared_model(eval_saved_model_path=eval_saved_model_path,
                                            model_name=model_name, eval_config=eval_config, **kwargs)
    shared.model_loader.construct_fn = _WithTextOps(shared.model_loader.construct_fn)
    return shared
