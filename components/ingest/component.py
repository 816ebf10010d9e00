"""SearchDataExampleGen: a file-based ExampleGen for search logs or judgments that quarantines bad rows."""
from __future__ import annotations

from typing import Optional

from tfx.components.example_gen import driver, utils
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.proto import example_gen_pb2
from tfx.types import channel, standard_artifacts, standard_component_specs
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from components import artifacts
from components.ingest import executor, rows


class SearchDataExampleGenSpec(standard_component_specs.FileBasedExampleGenSpec):
    PARAMETERS = {
        **standard_component_specs.FileBasedExampleGenSpec.PARAMETERS,
        executor.DATA_KIND_KEY: ExecutionParameter(type=str),
        executor.ROW_RULES_KEY: ExecutionParameter(type=str),
        executor.INPUT_FORMAT_KEY: ExecutionParameter(type=str),
    }
    OUTPUTS = {
        **standard_component_specs.FileBasedExampleGenSpec.OUTPUTS,
        executor.QUARANTINE_KEY: ChannelParameter(type=artifacts.Quarantine),
    }


class _Driver(driver.FileBasedDriver):
    """FileBasedDriver only fills `examples`; the quarantine output is passed through as planned."""

    def run(self, execution_info):
        result = super().run(execution_info)
        for key, planned in execution_info.output_dict.items():
            if key not in result.output_artifacts:
                result.output_artifacts[key].artifacts.extend(a.mlmd_artifact for a in planned)
        return result


class SearchDataExampleGen(base_beam_component.BaseBeamComponent):
    """Reads logs or judgments (CSV, Parquet or TFRecord), validates every row, splits by query.

    Outputs `examples` (train/eval/test by hashed query) and `quarantine` (refused rows with
    reasons and a summary whose counts satisfy rows_in = accepted + quarantined).
    """

    SPEC_CLASS = SearchDataExampleGenSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)
    DRIVER_CLASS = _Driver

    def __init__(
        self,
        input_base: str,
        data_kind: str,
        row_rules: rows.RowRules,
        input_pattern: str = "*",
        input_format: str = "auto",
        output_config: Optional[example_gen_pb2.Output] = None,
    ):
        if data_kind not in rows.KINDS:
            raise ValueError(f"data_kind must be one of {rows.KINDS}, got {data_kind!r}")
        input_config = example_gen_pb2.Input(
            splits=[example_gen_pb2.Input.Split(name="single_split", pattern=input_pattern)])
        spec = SearchDataExampleGenSpec(
            input_base=input_base,
            input_config=input_config,
            output_config=output_config or utils.make_default_output_config(input_config),
            output_data_format=example_gen_pb2.FORMAT_TF_EXAMPLE,
            output_file_format=example_gen_pb2.FORMAT_TFRECORDS_GZIP,
            data_kind=data_kind,
            row_rules=row_rules.to_json(),
            input_format=input_format,
            examples=channel.Channel(type=standard_artifacts.Examples),
            quarantine=channel.Channel(type=artifacts.Quarantine),
        )
        super().__init__(spec=spec)
