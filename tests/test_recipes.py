"""Every shipped recipe and accelerate config loads; README commands name files that exist."""
import re
from pathlib import Path

import pytest
import yaml

from embed.config import build_config
from embed.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
ACCEL = sorted((REPO / "accelerate_configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(recipe):
    cfg = build_config(Recipe, [str(recipe)])
    cfg.validate()
    assert cfg.run_dir.startswith("runs/"), "recipes write under runs/ (git-ignored)"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_header_states_hardware_batch_and_wall_clock(recipe):
    """A recipe opens with what a user needs before renting the machine; measurements and dev-set
    history live in README.md / bench/README.md, so no dated result appears in a recipe."""
    text = recipe.read_text()
    header = "\n".join(line for line in text.splitlines()[:next(
        i for i, line in enumerate(text.splitlines()) if not line.startswith("#"))])
    for stated in ("Hardware:", "Global batch", "Wall-clock"):
        assert stated in header, f"{recipe.name}: the header comment does not state '{stated}'"
    dated = re.search(r"^.*\b20\d\d-\d\d-\d\d\b.*$", text, re.M)
    assert dated is None, f"{recipe.name}: a dated measurement belongs in README.md: {dated and dated.group(0)}"


@pytest.mark.parametrize("config", ACCEL, ids=lambda p: p.name)
def test_accelerate_config_loads(config):
    from accelerate.commands.config.config_args import load_config_from_file

    data = yaml.safe_load(config.read_text())
    assert data["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED", "MULTI_CPU")
    loaded = load_config_from_file(str(config))
    assert loaded.mixed_precision in ("no", "fp16", "bf16")
    if data["distributed_type"] == "DEEPSPEED":
        assert "deepspeed_config_file" not in data["deepspeed_config"]  # inline keys only


def test_expected_files_exist():
    names = {p.name for p in ACCEL}
    assert {"cpu.yaml", "t4_fp16.yaml", "a100_bf16.yaml", "zero2.yaml", "zero3.yaml"} <= names


def test_readme_commands_name_existing_files():
    readme = (REPO / "README.md").read_text()
    for path in set(re.findall(r"\b((?:recipes|accelerate_configs|scripts|bench)/[\w.\-/]+\.(?:yaml|py|sh))", readme)):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"
