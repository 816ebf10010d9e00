"""A TFX Trainer whose `epochs` can be a runtime parameter.

TFX's Trainer takes the module's settings as one JSON `custom_config`, which cannot hold a
RuntimeParameter. `EpochsTrainer` is the same component (same inputs, outputs, executor and
run_fn contract) with one more optional integer exec property, `epochs`; when it is set, the
executor writes it into `custom_config["epochs"]` before calling the module's `run_fn`. The
local runner leaves it unset (the config's custom_config is used as is); the Kubeflow runner
passes a RuntimeParameter so each run can choose the number of epochs.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from tfx.components.trainer import executor as trainer_executor
from tfx.components.trainer.component import Trainer
from tfx.dsl.components.base import base_component, executor_spec
from tfx.orchestration.data_types import RuntimeParameter
from tfx.proto import trainer_pb2
from tfx.types import channel, standard_artifacts, standard_component_specs
from tfx.types.component_spec import ExecutionParameter
from tfx.utils import json_utils

EPOCHS_KEY = "epochs"


class EpochsTrainerSpec(standard_component_specs.TrainerSpec):
    PARAMETERS = {
        **standard_component_specs.TrainerSpec.PARAMETERS,
        EPOCHS_KEY: ExecutionParameter(type=int, optional=True),
    }


def merged_exec_properties(exec_properties: Dict[str, Any]) -> Dict[str, Any]:
    """Trainer exec properties with `epochs`, when set, moved into `custom_config`."""
    properties = dict(exec_properties)
    epochs = properties.pop(EPOCHS_KEY, None)
    if epochs is not None:
        key = standard_component_specs.CUSTOM_CONFIG_KEY
        custom = json_utils.loads(properties.get(key) or "null") or {}
        properties[key] = json_utils.dumps({**custom, "epochs": int(epochs)})
    return properties


class EpochsExecutor(trainer_executor.GenericExecutor):

    def Do(self, input_dict: Dict[str, List[Any]], output_dict: Dict[str, List[Any]],
           exec_properties: Dict[str, Any]) -> None:
        super().Do(input_dict, output_dict, merged_exec_properties(exec_properties))


class EpochsTrainer(Trainer):
    """tfx.components.Trainer (run_fn style, GenericExecutor) plus an optional `epochs` override."""

    SPEC_CLASS = EpochsTrainerSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(EpochsExecutor)

    def __init__(
        self,
        examples: channel.BaseChannel,
        run_fn: str,
        custom_config: Optional[Dict[str, Any]] = None,
        epochs: Optional[Union[int, RuntimeParameter]] = None,
        schema: Optional[channel.BaseChannel] = None,
        transform_graph: Optional[channel.BaseChannel] = None,
        base_model: Optional[channel.BaseChannel] = None,
        hyperparameters: Optional[channel.BaseChannel] = None,
        train_args: Optional[trainer_pb2.TrainArgs] = None,
        eval_args: Optional[trainer_pb2.EvalArgs] = None,
    ):
        spec = EpochsTrainerSpec(
            examples=examples,
            transform_graph=transform_graph,
            schema=schema,
            base_model=base_model,
            hyperparameters=hyperparameters,
            train_args=train_args or trainer_pb2.TrainArgs(),
            eval_args=eval_args or trainer_pb2.EvalArgs(),
            run_fn=run_fn,
            custom_config=json_utils.dumps(custom_config),
            epochs=epochs,
            model=channel.Channel(type=standard_artifacts.Model),
            model_run=channel.Channel(type=standard_artifacts.ModelRun),
        )
        # Trainer.__init__ would build a plain TrainerSpec; this is its spec plus `epochs`.
        base_component.BaseComponent.__init__(self, spec=spec)
