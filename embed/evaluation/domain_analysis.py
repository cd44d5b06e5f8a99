"""Which tasks of a benchmark have the most room for a domain-adapted small model?

For each task of an MTEB benchmark, from published results (mteb's results repository, or a
clone of it / any folder in its layout given offline):
- headroom: the best published score minus the base model's score (what adaptation could win);
- small gap: how far the best small model (<= `small_params` parameters) trails the best overall
  (whether that win has been shown reachable at small size).
Tasks are ranked by headroom; the top ones are the recommended targets for data generation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mteb

from embed.errors import ConfigError, DataError


@dataclass
class TaskHeadroom:
    task: str
    task_type: str
    n_models: int
    base: Optional[float]                 # all scores: main score, 0-1
    best: Optional[float]
    best_model: Optional[str]
    best_small: Optional[float]
    best_small_model: Optional[str]

    @property
    def headroom(self) -> Optional[float]:
        return None if self.base is None or self.best is None else self.best - self.base

    @property
    def small_gap(self) -> Optional[float]:
        return None if self.best_small is None or self.best is None else self.best - self.best_small


def load_published_results(benchmark_name: str, results_dir: Optional[str] = None):
    """(benchmark, mteb BenchmarkResults) from `results_dir` (results-repo layout) or mteb's remote."""
    try:
        benchmark = mteb.get_benchmark(benchmark_name)
    except KeyError as e:
        raise ConfigError(f"--analyze: {e.args[0]}") from None
    if results_dir is not None:
        root = Path(results_dir)
        if not (root / "results").is_dir():
            raise DataError(f"{root}: no results/ folder (expected a clone of embeddings-benchmark/results "
                            "or a folder in its layout: results/<model>/<revision>/<task>.json)")
        cache, include_remote = mteb.ResultCache(cache_path=root), False
    else:
        cache, include_remote = mteb.ResultCache(), True
        try:
            cache.download_from_remote()
        except Exception as e:  # git or the network failing is an environment problem, not a bug
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"mteb's published results are unreachable ({first}); pass --results_dir "
                            "with a clone of https://github.com/embeddings-benchmark/results") from None
    results = cache.load_results(tasks=benchmark, include_remote=include_remote, require_model_meta=False,
                                 validate_and_filter=True, only_main_score=True)
    return benchmark, results


def headroom_by_task(benchmark, results, base_model: str, small_params: float) -> list[TaskHeadroom]:
    """One row per benchmark task with results, ranked by headroom (tasks the base lacks go last).

    A model's score on a task is its main score averaged over the task's evaluation splits and
    subsets; incomplete results (a subset missing) do not count, as on the leaderboard. With
    several revisions of one model, its best revision counts.
    """
    per_task: dict[str, dict[str, float]] = {}
    params: dict[str, Optional[int]] = {}
    for model_result in results.model_results:
        meta = model_result.model_meta
        params[model_result.model_name] = getattr(meta, "n_parameters", None) if meta else None
        for task_result in model_result.task_results:
            score = float(task_result.get_score())
            if math.isnan(score):
                continue
            scores = per_task.setdefault(task_result.task_name, {})
            scores[model_result.model_name] = max(score, scores.get(model_result.model_name, -math.inf))
    rows = []
    for task in benchmark.tasks:
        scores = per_task.get(task.metadata.name)
        if not scores:
            continue
        best_model = max(scores, key=scores.get)
        small = {m: s for m, s in scores.items() if params.get(m) is not None and params[m] <= small_params}
        best_small_model = max(small, key=small.get) if small else None
        rows.append(TaskHeadroom(
            task=task.metadata.name, task_type=task.metadata.type, n_models=len(scores),
            base=scores.get(base_model), best=scores[best_model], best_model=best_model,
            best_small=small.get(best_small_model), best_small_model=best_small_model))
    rows.sort(key=lambda r: (r.headroom is None, -(r.headroom or 0.0), r.task))
    return rows


def tasks_without_results(benchmark, rows: list[TaskHeadroom]) -> list[str]:
    have = {r.task for r in rows}
    return [t.metadata.name for t in benchmark.tasks if t.metadata.name not in have]


def recommend_targets(rows: list[TaskHeadroom], top: int = 3) -> list[TaskHeadroom]:
    """The `top` tasks with the largest positive headroom over the base model."""
    return [r for r in rows if r.headroom is not None and r.headroom > 0][:top]


def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def format_report(benchmark_name: str, rows: list[TaskHeadroom], missing: list[str], base_model: str,
                  small_params: float, top: int = 3) -> str:
    """Markdown table of the ranking plus the recommended targets, as printed by --analyze."""
    small = f"<= {small_params / 1e6:g}M params"
    lines = [f"## Headroom on {benchmark_name} (base model: {base_model})", "",
             f"| rank | task | type | models | base | best | best model | headroom | best {small} | "
             "small trails best by |",
             "|---:|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for i, r in enumerate(rows, start=1):
        lines.append(f"| {i} | {r.task} | {r.task_type} | {r.n_models} | {_fmt(r.base)} | {_fmt(r.best)} | "
                     f"{r.best_model} | {_fmt(r.headroom, True)} | {_fmt(r.best_small)} "
                     f"({r.best_small_model or 'none'}) | {_fmt(r.small_gap)} |")
    lines += ["", "Scores: main score x 100 (nDCG@10 for retrieval), averaged over the task's splits and subsets."]
    if missing:
        lines.append(f"No published results for: {', '.join(missing)}.")
    targets = recommend_targets(rows, top)
    lines += ["", "Recommended targets (largest headroom over the base model):"]
    if not targets:
        lines.append("- none: the base model has no results on these tasks, or already leads them")
    for r in targets:
        reach = (f"; the best small model ({r.best_small_model}) already reaches {_fmt(r.best_small - r.base, True)}"
                 if r.best_small is not None and r.base is not None else "")
        lines.append(f"- {r.task} ({r.task_type}): {_fmt(r.headroom, True)} points to the best "
                     f"({r.best_model}){reach}")
    return "\n".join(lines) + "\n"


def analyze_benchmark(benchmark_name: str, results_dir: Optional[str], base_model: str, small_params: float,
                      top: int) -> str:
    """The report of `eval_mteb.py --analyze`: the benchmark's tasks ranked by headroom over `base_model`
    (its published name), with the recommended targets."""
    benchmark, results = load_published_results(benchmark_name, results_dir)
    rows = headroom_by_task(benchmark, results, base_model, small_params)
    return format_report(benchmark.name, rows, tasks_without_results(benchmark, rows), base_model,
                         small_params, top)
