import pytest

from pipeline import configs


def test_defaults_are_valid():
    config = configs.load_config()
    assert config.data.relevance_min == 1.0 and config.splits.train_buckets == 8


def test_yaml_overrides_nested_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  encoding: latin-1\n  relevance_max: 4\nsplits:\n  eval_buckets: 2\n")
    config = configs.load_config(str(path))
    assert (config.data.encoding, config.data.relevance_max, config.splits.eval_buckets) == ("latin-1", 4.0, 2)
    assert isinstance(config.data.relevance_max, float)


@pytest.mark.parametrize("text,message", [
    ("data:\n  encodng: utf-8\n", r"unknown setting 'data.encodng' \(did you mean 'encoding'\?\)"),
    ("data:\n  zzz: 1\n", r"unknown setting 'data.zzz'; known settings here"),
    ("data:\n  relevance_min: high\n", "must be a number"),
    ("data:\n  relevance_min: 3\n  relevance_max: 1\n", "must be below"),
    ("data:\n  encoding: klingon\n", "unknown encoding"),
    ("data:\n  format: xlsx\n", "data.format"),
    ("splits:\n  test_buckets: 0\n", "at least 1"),
    ("data: [1, 2]\n", "expected a mapping"),
])
def test_bad_settings_are_rejected_with_the_setting_named(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(configs.ConfigError, match=message):
        configs.load_config(str(path))


@pytest.mark.parametrize("part", ["teacher", "student"])
def test_a_misspelt_trainer_setting_names_the_setting_meant(tmp_path, part):
    path = tmp_path / "c.yaml"
    path.write_text(f"{part}:\n  settings:\n    epoch: 3\n")
    config = configs.load_config(str(path))
    build = getattr(configs, f"{part}_custom_config")
    with pytest.raises(configs.ConfigError, match=rf"{part}.settings: .*'epoch' \(did you mean 'epochs'\?\)"):
        build(config)


@pytest.mark.parametrize("part,setting,message", [
    ("student", "learning_rate: '1e-3'", r"student.settings: student setting 'learning_rate' must be a "
     r"number, got '1e-3'"),
    ("student", "term_gating: 1", "student setting 'term_gating' must be true or false, got 1"),
    ("student", "ndcg_topn: ten", "student setting 'ndcg_topn' must be a list, got 'ten'"),
    ("teacher", "epochs: 2.5", "teacher setting 'epochs' must be a whole number, got 2.5"),
    ("teacher", "tiny_encoder: 3", "teacher setting 'tiny_encoder' must be a mapping, got 3"),
])
def test_a_trainer_setting_of_the_wrong_type_is_refused_before_the_run(tmp_path, part, setting, message):
    # Not minutes into the run, where the trainer would first compare or multiply it.
    path = tmp_path / "c.yaml"
    path.write_text(f"{part}:\n  settings:\n    {setting}\n")
    with pytest.raises(configs.ConfigError, match=message):
        getattr(configs, f"{part}_custom_config")(configs.load_config(str(path)))


def test_missing_config_file():
    with pytest.raises(configs.ConfigError, match="not found"):
        configs.load_config("/nonexistent/config.yaml")


def test_graph_settings_use_the_graph_module_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("graph:\n  max_order: 3\n  top_n: 5\n")
    config = configs.load_config(str(path))
    assert (config.graph.max_order, config.graph.top_n) == (3, 5)
    path.write_text("graph:\n  max_order: 4\n")
    with pytest.raises(configs.ConfigError, match="graph: max_order"):
        configs.load_config(str(path))
    path.write_text("graph:\n  hub_cap: 2.5\n")
    with pytest.raises(configs.ConfigError, match="whole number"):
        configs.load_config(str(path))


def test_the_home_depot_profile_loads_and_builds_valid_trainer_settings():
    import os

    from trainer import student, teacher

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "pipeline", "profiles", "homedepot.yaml")
    config = configs.load_config(path)
    assert config.teacher.profile == "full"
    teacher_config = teacher.TeacherConfig.from_custom_config(configs.teacher_custom_config(config))
    assert teacher_config.num_layers == 6 and teacher_config.epochs >= 1
    student_config = student.StudentConfig.from_custom_config(configs.student_custom_config(config))
    assert student_config.max_order == config.graph.max_order
    assert student_config.human_loss_weight > 0
    # The whole file's 58,789 pairs fit both buffers, so every split is read in one order and a
    # second run on the same data trains the same models (training.record_dataset).
    assert min(teacher_config.shuffle_buffer, student_config.shuffle_buffer) >= 58789
    assert set(config.evaluation.gates) <= set(configs.GATE_METRICS)


@pytest.mark.parametrize("evaluation,message", [
    ({"gates": {"precision": {"bound": 0.5}}}, "unknown metric 'precision'"),
    ({"gates": {"auc": {"minimum": 0.5}}}, "takes `bound` and/or `max_regression`"),
    ({"gates": {"auc": {"max_regression": -0.1}}}, "max_regression must be >= 0"),
    ({"gated_slices": ["country"]}, "'country' is not a slice"),
    ({"head_share": 0.9, "torso_share": 0.3}, "must be shares of traffic"),
    ({"split": "holdout"}, "evaluation.split must be train, eval or test"),
])
def test_bad_evaluation_settings_are_config_errors(evaluation, message):
    with pytest.raises(configs.ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")):
        configs.load_config(overrides={"evaluation": evaluation})


def test_table_min_impressions_reaches_the_graph_and_the_title_encoder(tmp_path):
    import json

    from pipeline.pipeline import InputSpec, create_pipeline

    path = tmp_path / "c.yaml"
    path.write_text("graph:\n  table_min_impressions: 5\n")
    config = configs.load_config(str(path))
    nodes = {c.id: c for c in create_pipeline(config, str(tmp_path / "root"), InputSpec("/data/logs"),
                                              InputSpec("/data/judgments")).components}
    graph = json.loads(nodes["GraphContexts"].exec_properties["graph_config"])
    assert graph["table_min_impressions"] == 5
    assert nodes["TitleEncoder"].exec_properties["min_impressions"] == 5
    path.write_text("graph:\n  table_min_impressions: -1\n")
    with pytest.raises(configs.ConfigError, match="table_min_impressions must be an int >= 0"):
        configs.load_config(str(path))


def test_yaml_reads_numbers_with_an_exponent_and_no_dot_as_numbers(tmp_path):
    # YAML 1.1 (PyYAML) would read 1e-3 as the text '1e-3'; YAML 1.2 and JSON read a number.
    path = tmp_path / "c.yaml"
    path.write_text("student:\n  settings: {learning_rate: 1e-3}\n"
                    "kubeflow:\n  resources: {StudentTrainer: {memory_gb: 2E1, cpu: +4e0}}\n")
    config = configs.load_config(str(path))
    assert config.student.settings["learning_rate"] == 0.001
    assert config.kubeflow.resources["StudentTrainer"] == {"memory_gb": 20.0, "cpu": 4.0}


@pytest.mark.parametrize("name,text", [
    ("c.yaml", "graph: {max_order: 1}\nteacher: {profile: quick}\ngraph: {top_n: 5}\n"),
    ("c.yaml", "data:\n  encoding: utf-8\n  encoding: latin-1\n"),
    ("c.json", '{"graph": {"top_n": 3}, "graph": {"max_order": 1}}'),
])
def test_a_key_given_twice_is_refused_rather_than_the_later_silently_winning(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(configs.ConfigError, match="is given twice"):
        configs.load_config(str(path))


@pytest.mark.parametrize("content,message", [
    ("false\n", "config: expected a mapping, got bool"),
    ("[]\n", "config: expected a mapping, got list"),
    (b"# caf\xe9\ndata: {encoding: utf-8}\n", "is not UTF-8 text"),
])
def test_a_config_that_is_no_mapping_or_no_utf8_text_is_refused(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(configs.ConfigError, match=message):
        configs.load_config(str(path))
    with pytest.raises(configs.ConfigError, match="is not a file"):
        configs.load_config(str(tmp_path))


def test_gates_and_step_resources_are_overridden_entry_by_entry_and_null_removes():
    config = configs.load_config(overrides={"evaluation": {"gates": {"auc": {"bound": 0.7}}}})
    assert config.evaluation.gates["auc"] == {"bound": 0.7, "max_regression": 0.01}  # kept
    assert config.evaluation.gates["ndcg"] == {"bound": 0.5, "max_regression": 0.02}
    config = configs.load_config(overrides={"evaluation": {"gates": {
        "auc": None, "ndcg": {"max_regression": None}, "judgment_mse": {"bound": 0.2}}}})
    assert config.evaluation.gates == {"ndcg": {"bound": 0.5}, "judgment_mse": {"bound": 0.2}}


@pytest.mark.parametrize("overrides,message", [
    ({"evaluation": {"item_degree_edges": [5, 2, "a"]}}, r"'evaluation.item_degree_edges\[2\]' must be a number"),
    ({"evaluation": {"extra_slices": ["brand", 7]}}, "'evaluation.extra_slices' must be a list of strings, got 7"),
    ({"beam_pipeline_args": ["--runner=DirectRunner", True]}, "'beam_pipeline_args' must be a list of strings"),
    ({"kubeflow": {"beam_pipeline_args": [1]}}, "'kubeflow.beam_pipeline_args' must be a list of strings"),
    ({"data": {"relevance_min": float("nan")}}, "'data.relevance_min' must be a number, got nan"),
    ({"data": {"relevant_threshold": 5}}, r"data.relevant_threshold \(5.0\) must lie above"),
    ({"data": {"relevant_threshold": 1}}, r"data.relevant_threshold \(1.0\) must lie above"),
    ({"data": {"max_title_chars": 0}}, "data.max_title_chars must be at least 1"),
    ({"evaluation": {"gates": {"auc": {"bound": 1.5}}}}, r"gates.auc.bound must lie in \[0, 1\]"),
    ({"evaluation": {"gates": {"judgment_mse": {"bound": -1}}}}, r"gates.judgment_mse.bound must lie in \[0, 1\]"),
    ({"evaluation": {"gates": {"teacher_agreement": {"bound": -2}}}}, r"must lie in \[-1, 1\]"),
    ({"serving": {"model_name": ".."}}, "serving.model_name must be a plain name"),
    ({"name": " "}, "name must not be empty"),
    ({"kubeflow": {"image": "my image:1"}}, "kubeflow.image must name a container image"),
    ({"default_data": {"num_items": -5}}, "default_data: num_items must be at least 200"),
    ({"default_data": {"seed": -1}}, "default_data: seed must be 0 or more"),
    ({"default_data": {"fault_rate": 1.5}}, r"default_data: fault_rate must be in \[0, 0.5\)"),
])
def test_values_no_run_could_use_are_refused_with_the_setting_named(overrides, message):
    with pytest.raises(configs.ConfigError, match=message):
        configs.load_config(overrides=overrides)


def test_the_teacher_learning_rate_must_be_positive():
    config = configs.load_config(overrides={"teacher": {"settings": {"learning_rate": -1}}})
    with pytest.raises(configs.ConfigError, match="teacher.settings: learning_rate must be > 0"):
        configs.teacher_custom_config(config)
