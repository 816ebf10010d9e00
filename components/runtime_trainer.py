"""A TFX Trainer whose `epochs` and `max_order` can be runtime parameters.

TFX's Trainer takes the module's settings as one JSON `custom_config`, which cannot hold a
RuntimeParameter. `RuntimeTrainer` is the same component (same inputs, outputs, executor and
run_fn contract) with optional integer exec properties for the settings a run may choose
(`RUNTIME_SETTINGS`: the teacher's `epochs`, the student's metapath `max_order`); each one that
is set is written into `custom_config` under its own name before the module's `run_fn` is
called. The local runner leaves them unset (the config's custom_config is used as is); the
Kubeflow runner passes RuntimeParameters, so each run can choose them.

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

RUNTIME_SETTINGS = ("epochs", "max_order")
TITLE_VECTORS_KEY = "title_vectors"
TITLE_VECTORS_DIR = "title_vectors_dir"


class RuntimeTrainerSpec(standard_component_specs.TrainerSpec):
    PARAMETERS = {
        **standard_component_specs.TrainerSpec.PARAMETERS,
        **{name: ExecutionParameter(type=int, optional=True) for name in RUNTIME_SETTINGS},
    }
    INPUTS = {
        **standard_component_specs.TrainerSpec.INPUTS,
        TITLE_VECTORS_KEY: ChannelParameter(type=artifacts.TitleVectors, optional=True),
    }


def merged_exec_properties(exec_properties: Dict[str, Any],
                           title_vectors_dir: Optional[str] = None) -> Dict[str, Any]:
    """Trainer exec properties with the runtime settings and the title vectors' folder, when
    set, moved into `custom_config`."""
    properties = dict(exec_properties)
    extra = {}
    for name in RUNTIME_SETTINGS:
        value = properties.pop(name, None)
        if value is not None:
            extra[name] = int(value)
    if title_vectors_dir:
        extra[TITLE_VECTORS_DIR] = title_vectors_dir
    if extra:
        key = standard_component_specs.CUSTOM_CONFIG_KEY
        custom = json_utils.loads(properties.get(key) or "null") or {}
        properties[key] = json_utils.dumps({**custom, **extra})
    return properties


class RuntimeExecutor(trainer_executor.GenericExecutor):

    def Do(self, input_dict: Dict[str, List[Any]], output_dict: Dict[str, List[Any]],
           exec_properties: Dict[str, Any]) -> None:
        input_dict = dict(input_dict)
        vectors = input_dict.pop(TITLE_VECTORS_KEY, None)
        vectors_dir = artifact_utils.get_single_uri(vectors) if vectors else None
        super().Do(input_dict, output_dict, merged_exec_properties(exec_properties, vectors_dir))


class RuntimeTrainer(Trainer):
    """tfx.components.Trainer (run_fn style, GenericExecutor) plus optional `epochs` and
    `max_order` overrides and an optional `title_vectors` input."""

    SPEC_CLASS = RuntimeTrainerSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(RuntimeExecutor)

    def __init__(
        self,
        examples: channel.BaseChannel,
        run_fn: str,
        custom_config: Optional[Dict[str, Any]] = None,
        epochs: Optional[Union[int, RuntimeParameter]] = None,
        max_order: Optional[Union[int, RuntimeParameter]] = None,
        schema: Optional[channel.BaseChannel] = None,
        transform_graph: Optional[channel.BaseChannel] = None,
        base_model: Optional[channel.BaseChannel] = None,
        hyperparameters: Optional[channel.BaseChannel] = None,
        train_args: Optional[trainer_pb2.TrainArgs] = None,
        eval_args: Optional[trainer_pb2.EvalArgs] = None,
        title_vectors: Optional[channel.BaseChannel] = None,
    ):
        spec = RuntimeTrainerSpec(
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
            max_order=max_order,
            title_vectors=title_vectors,
            model=channel.Channel(type=standard_artifacts.Model),
            model_run=channel.Channel(type=standard_artifacts.ModelRun),
        )
        # Trainer.__init__ would build a plain TrainerSpec; this is its spec plus the settings.
        base_component.BaseComponent.__init__(self, spec=spec)
