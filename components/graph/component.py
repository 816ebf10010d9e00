"""GraphContexts: the query-item behaviour graph and its k-order metapath contexts, as a TFX component.

A Beam component (BaseBeamComponent), so `beam_pipeline_args` decide where it runs:
DirectRunner locally, DataflowRunner or FlinkRunner at scale, with the same code.
"""
import json
from typing import Optional, Union

from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.orchestration.data_types import RuntimeParameter
from tfx.types import channel, component_spec, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from components import artifacts
from components.graph import executor
from components.graph.eval_features import EvalFeatureConfig
from components.graph.metapaths import GraphConfig


class GraphContextsSpec(component_spec.ComponentSpec):
    PARAMETERS = {
        executor.GRAPH_CONFIG_KEY: ExecutionParameter(type=str),
        # Override graph_config's fields of the same name when set (runtime parameters on Kubeflow).
        executor.MAX_ORDER_KEY: ExecutionParameter(type=int, optional=True),
        executor.TOP_N_KEY: ExecutionParameter(type=int, optional=True),
        executor.TABLE_MIN_IMPRESSIONS_KEY: ExecutionParameter(type=int, optional=True),
        executor.EVAL_FEATURES_KEY: ExecutionParameter(type=str, optional=True),
    }
    INPUTS = {
        executor.LOGS_KEY: ChannelParameter(type=standard_artifacts.Examples),
        executor.JUDGMENTS_KEY: ChannelParameter(type=standard_artifacts.Examples),
        # Only an ordering edge: the graph is built from data the gate has accepted.
        executor.DATA_REPORT_KEY: ChannelParameter(type=artifacts.DataValidationReport, optional=True),
    }
    OUTPUTS = {
        executor.LOG_EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
        executor.JUDGMENT_EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
        executor.NEIGHBOUR_TABLES_KEY: ChannelParameter(type=artifacts.NeighbourTables),
        executor.GRAPH_STATISTICS_KEY: ChannelParameter(type=artifacts.GraphStatistics),
    }


class GraphContexts(base_beam_component.BaseBeamComponent):
    """Builds the weighted query-item graph from validated logs and joins contexts onto examples.

    Outputs: `log_examples` and `judgment_examples` (the input splits with `q_o{k}_*` and
    `i_o{k}_*` context features added; judgments also get the item's title from the logs when
    they lack one, and the evaluation label and slice features of `eval_features.py`),
    `neighbour_tables` (for serving) and `graph_statistics`.
    """

    SPEC_CLASS = GraphContextsSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, logs: channel.BaseChannel, judgments: channel.BaseChannel,
                 config: GraphConfig, data_report: Optional[channel.BaseChannel] = None,
                 max_order: Optional[Union[int, RuntimeParameter]] = None,
                 top_n: Optional[Union[int, RuntimeParameter]] = None,
                 eval_features: Optional[EvalFeatureConfig] = None,
                 table_min_impressions: Optional[Union[int, RuntimeParameter]] = None):
        """`max_order`, `top_n` and `table_min_impressions`, when given (e.g. as
        RuntimeParameters), replace config's."""
        spec = GraphContextsSpec(
            logs=logs,
            judgments=judgments,
            data_report=data_report,
            graph_config=json.dumps(config.to_dict(), sort_keys=True),
            max_order=max_order,
            top_n=top_n,
            table_min_impressions=table_min_impressions,
            eval_features=json.dumps((eval_features or EvalFeatureConfig()).to_dict(), sort_keys=True),
            log_examples=channel.Channel(type=standard_artifacts.Examples),
            judgment_examples=channel.Channel(type=standard_artifacts.Examples),
            neighbour_tables=channel.Channel(type=artifacts.NeighbourTables),
            graph_statistics=channel.Channel(type=artifacts.GraphStatistics),
        )
        super().__init__(spec=spec)
