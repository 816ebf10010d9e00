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
    ("student", "learning_rate: 1e-3", r"student.settings: student setting 'learning_rate' must be a "
     r"number, got '1e-3' \(YAML reads a number like 1e-3, without a dot, as text: write 1.0e-3\)"),
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
