"""Domain-gap analysis on a fixture folder in mteb's results-repo layout (tests/fixtures/mteb_results).

The fixture (regenerate with tests/fixtures/make_mteb_results.py) holds 6 models on 4 tasks of
MTEB(Medical, v1); see that script for which scores are published and which are illustrative.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO

from embed.errors import ConfigError, DataError
from embed.evaluation.domain_analysis import (
    format_report,
    headroom_by_task,
    load_published_results,
    recommend_targets,
    tasks_without_results,
)

RESULTS = REPO / "tests" / "fixtures" / "mteb_results"
BENCHMARK = "MTEB(Medical, v1)"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def published():
    return load_published_results(BENCHMARK, str(RESULTS))


def test_tasks_ranked_by_headroom_over_the_base_model(published):
    benchmark, results = published
    rows = headroom_by_task(benchmark, results, MINILM, small_params=1e9)
    # headroom = best - MiniLM: TRECCOVID 88.4-47.2, SciFact 80.1-64.5, NFCorpus 45.0-31.6;
    # MedicalQARetrieval has no MiniLM result, so it has no headroom and goes last
    assert [r.task for r in rows] == ["TRECCOVID", "SciFact", "NFCorpus", "MedicalQARetrieval"]
    assert [r.headroom for r in rows[:3]] == pytest.approx([0.412, 0.156, 0.134])
    assert rows[3].headroom is None and rows[3].n_models == 2
    # best small (<= 1B params) is bge-base everywhere; it trails NV-Embed-v2 by 10.3 / 5.7 / 7.6
    assert {r.best_small_model for r in rows} == {"BAAI/bge-base-en-v1.5"}
    assert [r.small_gap for r in rows[:3]] == pytest.approx([0.103, 0.057, 0.076])
    assert rows[0].best_model == "nvidia/NV-Embed-v2" and rows[3].best_model == "intfloat/e5-mistral-7b-instruct"
    assert [r.task for r in recommend_targets(rows, top=2)] == ["TRECCOVID", "SciFact"]
    missing = tasks_without_results(benchmark, rows)
    assert "CUREv1" in missing and "SciFact" not in missing


def test_small_threshold_changes_the_best_small_model(published):
    rows = headroom_by_task(*published, MINILM, small_params=5e7)  # bge-base (109M) no longer counts
    scifact = next(r for r in rows if r.task == "SciFact")
    assert scifact.best_small_model == "BAAI/bge-small-en-v1.5" and scifact.best_small == pytest.approx(0.713)


def test_report_prints_table_and_targets(published):
    benchmark, results = published
    rows = headroom_by_task(benchmark, results, MINILM, 1e9)
    report = format_report(benchmark.name, rows, tasks_without_results(benchmark, rows), MINILM, 1e9, top=3)
    assert "| 1 | TRECCOVID | Retrieval | 6 | 47.2 | 88.4 | nvidia/NV-Embed-v2 | +41.2 |" in report
    targets = report.split("Recommended targets")[1]
    assert targets.index("TRECCOVID") < targets.index("SciFact") < targets.index("NFCorpus")
    assert "MedicalQARetrieval" not in targets


def test_folder_that_is_not_a_results_repo_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no results/ folder"):
        load_published_results(BENCHMARK, str(tmp_path))


def test_unknown_benchmark_suggests_the_right_name():
    with pytest.raises(ConfigError, match=r"Did you mean: MTEB\(Medical, v1\)"):
        load_published_results("MTEB(Medicl, v1)", str(RESULTS))


def _load_script():
    """Loaded at collection, not inside a test: a library that sets up its log handler on import
    would otherwise bind it to this test's captured stderr, closed once the test ends."""
    spec = importlib.util.spec_from_file_location("eval_mteb", REPO / "scripts" / "eval_mteb.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


SCRIPT = _load_script()


def test_script_analyze_offline(monkeypatch, capsys):
    script = SCRIPT
    monkeypatch.setattr(sys, "argv", ["eval_mteb.py", "--analyze", BENCHMARK, "--results_dir", str(RESULTS),
                                      "--model", "minilm", "--top", "1"])
    script.main()
    out = capsys.readouterr().out
    assert "base model: sentence-transformers/all-MiniLM-L6-v2" in out
    assert out.split("Recommended targets")[1].count("\n- ") == 1 and "- TRECCOVID" in out
