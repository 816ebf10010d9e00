"""The Kubeflow Pipelines v2 / Vertex AI packaging: compiled spec, runtime parameters, image, metadata.

Everything is checked against whatever `create_pipeline` returns, so a component added to the
DAG later is covered without changing these tests.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from pipeline import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
TFX_ENTRYPOINT = ["python", "-m", "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"]
CLUSTER_BEAM_ARGS = ["--runner=DataflowRunner", "--project=acme-ml", "--region=europe-west4",
                     "--temp_location=gs://acme-ml/relkd/tmp", "--experiments=use_runner_v2"]
LOCAL_BEAM_ARGS = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def cluster_settings(schema_dir, beam_args=CLUSTER_BEAM_ARGS):
    return {
        "graph": {"max_order": 3, "top_n": 7, "table_min_impressions": 8},
        "teacher": {"settings": {"epochs": 2}},
        "data": {"max_quarantine_fraction": 0.02},
        "enable_cache": True,
        "kubeflow": {
            "image": "europe-docker.pkg.dev/acme-ml/ml/relkd:1.2.3",
            "pipeline_root": "gs://acme-ml/relkd/root",
            "logs_uri": "gs://acme-ml/relkd/data/logs",
            "logs_pattern": "*.csv",
            "judgments_uri": "gs://acme-ml/relkd/data/judgments",
            "schema_dir": schema_dir,
            "beam_pipeline_args": list(beam_args),
        },
    }


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The pipeline compiled for a cluster config, written as JSON (Vertex) and YAML (KFP)."""
    from kubeflow import runner
    from schemas import SCHEMA_DIR

    out = tmp_path_factory.mktemp("kubeflow")
    config = configs.load_config(overrides=cluster_settings(SCHEMA_DIR))
    job = runner.compile_pipeline(config, str(out / "pipeline.json"))
    runner.compile_pipeline(config, str(out / "pipeline.yaml"))
    return {"config": config, "job": job, "json": out / "pipeline.json", "yaml": out / "pipeline.yaml"}


@pytest.fixture(scope="module")
def runnable_job():
    """Compiled with DirectRunner arguments, for running single tasks through TFX's container entrypoint."""
    from kubeflow import runner
    from schemas import SCHEMA_DIR

    config = configs.load_config(overrides=cluster_settings(SCHEMA_DIR, LOCAL_BEAM_ARGS))
    return runner.compile_pipeline(config)


def _spec(job):
    return job["pipelineSpec"]


def _tasks(job):
    return _spec(job)["root"]["dag"]["tasks"]


def local_pipeline(config):
    from pipeline.pipeline import InputSpec, create_pipeline

    return create_pipeline(config, "/tmp/relkd-root", InputSpec("/data/logs"), InputSpec("/data/judgments"))


# --- the compiled spec -------------------------------------------------------------------------

def test_compiled_files_parse_into_the_pipeline_protos(compiled):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    with open(compiled["json"]) as f:
        job_dict = json.load(f)
    assert job_dict == json.loads(json.dumps(compiled["job"]))
    job = json_format.ParseDict(job_dict, pipeline_spec_pb2.PipelineJob())  # strict: no unknown fields
    spec = json_format.ParseDict(job_dict["pipelineSpec"], pipeline_spec_pb2.PipelineSpec())
    assert spec.schema_version == "2.1.0" and spec.sdk_version.startswith("tfx-")
    assert spec.pipeline_info.name == "relkd" and job.display_name == "relkd"
    assert spec.default_pipeline_root == job.runtime_config.gcs_output_directory == "gs://acme-ml/relkd/root"

    with open(compiled["yaml"]) as f:
        yaml_spec = yaml.safe_load(f)  # KFP's client wants the bare PipelineSpec
    assert yaml_spec == job_dict["pipelineSpec"]
    json_format.ParseDict(yaml_spec, pipeline_spec_pb2.PipelineSpec())


# KFP v2 compiles the latest-blessed-model Resolver into two ML Metadata queries: the newest
# blessing, then the model it blessed.
RESOLVER = "LatestBlessedStudent"
RESOLVER_TASKS = (f"{RESOLVER}-model-blessing-resolver", f"{RESOLVER}-model-resolver")


def _node_of(task_name):
    return RESOLVER if task_name in RESOLVER_TASKS else task_name


def test_every_component_is_a_task_with_the_same_upstream_dependencies(compiled):
    local = local_pipeline(compiled["config"])
    expected = {c.id: sorted(n.id for n in c.upstream_nodes) for c in local.components}
    tasks = _tasks(compiled["job"])
    assert sorted({_node_of(t) for t in tasks}) == sorted(expected)
    assert all(t in tasks for t in RESOLVER_TASKS)
    compiled_upstream = {}
    for name, task in tasks.items():
        upstream = {_node_of(t) for t in task.get("dependentTasks", [])} - {_node_of(name)}
        compiled_upstream.setdefault(_node_of(name), set()).update(upstream)
    assert {name: sorted(deps) for name, deps in compiled_upstream.items()} == expected
    for name, task in tasks.items():
        assert task["componentRef"]["name"] == name and task["taskInfo"]["name"] == name
        if name not in RESOLVER_TASKS:
            assert task["cachingOptions"] == {"enableCache": True}
    # The DAG as the README draws it, as a sanity check on the comparison itself.
    assert expected["GraphContexts"] == ["DataValidationGate", "JudgmentsExampleGen", "LogsExampleGen"]


def test_the_baseline_query_is_scoped_by_type_and_blessing_only(compiled):
    # What the README's caveat on baselines says: TFX 1.15 compiles LatestBlessedStudent into a
    # query that names neither the pipeline nor the StudentEvaluator. If a TFX upgrade scopes it,
    # this fails and the caveat can go.
    resolvers = {label: executor["resolver"]["outputArtifactQueries"]
                 for label, executor in _spec(compiled["job"])["deploymentSpec"]["executors"].items()
                 if "resolver" in executor}
    blessing = resolvers[f"{RESOLVER_TASKS[0]}_executor"]["model_blessing"]["filter"]
    assert blessing == ('schema_title="tfx.ModelBlessing" AND state=LIVE AND '
                        'metadata.blessed.number_value=1')
    model = resolvers[f"{RESOLVER_TASKS[1]}_executor"]["model"]["filter"]
    assert "current_model_id" in model and "BermServingExporter" not in model


def test_every_task_runs_the_configured_image_with_the_configured_beam_args(compiled):
    spec = _spec(compiled["job"])
    executors = spec["deploymentSpec"]["executors"]
    assert sorted(executors) == sorted(c["executorLabel"] for c in spec["components"].values())
    for label, executor in executors.items():
        if "resolver" in executor:  # an ML Metadata query, no container
            assert label.startswith(RESOLVER), label
            continue
        container = executor["container"]
        assert container["image"] == "europe-docker.pkg.dev/acme-ml/ml/relkd:1.2.3", label
        assert container["command"] == TFX_ENTRYPOINT, label
        assert container["args"][-len(CLUSTER_BEAM_ARGS):] == CLUSTER_BEAM_ARGS, label


def test_runtime_parameters_appear_with_their_defaults(compiled):
    from kubeflow import runner

    job = compiled["job"]
    params = {p.name: p for p in runner.runtime_parameters(compiled["config"])}
    expected_defaults = {"logs_uri": "gs://acme-ml/relkd/data/logs",
                         "judgments_uri": "gs://acme-ml/relkd/data/judgments",
                         "max_quarantine_fraction": 0.02, "graph_max_order": 3, "graph_top_n": 7,
                         "graph_table_min_impressions": 8, "teacher_epochs": 2}
    assert {name: params[name].default for name in expected_defaults} == expected_defaults
    kinds = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE"}
    declared = _spec(job)["root"]["inputDefinitions"]["parameters"]
    assert {name: (d["parameterType"], d["defaultValue"]) for name, d in declared.items()} == {
        name: (kinds[p.ptype], p.default) for name, p in params.items()}
    assert job["runtimeConfig"]["parameterValues"] == {name: p.default for name, p in params.items()}

    # Which step reads which parameter, and every declared parameter is read somewhere.
    consumers = {}
    for task_name, task in _tasks(job).items():
        for key, value in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in value:
                consumers.setdefault(value["componentInputParameter"], set()).add(f"{task_name}.{key}")
    assert sorted(consumers) == sorted(declared)  # none declared but unused
    expected_consumers = {
        "logs_uri": "LogsExampleGen.input_base",
        "judgments_uri": "JudgmentsExampleGen.input_base",
        "max_quarantine_fraction": "DataValidationGate.max_quarantine_fraction",
        "graph_max_order": "GraphContexts.max_order",
        "graph_top_n": "GraphContexts.top_n",
        "graph_table_min_impressions": "GraphContexts.table_min_impressions",
        "teacher_epochs": "TeacherTrainer.epochs",
    }
    for name, consumer in expected_consumers.items():
        assert consumer in consumers[name], name
    assert "StudentTrainer.max_order" in consumers["graph_max_order"]  # the student follows the graph
    # The titles get vectors for the nodes that get tables.
    assert "TitleEncoder.min_impressions" in consumers["graph_table_min_impressions"]
    # What is not a runtime parameter is compiled in from the config.
    example_gen = _tasks(job)["LogsExampleGen"]["inputs"]["parameters"]
    assert "*.csv" in example_gen["input_config"]["runtimeValue"]["constant"]


def test_everything_the_spec_names_resolves_in_this_environment(compiled):
    from kubeflow import image_check

    found = image_check.referenced(compiled["job"])
    assert ("TeacherTrainer", "trainer.teacher.run_fn") in found["functions"]
    assert {path for _, path in found["files"]} == {
        os.path.join(compiled["config"].kubeflow.schema_dir, f"{k}.pbtxt") for k in ("logs", "judgments")}
    assert "components.Quarantine" in {path for _, path in found["classes"]}
    assert sorted(found["modules"]) == [("StudentEvaluator", "components.tfma_extensions"),
                                        ("TeacherEvaluator", "components.tfma_extensions")]
    assert image_check.problems(compiled["job"]) == []


def test_custom_artifact_type_names_are_import_paths():
    # Kubeflow V2 accepts a custom type only as `<module>.<Class>` and imports it back from there.
    from tfx.utils import import_utils

    from components import artifacts
    from tfx.types.artifact import Artifact

    custom = [v for v in vars(artifacts).values()
              if isinstance(v, type) and issubclass(v, Artifact) and v.__module__ == artifacts.__name__]
    assert custom
    for cls in custom:
        assert re.fullmatch(r"[a-z][a-z0-9-_]{2,20}\.[A-Z][a-zA-Z0-9-_]{2,49}", cls.TYPE_NAME), cls
        assert import_utils.import_class_by_path(cls.TYPE_NAME) is cls


def test_the_local_pipeline_is_unchanged_by_the_kubeflow_knobs():
    from tfx.orchestration.data_types import RuntimeParameter

    config = configs.load_config()
    local = local_pipeline(config)
    for component in local.components:
        for name, value in component.exec_properties.items():
            assert not isinstance(value, RuntimeParameter), (component.id, name)
    by_id = {c.id: c for c in local.components}
    assert by_id["GraphContexts"].exec_properties.get("max_order") is None
    assert by_id["GraphContexts"].exec_properties.get("table_min_impressions") is None
    assert by_id["TitleEncoder"].exec_properties["min_impressions"] == config.graph.table_min_impressions
    assert by_id["TeacherTrainer"].exec_properties.get("epochs") is None
    assert by_id["DataValidationGate"].exec_properties["max_quarantine_fraction"] == config.data.max_quarantine_fraction
    schema_file = by_id["LogsSchemaImporter"].exec_properties["schema_file"]
    assert os.path.isfile(schema_file) and schema_file.startswith(REPO)


# --- single tasks through TFX's container entrypoint, as the cluster runs them ----------------

def run_task(job, task_name, workdir, parameter_values=None, inputs=None, replace=None):
    """Runs one compiled task the way a Kubeflow v2 / Vertex AI launcher does.

    The launcher fills the task's `{{$}}` placeholder with an ExecutorInput: parameter values
    (constants, or pipeline parameters with their defaults), input artifacts and output
    locations. `inputs` maps an input key to (uri, split_names); `replace` swaps constants.
    Returns the executor's outputs as an ExecutorOutput dict.
    """
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_run_executor

    spec = _spec(job)
    task = spec["root"]["dag"]["tasks"][task_name]
    component = spec["components"][task["componentRef"]["name"]]
    container = spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
    pipeline_values = {**{k: v["defaultValue"] for k, v in spec["root"]["inputDefinitions"]["parameters"].items()},
                       **(parameter_values or {})}
    executor_input = pipeline_spec_pb2.ExecutorInput()
    for key, value in task.get("inputs", {}).get("parameters", {}).items():
        if "componentInputParameter" in value:
            v = pipeline_values[value["componentInputParameter"]]
        else:
            v = value["runtimeValue"]["constant"]
        v = (replace or {}).get(key, v)
        json_format.ParseDict(v, executor_input.inputs.parameter_values[key])
    for key, (uri, splits) in (inputs or {}).items():
        artifact = executor_input.inputs.artifacts[key].artifacts.add()
        artifact.type.instance_schema = component["inputDefinitions"]["artifacts"][key]["artifactType"]["instanceSchema"]
        artifact.uri = uri
        if splits:
            artifact.metadata.update({"split_names": json.dumps(splits)})
    for key, definition in component.get("outputDefinitions", {}).get("artifacts", {}).items():
        artifact = executor_input.outputs.artifacts[key].artifacts.add()
        artifact.type.instance_schema = definition["artifactType"]["instanceSchema"]
        artifact.uri = str(workdir / task_name / key)
        os.makedirs(artifact.uri, exist_ok=True)
    executor_input.outputs.output_file = str(workdir / task_name / "executor_output.json")
    argv = [json_format.MessageToJson(executor_input) if a == "{{$}}" else a for a in container["args"]]
    args, beam_args = kubeflow_v2_run_executor._parse_flags(argv)
    kubeflow_v2_run_executor._run_executor(args, beam_args)
    with open(executor_input.outputs.output_file) as f:
        return json.load(f)


def _write_anomalies(path):
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    os.makedirs(os.path.join(path, "Split-train"))
    with open(os.path.join(path, "Split-train", "SchemaDiff.pb"), "wb") as f:
        f.write(anomalies_pb2.Anomalies().SerializeToString())
    return str(path), ["train"]


def _write_quarantine(path, rows_in, quarantined):
    os.makedirs(path)
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({"rows_in": rows_in, "accepted": rows_in - quarantined, "quarantined": quarantined,
                   "quarantined_by_reason": {"empty_text": quarantined}}, f)
    return str(path), None


def test_the_gate_threshold_is_taken_per_run(runnable_job, tmp_path):
    from components.data_gate import DataRejectedError

    inputs = {"logs_anomalies": _write_anomalies(tmp_path / "la"),
              "judgments_anomalies": _write_anomalies(tmp_path / "ja"),
              "logs_quarantine": _write_quarantine(tmp_path / "lq", 100, 3),  # 3 % quarantined
              "judgments_quarantine": _write_quarantine(tmp_path / "jq", 100, 0)}
    with pytest.raises(DataRejectedError, match="above the limit of 2.00%"):  # the compiled default
        run_task(runnable_job, "DataValidationGate", tmp_path / "default", inputs=inputs)
    output = run_task(runnable_job, "DataValidationGate", tmp_path / "per_run", inputs=inputs,
                      parameter_values={"max_quarantine_fraction": 0.05})
    [report] = output["artifacts"]["report"]["artifacts"]
    with open(os.path.join(report["uri"], "report.json")) as f:
        verdict = json.load(f)
    assert verdict["passed"] and verdict["max_quarantine_fraction"] == 0.05


def test_input_location_is_taken_per_run_without_the_local_driver(runnable_job, tmp_path):
    # On a cluster the ExampleGen runs without the local FileBasedDriver: input_base comes
    # from the runtime parameter and the pattern from the compiled input_config.
    data = tmp_path / "june"
    data.mkdir()
    lines = ["query,item_id,item_title,impressions,clicks"]
    lines += [f"q{i},P{i},Item {i},10,{i % 3}" for i in range(40)] + [",P99,No query,5,1"]
    (data / "logs.csv").write_text("\n".join(lines) + "\n")
    (data / "ignored.txt").write_text("not matched by logs_pattern *.csv\n")
    output = run_task(runnable_job, "LogsExampleGen", tmp_path / "run", parameter_values={"logs_uri": str(data)})
    [quarantine] = output["artifacts"]["quarantine"]["artifacts"]
    with open(os.path.join(quarantine["uri"], "summary.json")) as f:
        summary = json.load(f)
    assert (summary["rows_in"], summary["accepted"], summary["quarantined"]) == (41, 40, 1)
    [examples] = output["artifacts"]["examples"]["artifacts"]
    assert sorted(os.listdir(examples["uri"])) == ["Split-eval", "Split-test", "Split-train"]


def test_a_beam_step_in_its_own_container_packs_no_tfx_sdist(runnable_job, tmp_path, monkeypatch):
    # DirectRunner arguments: Beam runs in the step's pod, which has TFX already; without the
    # image flag the compiler adds, TFX would build an sdist of itself here (README, "Beam at scale").
    from tfx.utils import dependency_utils

    built = []
    monkeypatch.setattr(dependency_utils, "build_ephemeral_package", lambda: built.append(1) or "x")
    [task_args] = {tuple(a for a in executor["container"]["args"] if a.startswith("--direct") or
                         a.startswith("--sdk_container_image"))
                   for executor in _spec(runnable_job)["deploymentSpec"]["executors"].values()
                   if "container" in executor}
    assert task_args == (*LOCAL_BEAM_ARGS, "--sdk_container_image=europe-docker.pkg.dev/acme-ml/ml/relkd:1.2.3")
    data = tmp_path / "logs"
    data.mkdir()
    (data / "logs.csv").write_text("query,item_id,item_title,impressions,clicks\n"
                                   + "".join(f"q{i},P{i},Item {i},10,1\n" for i in range(20)))
    output = run_task(runnable_job, "LogsExampleGen", tmp_path / "run", parameter_values={"logs_uri": str(data)})
    assert output["artifacts"]["examples"]["artifacts"] and built == []


def test_the_table_bound_is_taken_per_run(runnable_job, tmp_path):
    from conftest import write_title_split
    from trainer import sentence_vectors

    examples = tmp_path / "examples"
    # Impressions in all: cordless drill 5, hammer drill 4, paint brush 9; the query drill 7.
    write_title_split(str(examples), "train", [("drill", "cordless drill", 3), ("drill", "hammer drill", 4),
                                               ("hose", "garden hose", 1)])
    write_title_split(str(examples), "eval", [("paint", "cordless drill", 2), ("brush", "paint brush", 9)])

    def encoded(run, parameter_values=None):
        output = run_task(runnable_job, "TitleEncoder", tmp_path / run, parameter_values=parameter_values,
                          inputs={"examples": (str(examples), ["train", "eval"])})
        [vectors] = output["artifacts"]["title_vectors"]["artifacts"]
        got = sentence_vectors.read_sentence_vectors(vectors["uri"])
        return got.titles, got.queries

    assert encoded("compiled") == (["paint brush"], [])  # the compiled bound: 8
    assert encoded("per_run", {"graph_table_min_impressions": 4}) == (
        ["cordless drill", "hammer drill", "paint brush"], ["drill"])


def _record_run_fn(fn_args):
    """Stands in for trainer.teacher.run_fn: records what the module would get."""
    os.makedirs(fn_args.serving_model_dir, exist_ok=True)
    with open(os.path.join(fn_args.serving_model_dir, "custom_config.json"), "w") as f:
        json.dump(fn_args.custom_config, f)


def _run_fn_custom_config(runnable_job, tmp_path, task, parameter_values):
    """The custom_config the compiled `task`'s run_fn receives in a run with `parameter_values`."""
    examples = tmp_path / "examples"
    for split in ("train", "eval"):
        (examples / f"Split-{split}").mkdir(parents=True)
    output = run_task(runnable_job, task, tmp_path / "run", parameter_values=parameter_values,
                      inputs={"examples": (str(examples), ["train", "eval"])},
                      replace={"run_fn": f"{__name__}._record_run_fn"})
    [model] = output["artifacts"]["model"]["artifacts"]
    with open(os.path.join(model["uri"], "Format-Serving", "custom_config.json")) as f:
        return json.load(f)


def test_teacher_epochs_are_taken_per_run(runnable_job, tmp_path):
    from pipeline.configs import teacher_custom_config
    from schemas import SCHEMA_DIR

    compiled_custom_config = teacher_custom_config(configs.load_config(overrides=cluster_settings(SCHEMA_DIR)))
    custom_config = _run_fn_custom_config(runnable_job, tmp_path, "TeacherTrainer", {"teacher_epochs": 7})
    # The rest of the compiled custom_config is kept; only epochs comes from the run.
    assert compiled_custom_config["epochs"] == 2
    assert custom_config == {**compiled_custom_config, "epochs": 7}


def test_the_student_takes_the_graph_order_per_run(runnable_job, tmp_path):
    from pipeline.configs import student_custom_config
    from schemas import SCHEMA_DIR

    compiled_custom_config = student_custom_config(configs.load_config(overrides=cluster_settings(SCHEMA_DIR)))
    custom_config = _run_fn_custom_config(runnable_job, tmp_path, "StudentTrainer", {"graph_max_order": 1})
    assert compiled_custom_config["max_order"] == 3
    assert custom_config == {**compiled_custom_config, "max_order": 1}


def test_a_student_order_pinned_in_the_config_is_not_a_runtime_parameter():
    from tfx.orchestration.data_types import RuntimeParameter

    from kubeflow import runner
    from schemas import SCHEMA_DIR

    def student_trainer(settings):
        config = configs.load_config(overrides=settings)
        [node] = [n for n in runner.build_pipeline(config).components if n.id == "StudentTrainer"]
        return node.exec_properties.get("max_order")

    follows = cluster_settings(SCHEMA_DIR)
    assert isinstance(student_trainer(follows), RuntimeParameter)
    pinned = {**follows, "student": {"settings": {"max_order": 1}}}
    assert student_trainer(pinned) is None


def test_graph_overrides_replace_the_json_config():
    from components.graph import executor
    from components.graph.metapaths import GraphConfig

    base = {executor.GRAPH_CONFIG_KEY: json.dumps(GraphConfig(max_order=2, top_n=10, hub_cap=50).to_dict())}
    assert executor.graph_config(base) == GraphConfig(max_order=2, top_n=10, hub_cap=50)
    overridden = executor.graph_config({**base, "max_order": 1, "top_n": 3, "table_min_impressions": 20})
    assert (overridden.max_order, overridden.top_n, overridden.table_min_impressions,
            overridden.hub_cap) == (1, 3, 20, 50)
    with pytest.raises(ValueError, match="max_order"):
        executor.graph_config({**base, "max_order": 9})
    with pytest.raises(ValueError, match="table_min_impressions"):
        executor.graph_config({**base, "table_min_impressions": -1})


def test_runtime_settings_merge_into_custom_config():
    from components.runtime_trainer import merged_exec_properties

    props = {"custom_config": json.dumps({"epochs": 4, "num_layers": 2, "max_order": 2}), "run_fn": "m.f"}
    assert merged_exec_properties(props) == props
    assert merged_exec_properties({**props, "epochs": None, "max_order": None}) == props  # unset
    merged = merged_exec_properties({**props, "epochs": 9})
    assert "epochs" not in merged and json.loads(merged["custom_config"]) == {"epochs": 9, "num_layers": 2,
                                                                              "max_order": 2}
    merged = merged_exec_properties({**props, "max_order": 3})
    assert "max_order" not in merged and json.loads(merged["custom_config"])["max_order"] == 3
    assert json.loads(merged_exec_properties({"custom_config": "null", "epochs": 1})["custom_config"]) == {"epochs": 1}


# --- ML Metadata -------------------------------------------------------------------------------

def test_sqlite_metadata_by_default(tmp_path):
    from pipeline import metadata

    config = configs.load_config()
    connection = metadata.connection_config(config.metadata, str(tmp_path / "m.sqlite"))
    assert connection.sqlite.filename_uri == str(tmp_path / "m.sqlite")
    assert metadata.describe(connection) == str(tmp_path / "m.sqlite")


def test_mysql_metadata_is_built_from_settings_and_the_password_from_the_environment(tmp_path):
    from pipeline import metadata

    path = tmp_path / "shared.yaml"
    path.write_text("metadata:\n  backend: mysql\n  mysql:\n    host: mlmd.internal\n    port: 3307\n"
                    "    database: relkd_prod\n    user: pipelines\n    password_env: MLMD_PW\n")
    config = configs.load_config(str(path))
    connection = metadata.connection_config(config.metadata, "/unused.sqlite", environ={"MLMD_PW": "s3cret"})
    assert connection.WhichOneof("config") == "mysql"
    m = connection.mysql
    assert (m.host, m.port, m.database, m.user, m.password) == ("mlmd.internal", 3307, "relkd_prod", "pipelines", "s3cret")
    assert metadata.describe(connection) == "mysql://pipelines@mlmd.internal:3307/relkd_prod"
    assert "s3cret" not in json.dumps(config.to_dict())
    with pytest.raises(configs.ConfigError, match="MLMD_PW"):
        metadata.connection_config(config.metadata, "/unused.sqlite", environ={})


@pytest.mark.parametrize("text,message", [
    ("metadata:\n  backend: postgres\n", "metadata.backend"),
    ("metadata:\n  mysql:\n    password: hunter2\n", "unknown setting 'metadata.mysql.password'"),
    ("metadata:\n  mysql:\n    port: 0\n", "metadata.mysql.port"),
    ("kubeflow:\n  image: ''\n", "kubeflow.image"),
    ("kubeflow:\n  beam_pipeline_args: --runner=DataflowRunner\n", "must be a list"),
    ("kubeflow:\n  resources:\n    StudentTrainer: {cpus: 8}\n", "StudentTrainer takes cpu and/or memory_gb"),
    ("kubeflow:\n  resources:\n    StudentTrainer: {}\n", "StudentTrainer takes cpu"),
    ("kubeflow:\n  resources:\n    StudentTrainer: 8\n", "StudentTrainer takes cpu"),
    ("kubeflow:\n  resources:\n    StudentTrainer: {cpu: -1}\n", "StudentTrainer.cpu must be a positive number"),
    ("kubeflow:\n  resources:\n    StudentTrainer: {memory_gb: 32GB}\n", "memory_gb must be a positive number"),
    ("kubeflow:\n  resources: [StudentTrainer]\n", "must be a mapping"),
])
def test_bad_kubeflow_and_metadata_settings_are_rejected(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(configs.ConfigError, match=message):
        configs.load_config(str(path))


# --- the image and the installed project -------------------------------------------------------

def _requirement(name):
    with open(os.path.join(REPO, "requirements.txt")) as f:
        for line in f:
            if line.split("==")[0].strip().lower() == name:
                return line.split("==")[1].strip()
    raise AssertionError(f"{name} is not pinned in requirements.txt")


def test_dockerfile_installs_the_pinned_stack_and_the_project():
    with open(os.path.join(REPO, "kubeflow", "Dockerfile")) as f:
        text = f.read()
    instructions = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11[-.\w]*$", instructions, re.M)
    assert re.search(rf"^ARG BEAM_SDK_IMAGE=apache/beam_python3\.11_sdk:{re.escape(_requirement('apache-beam'))}$",
                     instructions, re.M)
    assert "COPY requirements.txt" in instructions
    assert re.search(r"pip install [^&]*--no-deps --ignore-requires-python -r \S*requirements\.txt", instructions)
    project_install = re.search(r"pip install ([^&]*)/tmp/relkd/src", instructions)
    assert project_install and "--no-deps" in project_install.group(1) and "-e" not in project_install.group(1).split()
    assert "RUN python -m kubeflow.image_check" in instructions
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in instructions
    # The official python:3.11 images install into this site-packages: the compiled schema paths.
    assert configs.KubeflowConfig().schema_dir == "/usr/local/lib/python3.11/site-packages/schemas"
    with open(os.path.join(REPO, "kubeflow", "Dockerfile.dockerignore")) as f:
        ignored = f.read().split()
    assert {".venv", "runs", ".git"} <= set(ignored)


def test_relkd_compile_from_a_non_editable_install(tmp_path):
    """Installs the project as the image does (not editable), then runs `relkd compile` from it."""
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    shutil.copy(os.path.join(REPO, "setup.py"), src / "setup.py")
    for package in ("pipeline", "components", "trainer", "schemas", "kubeflow"):
        shutil.copytree(os.path.join(REPO, package), src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "--target", str(site), str(src)], check=True, timeout=120)
    for path in ("schemas/logs.pbtxt", "schemas/judgments.pbtxt", "trainer/teacher.py",
                 "components/runtime_trainer.py", "kubeflow/runner.py"):
        assert (site / path).is_file(), path

    settings = cluster_settings(str(site / "schemas"))
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(settings))
    out = tmp_path / "out" / "pipeline.json"
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [os.path.join(VENV_BIN, "relkd"), "compile", "--kubeflow", str(out), "--config", "cluster.yaml",
         "--image", "registry.example/relkd:test"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Compiled pipeline 'relkd' (" in result.stdout and str(out) in result.stdout
    assert "teacher_epochs: 2 (int, runtime parameter)" in result.stdout
    assert "  graph_table_min_impressions: 8 (int, runtime parameter)" in result.stdout

    with open(out) as f:
        job = json.load(f)
    images = {e["container"]["image"] for e in _spec(job)["deploymentSpec"]["executors"].values()
              if "container" in e}
    assert images == {"registry.example/relkd:test"}
    # Every module the spec names is a file of the installed project (or of an installed library),
    # and the schema files are where the spec says.
    from kubeflow import image_check

    found = image_check.referenced(job)
    for _, path in found["classes"] + found["functions"] + [(w, m + ".x") for w, m in found["modules"]]:
        top = path.split(".")[0]
        if top in ("pipeline", "components", "trainer", "schemas", "kubeflow"):
            module = path.rsplit(".", 1)[0].replace(".", "/")
            assert (site / f"{module}.py").is_file() or (site / module / "__init__.py").is_file(), path
    for _, path in found["files"]:
        assert path.startswith(str(site)) and os.path.isfile(path), path

    # And the CLI really ran from the installed copy.
    where = subprocess.run([sys.executable, "-c", "import kubeflow, schemas; print(kubeflow.__file__, schemas.SCHEMA_DIR)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.split() == [str(site / "kubeflow" / "__init__.py"), str(site / "schemas")]


def test_relkd_compile_reports_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kubeflow:\n  imagee: x\n")
    from pipeline import cli

    assert cli.main(["compile", "--kubeflow", str(tmp_path / "p.json"), "--config", str(bad)]) == 2
    assert not (tmp_path / "p.json").exists()


def test_relkd_compile_prints_the_beam_arguments_the_steps_get(tmp_path, capsys):
    from pipeline import cli

    out = tmp_path / "p.json"
    assert cli.main(["compile", "--kubeflow", str(out), "--image", "registry.example/relkd:9"]) == 0
    printed = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert ("beam args: --direct_running_mode=multi_processing --direct_num_workers=0 "
            "--sdk_container_image=registry.example/relkd:9") in printed
    assert "resources: the platform defaults" in printed
    assert "tf threads: TensorFlow's choice" in printed
    with open(out) as f:
        executors = _spec(json.load(f))["deploymentSpec"]["executors"].values()
    assert all(e["container"]["args"][-1] == "--sdk_container_image=registry.example/relkd:9"
               for e in executors if "container" in e)


def _executors_by_step(job):
    return {label[:-len("_executor")]: executor
            for label, executor in _spec(job)["deploymentSpec"]["executors"].items()}


@pytest.mark.parametrize("beam_args, graph_workers, graph_threads", [
    (None, 4, 1),  # the default: a worker per core of the machine, now as many as the CPU limit
    (["--direct_running_mode=multi_processing", "--direct_num_workers=2"], 2, 2),  # the user's count
    (CLUSTER_BEAM_ARGS, None, 4),  # Dataflow: the limit is the launcher's pod, not Beam's workers
])
def test_step_resources_reach_the_containers_and_bound_beam_workers(beam_args, graph_workers,
                                                                    graph_threads):
    from kubeflow import runner

    settings = {"image": "registry/relkd:7", "resources": {
        "StudentTrainer": {"cpu": 8, "memory_gb": 32}, "GraphContexts": {"cpu": 4.5},
        "TeacherTrainer": {"memory_gb": 24}}}
    if beam_args is not None:
        settings["beam_pipeline_args"] = beam_args
    config = configs.load_config(overrides={"kubeflow": settings})
    executors = _executors_by_step(runner.compile_pipeline(config))
    resources = {step: e["container"]["resources"] for step, e in executors.items()
                 if "resources" in e.get("container", {})}
    assert resources == {"StudentTrainer": {"cpuLimit": 8.0, "memoryLimit": 32.0},
                         "GraphContexts": {"cpuLimit": 4.5}, "TeacherTrainer": {"memoryLimit": 24.0}}
    step_args = runner.step_beam_args(config)
    for step, executor in executors.items():
        if "container" not in executor:
            continue
        args = executor["container"]["args"]
        if step == "GraphContexts" and beam_args is None:
            assert args[-len(step_args) - 1:] == step_args + ["--direct_num_workers=4"]
        else:  # TeacherTrainer runs no Beam; StudentTrainer neither
            assert args[-len(step_args):] == step_args, step
        if step == "GraphContexts":
            workers = runner._beam_options(args[-len(step_args) - 1:])["direct_num_workers"]
            assert workers == (graph_workers or 1), args
    # TensorFlow's pools: the CPU limit, split between a Beam step's worker processes; a step
    # with only a memory limit keeps TensorFlow's choice.
    env = {step: {v["name"]: v["value"] for v in e["container"].get("env", [])}
           for step, e in executors.items() if "container" in e}
    threads = {step: (str(n), str(n)) for step, n in [("StudentTrainer", 8),
                                                      ("GraphContexts", graph_threads)]}
    assert {step: (v["TF_NUM_INTRAOP_THREADS"], v["TF_NUM_INTEROP_THREADS"])
            for step, v in env.items() if v} == threads


def test_tensorflow_sizes_its_thread_pools_from_the_compiled_environment():
    """The names in the containers' env are ones TensorFlow reads: a process started with a
    step's env has that many threads in each pool (compared with a step given one)."""
    from kubeflow import runner

    config = configs.load_config(overrides={"kubeflow": {"resources": {
        "StudentTrainer": {"cpu": 8}, "GraphContexts": {"cpu": 4}}}})  # 4 workers of 1 thread
    executors = _executors_by_step(runner.compile_pipeline(config))
    probe = ("import os, tensorflow as tf; tf.linalg.matmul(tf.ones([64, 64]), tf.ones([64, 64]));"
             "print(len(os.listdir('/proc/self/task')))")

    def threads_with_env_of(step):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        env.update({v["name"]: v["value"] for v in executors[step]["container"]["env"]})
        return int(subprocess.run([sys.executable, "-c", probe], env=env, check=True,
                                  capture_output=True, text=True).stdout)

    assert threads_with_env_of("StudentTrainer") - threads_with_env_of("GraphContexts") == 2 * (8 - 1)


def test_beam_workers_of_a_limited_step_get_its_thread_settings():
    """A Beam step's work runs in worker processes of its own; they inherit the container's
    environment, so the split of its cores reaches the TensorFlow that runs there."""
    from kubeflow import runner

    config = configs.load_config(overrides={"kubeflow": {"resources": {"GraphContexts": {"cpu": 2}}}})
    container = _executors_by_step(runner.compile_pipeline(config))["GraphContexts"]["container"]
    args = container["args"][-len(runner.step_beam_args(config)) - 1:]  # with its worker count
    env = dict(os.environ, **{v["name"]: v["value"] for v in container["env"]})
    # In a script of its own, whose probe Beam's workers can unpickle (not this test module).
    step = subprocess.run([sys.executable, "-c", f"""
import os, apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
with beam.Pipeline(options=PipelineOptions({args!r})) as p:
    (p | beam.Create(range(8))
     | beam.Map(lambda _, os=os, step=os.getpid(): (os.getpid() != step,
                os.environ["TF_NUM_INTRAOP_THREADS"], os.environ["TF_NUM_INTEROP_THREADS"]))
     | beam.Distinct() | beam.Map(print))
"""], env=env, capture_output=True, text=True, timeout=300)
    assert step.returncode == 0, step.stderr[-3000:]
    assert step.stdout.splitlines() == ["(True, '1', '1')"]


def test_relkd_compile_prints_the_step_resources(tmp_path, capsys):
    from pipeline import cli

    path = tmp_path / "c.yaml"
    path.write_text("kubeflow:\n  resources:\n    StudentTrainer: {cpu: 8, memory_gb: 32}\n"
                    "    GraphContexts: {cpu: 4}\n")
    assert cli.main(["compile", "--kubeflow", str(tmp_path / "p.json"), "--config", str(path)]) == 0
    printed = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert "resources: GraphContexts cpu 4; StudentTrainer cpu 8, memory 32 GB" in printed
    assert "tf threads: GraphContexts 1; StudentTrainer 8 per process and pool" in printed


def test_resources_for_a_step_that_runs_no_container_are_refused():
    from kubeflow import runner

    for step, message in [("StudentTrainr", "no step 'StudentTrainr' runs a container \\(did you mean "
                                            "'StudentTrainer'\\?\\); steps: BermServingExporter, "),
                          ("LatestBlessedStudent", "no step 'LatestBlessedStudent' runs a container")]:
        config = configs.load_config(overrides={"kubeflow": {"resources": {step: {"cpu": 2}}}})
        with pytest.raises(configs.ConfigError, match=message):
            runner.compile_pipeline(config)


# --- the README's worked examples ---------------------------------------------------------------

def _readme_kubeflow_yaml_blocks():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Kubeflow Pipelines / Vertex AI\n", 1)[1].split("\n## ", 1)[0]
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.S)]


def test_readme_configs_load_and_their_beam_arguments_parse(tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions

    blocks = _readme_kubeflow_yaml_blocks()
    runners = set()
    for i, block in enumerate(blocks):
        path = tmp_path / f"readme{i}.yaml"
        path.write_text(yaml.safe_dump(block))
        config = configs.load_config(str(path))  # every documented setting exists
        args = config.kubeflow.beam_pipeline_args
        known = PipelineOptions(args).get_all_options()
        for arg in args:
            assert arg.startswith("--") and arg[2:].split("=")[0] in known, arg
        runners |= {a.split("=", 1)[1] for a in args if a.startswith("--runner=")}
    assert {"DataflowRunner", "FlinkRunner"} <= runners


def test_readme_cluster_examples_ship_no_package_of_tfx_to_their_workers():
    # Without a dependency flag TFX packs its installation into an sdist for the workers to
    # pip-install (README, "Beam at scale"); the examples' workers run the relkd image instead.
    from tfx.utils import dependency_utils

    examples = [(block.get("kubeflow") or {}).get("beam_pipeline_args") or []
                for block in _readme_kubeflow_yaml_blocks()]
    cluster = [args for args in examples if any(a.startswith("--runner=") for a in args)]
    assert len(cluster) == 2
    for args in cluster:
        assert dependency_utils.make_beam_dependency_flags(list(args)) == args


@pytest.mark.parametrize("args, added", [
    (None, True),  # the default: multi_processing DirectRunner in the step's container
    ([], False),  # TFX infers nothing from no arguments
    (["--runner=DirectRunner", "--direct_num_workers=2"], True),
    (["--runner=direct"], True),
    (["--setup_file=/app/setup.py"], False),
    (["--sdk_container_image=registry/other:1"], False),
    (["--runner=FlinkRunner", "--flink_master=flink:8081"], False),
    (CLUSTER_BEAM_ARGS, False),
])
def test_steps_running_beam_in_their_container_name_the_image_so_tfx_ships_nothing(
        args, added, monkeypatch):
    from tfx.utils import dependency_utils

    from kubeflow import runner

    def build():
        raise AssertionError("TFX built an sdist of itself")

    monkeypatch.setattr(dependency_utils, "build_ephemeral_package", build)

    settings = {"kubeflow": {"image": "registry/relkd:7"}}
    if args is not None:
        settings["kubeflow"]["beam_pipeline_args"] = args
    config = configs.load_config(overrides=settings)
    step_args = runner.step_beam_args(config)
    given = list(config.kubeflow.beam_pipeline_args)
    assert step_args == given + (["--sdk_container_image=registry/relkd:7"] if added else [])
    if added:
        assert dependency_utils.make_beam_dependency_flags(list(step_args)) == step_args


@pytest.mark.parametrize("text,message", [
    ("name: relkd_homedepot\n", r"name 'relkd_homedepot' cannot name a Kubeflow / Vertex AI pipeline"
                                r".*e.g. 'relkd-homedepot'"),
    ("name: My Relkd!\n", "e.g. 'my-relkd'"),
    ("kubeflow:\n  pipeline_root: s3://bucket/root\n", "kubeflow.pipeline_root: .* reads no s3:// paths"),
    ("kubeflow:\n  serving_base: S3://bucket/serving\n", "kubeflow.serving_base: .* reads no s3:// paths"),
])
def test_relkd_compile_refuses_what_only_a_cluster_would(tmp_path, capsys, text, message):
    from pipeline import cli

    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert cli.main(["compile", "--kubeflow", str(tmp_path / "p.json"), "--config", str(config)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "p.json").exists()


def test_relkd_compile_refuses_empty_flags_and_a_folder_as_config(tmp_path, capsys):
    from pipeline import cli

    out = str(tmp_path / "p.json")
    for flags, message in ((["--image", ""], "kubeflow.image must name a container image, got ''"),
                           (["--config", ""], "--config is empty"),
                           (["--config", str(tmp_path)], "is not a file; give a YAML or JSON file")):
        assert cli.main(["compile", "--kubeflow", out] + flags) == 2
        assert message in capsys.readouterr().err


def test_an_upper_case_yaml_suffix_gets_the_bare_pipeline_spec(tmp_path):
    from kubeflow import runner

    runner.compile_pipeline(configs.load_config(), str(tmp_path / "P.YML"))
    with open(tmp_path / "P.YML") as f:
        spec = yaml.safe_load(f)
    assert "pipelineInfo" in spec and "pipelineSpec" not in spec
