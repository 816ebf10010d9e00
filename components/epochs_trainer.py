"""A TFX Trainer whose `epochs` can be a runtime parameter.

TFX's Trainer takes the module's settings as one JSON `custom_config`, which cannot hold a
RuntimeParameter. `EpochsTrainer` is the same component (same inputs, outputs, executor and
run_fn contract) with one more optional integer exec property, `epochs`; when it is set, the
executor writes it into `custom_config["epochs"]` before calling the module's `run_fn`. The
local runner leaves it unset (the config's custom_config is used as is); the Kubeflow runner
passes a RuntimeParameter so each run can choose the number of epochs.

It also takes an optional `title_vectors` input (the TitleEncoder's output): a Trainer's run_fn
sees only its standard inputs, so the executor hands that folder to the module as
`custom_config["title_vectors_dir"]` (the student's stored title vectors, trainer/student.py).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from tfx.components.trainer import executor as trainer_executor
from tfx.components.trainer.component import Trainer
from tfx.dsl.components.base import base_component, executor_spec
from tfx.orchestration.data_types import RuntimeParameter
from tfx.proto import trainer_pb2
from tfx.types import channel, standard_artifacts, standard_component_specs
from tfx.types import artifact_utils
from tfx.types.component_spec import ChannelParameter, ExecutionParameter
from tfx.utils import json_utils

from components import artifacts

EPOCHS_KEY = "epochs"
TITLE_VECTORS_KEY = "title_vectors"
TITLE_VECTORS_DIR = "title_vectors_dir"


class EpochsTrainerSpec(standard_component_specs.TrainerSpec):
    PARAMETERS = {
        **standard_component_specs.TrainerSpec.PARAMETERS,
        EPOCHS_KEY: ExecutionParameter(type=int, optional=True),
    }
    INPUTS = {
        **standard_component_specs.TrainerSpec.INPUTS,
        TITLE_VECTORS_KEY: ChannelParameter(type=artifacts.TitleVectors, optional=True),
    }


def merged_exec_properties(exec_properties: Dict[str, Any],
                           title_vectors_dir: Optional[str] = None) -> Dict[str, Any]:
    """Trainer exec properties with `epochs` and the title vectors' folder, when set, moved into
    `custom_config`."""
    properties = dict(exec_properties)
    epochs = properties.pop(EPOCHS_KEY, None)
    extra = {}
    if epochs is not None:
        extra["epochs"] = int(epochs)
    if title_vectors_dir:
        extra[TITLE_VECTORS_DIR] = title_vectors_dir
    if extra:
        key = standard_component_specs.CUSTOM_CONFIG_KEY
        custom = json_utils.loads(properties.get(key) or "null") or {}
        properties[key] = json_utils.dumps({**custom, **extra})
    return properties


class EpochsExecutor(trainer_executor.GenericExecutor):

    def Do(self, input_dict: Dict[str, List[Any]], output_dict: Dict[str, List[Any]],
           exec_properties: Dict[str, Any]) -> None:
        input_dict = dict(input_dict)
        vectors = input_dict.pop(TITLE_VECTORS_KEY, None)
        vectors_dir = artifact_utils.get_single_uri(vectors) if vectors else None
        super().Do(input_dict, output_dict, merged_exec_properties(exec_properties, vectors_dir))


class EpochsTrainer(Trainer):
    """tfx.components.Trainer (run_fn style, GenericExecutor) plus an optional `epochs` override
    and an optional `title_vectors` input."""

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
        title_vectors: Optional[channel.BaseChannel] = None,
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
            title_vectors=title_vectors,
            model=channel.Channel(type=standard_artifacts.Model),
            model_run=channel.Channel(type=standard_artifacts.ModelRun),
        )
        # Trainer.__init__ would build a plain TrainerSpec; this is its spec plus `epochs`.
        base_component.BaseComponent.__init__(self, spec=spec)
