"""Compiles the relkd pipeline for Kubeflow Pipelines v2 and Vertex AI Pipelines.

The DAG is the one `relkd run` executes locally (pipeline/pipeline.py); only the runner
differs. `KubeflowV2DagRunner` turns it into a pipeline spec (schema 2.1.0) in which

  * every step runs in the project's image (kubeflow/Dockerfile; `config.kubeflow.image`),
    with the config's `kubeflow.beam_pipeline_args` (DirectRunner in the step's container by
    default, or DataflowRunner / FlinkRunner: see the README; `step_beam_args`);
  * steps named in `kubeflow.resources` get those CPU and memory limits (`set_step_resources`),
    and TensorFlow thread pools that fit them (`step_thread_env`);
  * what users change per run is a pipeline parameter with the config's value as its default
    (`runtime_parameters` below): input locations, the graph's k, neighbour count and table
    bound, the teacher's epochs and the data gate's quarantine limit;
  * the curated schemas are read from where the image installs them (`kubeflow.schema_dir`),
    and the trainer's `run_fn` is a module path of the installed project.

Writing `*.json` gives a PipelineJob (Vertex AI: `aiplatform.PipelineJob(template_path=...)`);
`*.yaml` gives the bare PipelineSpec that `kfp.Client().create_run_from_pipeline_package`
wants. Both carry the parameters' defaults in the spec itself.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
from typing import Any, Dict, List, Optional

import yaml

from pipeline.configs import ConfigError, PipelineConfig, teacher_custom_config
from pipeline.pipeline import InputSpec, RunParameters, create_pipeline


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One runtime parameter: its name in the compiled pipeline, type, default and meaning."""

    name: str
    ptype: type
    default: Any
    help: str


def runtime_parameters(config: PipelineConfig) -> List[Parameter]:
    """The per-run knobs of the compiled pipeline, with the config's values as defaults."""
    kf = config.kubeflow
    return [
        Parameter("logs_uri", str, kf.logs_uri,
                  f"directory or prefix of the search logs (files matching '{kf.logs_pattern}')"),
        Parameter("judgments_uri", str, kf.judgments_uri,
                  f"directory or prefix of the human judgments (files matching '{kf.judgments_pattern}')"),
        Parameter("max_quarantine_fraction", float, float(config.data.max_quarantine_fraction),
                  "data gate: the run stops if more than this fraction of an input's rows is quarantined"),
        Parameter("graph_max_order", int, int(config.graph.max_order),
                  "highest metapath order k of the graph contexts and the student (0..3)"),
        Parameter("graph_top_n", int, int(config.graph.top_n),
                  "neighbours kept per node and metapath"),
        Parameter("graph_table_min_impressions", int, int(config.graph.table_min_impressions),
                  "impressions below which a query or item gets no neighbour tables in BERM-O "
                  "and its title no stored vector (0: every logged node)"),
        Parameter("teacher_epochs", int, int(teacher_custom_config(config)["epochs"]),
                  "maximum epochs of the BERT teacher (early stopping may end it sooner)"),
    ]


# Beam arguments through which code reaches the workers; with none of them TFX packs its own
# installation into an sdist for every Beam step (tfx.utils.dependency_utils).
_SHIPPING_OPTIONS = ("extra_packages", "setup_file", "requirements_file",
                     "worker_harness_container_image", "sdk_container_image")
# Beam's names for its DirectRunner, lower case and without "Runner", as it reads them.
_DIRECT_RUNNERS = ("direct", "switchingdirect", "bundlebaseddirect")


def step_beam_args(config: PipelineConfig) -> List[str]:
    """The Beam arguments every step gets: the config's `kubeflow.beam_pipeline_args`, plus
    `--sdk_container_image=<kubeflow.image>` where they run Beam inside the step (no runner or
    the DirectRunner) and name no way of shipping code.

    The flag says what is so there: the SDK's workers are processes of the step's own container,
    which runs that image. Without it TFX would build an sdist of itself in every Beam step's
    pod (1.5-3 s and 28 MB each here) that the DirectRunner never reads.
    """
    args = list(config.kubeflow.beam_pipeline_args)
    if not args:  # TFX infers nothing from no arguments
        return args
    options = _beam_options(args)
    if _runs_in_step(options) and not any(options.get(name) for name in _SHIPPING_OPTIONS):
        args.append(f"--sdk_container_image={config.kubeflow.image}")
    return args


def _beam_options(args: List[str]) -> Dict[str, Any]:
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(args).get_all_options()


def _runs_in_step(options: Dict[str, Any]) -> bool:
    runner = options.get("runner")
    return runner is None or runner.lower().removesuffix("runner") in _DIRECT_RUNNERS


def set_step_resources(tfx_pipeline, config: PipelineConfig) -> None:
    """Puts `kubeflow.resources` on the steps they name, as TFX's ResourceSpec (CPU and memory
    limits, which the compiler copies into each step's container spec).

    A Beam step that runs Beam in its own container with a worker per core
    (`--direct_num_workers=0`, the default) and gets a CPU limit also gets that many workers:
    Beam counts the machine's cores (`multiprocessing.cpu_count()`), not the pod's limit, and on
    a large node would start more processes than the pod has room for.
    """
    from kfp.pipeline_spec import pipeline_spec_pb2
    from tfx.dsl.components.base.base_beam_component import BaseBeamComponent

    steps = _container_steps(tfx_pipeline)
    options = _beam_options(step_beam_args(config))
    worker_per_core = (_runs_in_step(options) and options.get("direct_num_workers") == 0
                       and options.get("direct_running_mode") in ("multi_processing",
                                                                   "multi_threading"))
    for step, limits in config.kubeflow.resources.items():
        if step not in steps:
            close = difflib.get_close_matches(step, sorted(steps), n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"kubeflow.resources: no step '{step}' runs a container{guess}; "
                              f"steps: {', '.join(sorted(steps))}")
        component = steps[step]
        component.with_platform_config(
            pipeline_spec_pb2.PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec(
                cpu_limit=limits.get("cpu", 0), memory_limit=limits.get("memory_gb", 0)))
        if worker_per_core and "cpu" in limits and isinstance(component, BaseBeamComponent):
            # After the pipeline's own arguments, so Beam takes this count.
            component.with_beam_pipeline_args([f"--direct_num_workers={_whole_cpus(limits)}"])


def step_thread_env(tfx_pipeline, config: PipelineConfig) -> Dict[str, Dict[str, str]]:
    """The environment that sizes TensorFlow's thread pools in each step with a `cpu` limit.

    TensorFlow, like Beam, sizes its intra- and inter-op pools from the cores it can schedule on,
    which in a pod with a CPU limit are the node's: a trainer limited to 8 CPUs on a 96-core node
    would start two pools of 96 threads and spend its quota being throttled. TensorFlow reads
    `TF_NUM_INTRAOP_THREADS` / `TF_NUM_INTEROP_THREADS` when it starts, in the step's process
    and in every Beam worker process it spawns, so a Beam step whose work is spread over worker
    processes splits the cores between them.
    """
    from tfx.dsl.components.base.base_beam_component import BaseBeamComponent

    steps = _container_steps(tfx_pipeline)
    options = _beam_options(step_beam_args(config))
    env = {}
    for step, limits in config.kubeflow.resources.items():
        if "cpu" not in limits:
            continue
        cores = _whole_cpus(limits)
        processes = (_beam_worker_processes(options, cores)
                     if isinstance(steps[step], BaseBeamComponent) else 1)
        threads = str(max(1, cores // processes))
        env[step] = {"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": threads}
    return env


def _whole_cpus(limits: Dict[str, float]) -> int:
    """The processes or threads a `cpu` limit has room for (a fraction of a CPU is still one)."""
    return max(1, int(limits["cpu"]))


def _container_steps(tfx_pipeline) -> Dict[str, Any]:
    from tfx.dsl.components.base.base_component import BaseComponent

    # Resolvers compile into metadata queries, not containers.
    return {c.id: c for c in tfx_pipeline.components if isinstance(c, BaseComponent)}


def _beam_worker_processes(options: Dict[str, Any], cores: int) -> int:
    """How many worker processes a Beam step with `cores` CPUs runs in its container (1 where
    Beam runs elsewhere, in one process, or in threads of one process)."""
    if not _runs_in_step(options) or options.get("direct_running_mode") != "multi_processing":
        return 1
    return options.get("direct_num_workers") or cores  # 0: one per core, set_step_resources


def build_pipeline(config: PipelineConfig):
    """The tfx Pipeline for a cluster: the local DAG with RuntimeParameters for the per-run knobs."""
    from tfx import v1 as tfx

    params = {p.name: tfx.dsl.experimental.RuntimeParameter(name=p.name, ptype=p.ptype, default=p.default)
              for p in runtime_parameters(config)}
    kf = config.kubeflow
    tfx_pipeline = create_pipeline(
        config,
        pipeline_root=kf.pipeline_root,
        logs=InputSpec(base=params["logs_uri"], pattern=kf.logs_pattern),
        judgments=InputSpec(base=params["judgments_uri"], pattern=kf.judgments_pattern),
        beam_pipeline_args=step_beam_args(config),
        run_parameters=RunParameters(
            max_quarantine_fraction=params["max_quarantine_fraction"],
            graph_max_order=params["graph_max_order"],
            graph_top_n=params["graph_top_n"],
            graph_table_min_impressions=params["graph_table_min_impressions"],
            teacher_epochs=params["teacher_epochs"],
        ),
        schema_dir=kf.schema_dir,
        serving_base=config.serving.base_directory or kf.serving_base,
    )
    set_step_resources(tfx_pipeline, config)
    return tfx_pipeline


# KFP v2's rule for pipeline names (TFX's compiler enforces it, without naming the setting).
_PIPELINE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")


def check_cluster_settings(config: PipelineConfig) -> None:
    """What only a cluster refuses: the pipeline's name, and storage the image cannot reach."""
    if not _PIPELINE_NAME.fullmatch(config.name):
        raise ConfigError(f"name {config.name!r} cannot name a Kubeflow / Vertex AI pipeline: use "
                          "lower-case letters, digits and '-' (at most 128, not starting with '-'), "
                          f"e.g. {re.sub('[^a-z0-9-]+', '-', config.name.lower()).strip('-') or 'relkd'!r}")
    for key in ("pipeline_root", "logs_uri", "judgments_uri", "serving_base"):
        if getattr(config.kubeflow, key).lower().startswith("s3://"):
            raise ConfigError(f"kubeflow.{key}: the steps' file system (TensorFlow's, in this "
                              "image) reads no s3:// paths; use gs:// or a path mounted in every step")


def compile_pipeline(config: PipelineConfig, output_path: Optional[str] = None) -> Dict[str, Any]:
    """Compiles the pipeline; returns the PipelineJob as a dict and writes it to `output_path`.

    `output_path` ending in .yaml/.yml gets the PipelineSpec as YAML (for the KFP client),
    anything else the whole PipelineJob as JSON (for Vertex AI); gs:// paths work too.
    """
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    from tfx import v1 as tfx

    check_cluster_settings(config)
    tfx_pipeline = build_pipeline(config)
    parameters = runtime_parameters(config)
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(
            display_name=config.name,
            default_image=config.kubeflow.image,
            # Schema 2.1.0: typed parameters (NUMBER_INTEGER, ...) and defaults in the spec,
            # what the KFP v2 backend and Vertex AI both read.
            use_pipeline_spec_2_1=True,
        ),
        output_dir=".",
    )
    job_dict = runner.run(tfx_pipeline, parameter_values={p.name: p.default for p in parameters},
                          write_out=False)

    # TFX's compiler has no way to set a container's environment; the spec has one.
    deployment = json_format.ParseDict(job_dict["pipelineSpec"]["deploymentSpec"],
                                       pipeline_spec_pb2.PipelineDeploymentConfig())
    for step, env in step_thread_env(tfx_pipeline, config).items():
        deployment.executors[f"{step}_executor"].container.env.extend(
            pipeline_spec_pb2.PipelineDeploymentConfig.PipelineContainerSpec.EnvVar(name=k, value=v)
            for k, v in env.items())
    job_dict["pipelineSpec"]["deploymentSpec"] = json_format.MessageToDict(deployment)

    # The runner types the pipeline's parameters but leaves their defaults to runtimeConfig,
    # which a KFP client ignores; put them in the spec as well, with the pipeline root.
    spec = json_format.ParseDict(job_dict["pipelineSpec"], pipeline_spec_pb2.PipelineSpec())
    for p in parameters:
        json_format.ParseDict(p.default, spec.root.input_definitions.parameters[p.name].default_value)
    spec.default_pipeline_root = config.kubeflow.pipeline_root
    job_dict["pipelineSpec"] = json_format.MessageToDict(spec)

    if output_path:
        write(job_dict, output_path)
    return job_dict


def write(job_dict: Dict[str, Any], output_path: str) -> None:
    from tfx.dsl.io import fileio

    if output_path.lower().endswith((".yaml", ".yml")):
        text = ("# relkd pipeline spec for Kubeflow Pipelines v2 (kubeflow/runner.py)\n"
                + yaml.safe_dump(job_dict["pipelineSpec"], sort_keys=True))
    else:
        text = json.dumps(job_dict, indent=2, sort_keys=True) + "\n"
    parent = output_path.rsplit("/", 1)[0] if "/" in output_path else ""
    if parent and not fileio.exists(parent):
        fileio.makedirs(parent)
    with fileio.open(output_path, "w") as f:
        f.write(text)
