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
    ("data:\n  encodng: utf-8\n", "unknown setting 'data.encodng'"),
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
