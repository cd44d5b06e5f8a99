"""The recipe parser: YAML only, YAML + CLI, unknown keys and wrong types named (TRL's test list)."""
import pytest
import yaml

from embed.config import build_config, parse_recipe
from embed.errors import ConfigError
from embed.recipe import Recipe
from tests.conftest import REPO


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


# ---------------------------------------------------------------- per-item keys, help, paths, check command
@pytest.mark.parametrize("source", ["cli", "yaml"])
def test_a_per_stage_key_given_for_the_whole_section_names_the_stage_key(tmp_path, source):
    argv = (["--train.learning_rate", "1e-5"] if source == "cli"
            else [write(tmp_path, "train:\n  learning_rate: 1.0e-05\n")])
    with pytest.raises(ConfigError) as e:
        build_config(Recipe, argv)
    message = str(e.value)
    assert "unknown key 'train.learning_rate'" in message
    assert "'train.stages.N.learning_rate'" in message and "--train.stages.0.learning_rate" in message
    assert "\n" not in message


def test_the_suggested_stage_key_is_accepted():
    cfg = build_config(Recipe, ["--train.stages.0.learning_rate", "1e-5"])
    assert cfg.train.stages[0].learning_rate == pytest.approx(1e-5)


def test_help_shows_the_list_index_syntax_and_per_stage_keys(capsys):
    with pytest.raises(SystemExit):
        parse_recipe("train", ["--help"])
    out = capsys.readouterr().out
    assert "--train.stages.0.learning_rate" in out  # the syntax, with an example
    assert "--train.stages.N.learning_rate (float) = 2.0e-05" in out  # every per-stage key, with its default
    assert "--train.stages.N.num_negatives (int) = 1" in out


def test_a_missing_corpus_fails_before_the_run_folder_exists(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"key 'data.corpus': .*nope does not exist"):
        parse_recipe("gen", ["--run_dir", str(run_dir), "--data.corpus", str(tmp_path / "nope")])
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="key 'data.corpus'"):
        parse_recipe("gen", ["--run_dir", str(run_dir), "--data.corpus", "data/scifactt"])  # relative, no ./
    assert not run_dir.exists()


@pytest.mark.parametrize("spec", ["builtin:stdlib-code/train", "some_hf_dataset", ""])
def test_specs_the_loaders_resolve_are_not_checked_as_paths(tmp_path, spec):
    parse_recipe("gen", ["--run_dir", str(tmp_path / "run"), "--data.corpus", spec])
    assert (tmp_path / "run" / "gen_config.yaml").is_file()


def test_check_command_validates_every_stage_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    recipe = write(tmp_path, f"run_dir: {run_dir}\n")
    ok = subprocess.run([sys.executable, "-m", "embed.config", recipe], capture_output=True, text=True)
    assert ok.returncode == 0 and "recipe ok" in ok.stdout and not run_dir.exists()
    bad = subprocess.run([sys.executable, "-m", "embed.config", recipe, "--train.learning_rate", "1e-5"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("error: unknown key")


@pytest.mark.parametrize("recipe, stages", [
    ("scifact-minilm-cpu.yaml", ["gen", "mine", "train", "eval"]),   # trains on the generated queries
    ("scifact-mine-minilm-cpu.yaml", ["mine", "train", "eval"]),     # mines judged pairs: nothing to generate
    ("scifact-supervised-cpu.yaml", ["train", "eval"]),              # reads the judged pairs directly
])
def test_pipeline_runs_only_the_stages_a_recipe_needs(tmp_path, recipe, stages):
    from embed.config import load_recipe, pipeline_stages

    if not (REPO.parent / "shared" / "data" / "scifact").is_dir():
        pytest.skip("the SciFact recipes name ../shared/data/scifact, absent here")
    config = load_recipe([str(REPO / "recipes" / recipe), "--run_dir", str(tmp_path / "run")])
    assert pipeline_stages(config) == stages
