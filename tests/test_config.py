"""The recipe parser: YAML only, YAML + CLI, unknown keys and wrong types named (TRL's test list)."""
import pytest
import yaml

from embed.config import ConfigError, build_config, parse_recipe
from embed.recipe import Recipe


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_only(tmp_path):
    cfg = build_config(Recipe, [write(tmp_path, "run_dir: x\ntrain:\n  per_device_batch_size: 8\n  temperature: 2.0e-02\n")])
    assert cfg.run_dir == "x" and cfg.train.per_device_batch_size == 8 and cfg.train.temperature == 0.02
    assert cfg.model.name_or_path == "minilm"  # untouched keys keep their defaults


def test_cli_overrides_yaml(tmp_path):
    path = write(tmp_path, "train:\n  per_device_batch_size: 8\n  stages:\n    - name: a\n      learning_rate: 1.0e-05\n")
    cfg = build_config(Recipe, [path, "--train.per_device_batch_size", "4", "--train.stages.0.learning_rate=3e-5",
                                "--data.eval", "some/dir", "--train.gradient_checkpointing"])
    assert cfg.train.per_device_batch_size == 4
    assert cfg.train.stages[0].learning_rate == pytest.approx(3e-5) and cfg.train.stages[0].name == "a"
    assert cfg.data.eval == ["some/dir"] and cfg.train.gradient_checkpointing is True


def test_string_values_stay_verbatim(tmp_path):
    cfg = build_config(Recipe, ["--run_dir", "0001", "--model.query_prompt", "query: "])
    assert cfg.run_dir == "0001" and cfg.model.query_prompt == "query: "


@pytest.mark.parametrize("text,key", [
    ("trian:\n  max_steps: 3\n", "trian"),
    ("train:\n  learning_rate: 1.0\n", "train.learning_rate"),
    ("train:\n  stages:\n    - name: a\n      lr: 1.0\n", "train.stages.0.lr"),
])
def test_unknown_yaml_key_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        build_config(Recipe, [write(tmp_path, text)])


def test_unknown_cli_key_is_named():
    with pytest.raises(ConfigError, match="unknown key 'train.max_stepz'.*did you mean 'train.max_steps'"):
        build_config(Recipe, ["--train.max_stepz", "3"])


@pytest.mark.parametrize("argv,key", [
    (["--train.per_device_batch_size", "many"], "train.per_device_batch_size"),
    (["--train.per_device_batch_size", "1.5"], "train.per_device_batch_size"),
    (["--model.pooling", "max"], "model.pooling"),
    (["--train.gradient_checkpointing", "yes please"], "train.gradient_checkpointing"),
    (["--train.temperature", "cold"], "train.temperature"),
])
def test_wrong_type_is_named(argv, key):
    with pytest.raises(ConfigError, match=f"key '{key}' must be"):
        build_config(Recipe, argv)


def test_wrong_type_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match="key 'seed' must be int"):
        build_config(Recipe, [write(tmp_path, "seed: forty\n")])


def test_invalid_yaml_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"r.yaml line 2"):
        build_config(Recipe, [write(tmp_path, "seed: 1\ntrain: {a: [}\nrun_dir: x\n")])


def test_parse_recipe_saves_merged_config(tmp_path):
    run_dir = tmp_path / "run"
    cfg = parse_recipe("train", [write(tmp_path, "seed: 7\n"), "--run_dir", str(run_dir), "--train.max_steps", "5"])
    saved = yaml.safe_load((run_dir / "train_config.yaml").read_text())
    assert saved["seed"] == 7 and saved["train"]["max_steps"] == 5 and cfg.train.max_steps == 5


def test_help_lists_keys_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        parse_recipe("train", ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--train.per_device_batch_size (int) = 32" in out and "--data.corpus" in out
