"""Every cache under one root, named by one environment variable (EMBED_CACHE_DIR)."""
from __future__ import annotations

import re
from pathlib import Path

from embed.runtime import cache_dir, cache_root, default_cache_root


def test_the_variable_names_the_root(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBED_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    assert cache_dir("generators") == tmp_path / "cache" / "generators"
    assert default_cache_root("") == tmp_path / "cache" / "corpus_embeddings"


def test_the_default_root_is_the_projects_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("EMBED_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "mteb-domain-embeddings"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mteb-domain-embeddings"


def test_a_recipe_cache_dir_wins_for_corpus_embeddings(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBED_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_root(str(tmp_path / "mine")) == tmp_path / "mine"


def test_no_stage_script_builds_a_cache_path_of_its_own():
    repo = Path(__file__).resolve().parents[1]
    for script in (repo / "scripts").glob("*.py"):
        text = script.read_text(encoding="utf-8")
        assert not re.search(r"[\"'/~]\.cache\b|expanduser|XDG_CACHE_HOME", text), script
