"""MTEB evaluation: base vs trained model, comparison table and chart, domain-gap analysis, leaderboard files.

Usage:
    # a trained run: run_dir/model and its base model on every data.eval target
    python scripts/eval_mteb.py recipes/scifact-supervised-cpu.yaml [--run_dir DIR] [--key value ...]
    # one model, no recipe (an alias, a folder or a hub id; a BEIR folder or an MTEB task/benchmark name)
    python scripts/eval_mteb.py --model minilm --data ../shared/data/scifact --run_dir runs/eval-minilm
    # which tasks of a benchmark have the most headroom over the base model (offline: --results_dir)
    python scripts/eval_mteb.py --analyze "MTEB(Medical, v1)" --results_dir RESULTS_REPO_CLONE [--model minilm]
    # also upload run_dir/model with its model card (needs HF_TOKEN in the environment)
    python scripts/eval_mteb.py RECIPE.yaml --push_to_hub user/my-domain-model

Scores come from mteb's own evaluator (a local task for BEIR folders), so they are the
leaderboard's numbers. Outputs:
  run_dir/eval/results/<model>/<revision>/<task>.json  mteb's results layout; revision = fingerprint of
      the model's settings and outputs, so a rerun reuses finished results and a trained model never
      reads its base model's cache
  run_dir/eval/results.md, run_dir/eval/scores.png     comparison table (with published figures), chart
  run_dir/eval_summary.json (copy in run_dir/eval/)    ndcg_at_10 per dataset for each model, all metrics
  run_dir/model/README.md                              model card with mteb metadata (trained runs)
  run_dir/eval/submission/results/...                  official-task results, ready for a pull request
                                                       to embeddings-benchmark/results
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from embed.cli import run_main
from embed.config import ConfigError, build_config, parse_overrides, parse_recipe
from embed.data import write_json_atomic
from embed.hardware import peak_rss_gb
from embed.domain_analysis import format_report, headroom_by_task, load_published_results, tasks_without_results
from embed.evaluation import (PUBLISHED_NAMES, default_model_name, embedding_dim, evaluate_model, is_local_task,
                              model_fingerprint, resolve_eval_tasks, task_label, task_splits)
from embed.leaderboard import bar_chart, model_card, prepare_submission, push_to_hub, results_table
from embed.model import LEXICAL_CHANNEL_ST, EmbeddingModel, load_from_config, package_modules
from embed.recipe import Recipe


def parse_script_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Flags of this script that are not recipe keys; everything else goes to the recipe parser."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", help="model to evaluate without a recipe (alias, folder or hub id)")
    parser.add_argument("--data", action="append", help="BEIR folder or MTEB task/benchmark (repeatable)")
    parser.add_argument("--analyze", metavar="BENCHMARK", help="rank the benchmark's tasks by headroom")
    parser.add_argument("--results_dir", help="--analyze offline: a folder in mteb's results-repo layout")
    parser.add_argument("--small_params", type=float, default=1e9,
                        help="--analyze: 'small' = at most this many parameters")
    parser.add_argument("--top", type=int, default=3, help="--analyze: number of recommended targets")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="upload run_dir/model and its card (needs HF_TOKEN)")
    flags, rest = parser.parse_known_args(argv)
    return flags, rest


def analyze(flags, rest: list[str]) -> None:
    base = flags.model or "minilm"
    if parse_overrides(Recipe, rest)[0] is not None:  # a recipe: compare against its base model
        cfg = build_config(Recipe, rest)
        base = cfg.eval.base_model or cfg.model.name_or_path
    base_name = PUBLISHED_NAMES.get(base, base)
    benchmark, results = load_published_results(flags.analyze, flags.results_dir)
    rows = headroom_by_task(benchmark, results, base_name, flags.small_params)
    print(format_report(benchmark.name, rows, tasks_without_results(benchmark, rows), base_name,
                        flags.small_params, flags.top))


def main():
    # ------------------------------------------------------------------ command line
    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        parse_recipe("eval", ["--help"])
    flags, rest = parse_script_flags(argv)
    if flags.analyze:
        return analyze(flags, rest)
    with_recipe = parse_overrides(Recipe, rest)[0] is not None
    if with_recipe and (flags.model or flags.data):
        raise ConfigError("--model/--data are for runs without a recipe; with a recipe use "
                          "--model.name_or_path / --data.eval")
    if not with_recipe:
        if not (flags.model and flags.data):
            raise ConfigError("give a recipe, or both --model and --data (see --help)")
        rest += ["--model.name_or_path", flags.model, "--data.eval", json.dumps(flags.data)]
    token = os.environ.get("HF_TOKEN")
    if flags.push_to_hub and not (with_recipe and token):
        raise ConfigError("--push_to_hub uploads a trained run: it needs a recipe and a token in the "
                          "HF_TOKEN environment variable")
    cfg = parse_recipe("eval", rest)
    run_dir, eval_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "eval"
    if not cfg.data.eval:
        raise ConfigError("key 'data.eval' is empty: name BEIR folders or MTEB tasks to evaluate on")

    # ------------------------------------------------------------------ data (all targets before any model)
    tasks = resolve_eval_tasks(cfg.data.eval, cfg.data.eval_split)
    labels = [task_label(t) for t in tasks]
    splits = {task_label(t): task_splits(t) for t in tasks}
    print(f"eval targets: {', '.join(labels)}")

    # ------------------------------------------------------------------ models: name and how to load each
    def load_trained():
        return EmbeddingModel.from_pretrained(
            str(run_dir / "model"), attn_implementation=cfg.model.attn_implementation, dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code)

    if with_recipe:
        if not (run_dir / "model").is_dir():
            raise ConfigError(f"{run_dir / 'model'} not found: train first (scripts/train.py), or evaluate "
                              "one model with --model/--data")
        base_path = cfg.eval.base_model or cfg.model.name_or_path
        trained_name = cfg.eval.model_name or flags.push_to_hub or default_model_name(str(run_dir / "model"))
        models = {"base": (default_model_name(base_path), lambda: load_from_config(cfg.model, base_path)),
                  "trained": (trained_name, load_trained)}
        if LEXICAL_CHANNEL_ST in package_modules(run_dir / "model"):  # what the lexical channel adds: the dense half alone
            models["trained_dense"] = (f"{trained_name}-dense-half", lambda: without_lexical_channel(load_trained()))
    else:
        models = {"model": (default_model_name(cfg.model.name_or_path), lambda: load_from_config(cfg.model))}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; results cache: {eval_dir / 'results'}")

    # ------------------------------------------------------------------ evaluate, one model in memory at a time
    scores, metrics, identities, timings, matryoshka = {}, {}, {}, {}, {}
    for role, (name, load) in models.items():
        start = time.time()
        model = load().to(device)
        revision = model_fingerprint(model)
        identities[role] = {"name": name, "revision": revision, "query_prompt": model.query_prompt,
                            "document_prompt": model.document_prompt}
        print(f"[{role}] {name} (revision {revision})")
        matryoshka_dims = [] if role == "base" else cfg.model.matryoshka_dims
        full_dim = embedding_dim(model)
        if any(dim >= full_dim for dim in matryoshka_dims):
            raise ConfigError(f"key 'model.matryoshka_dims': {matryoshka_dims} must all be below the "
                              f"embedding size {full_dim}")
        metrics[role] = evaluate_model(model, tasks, name=name, revision=revision, results_dir=eval_dir,
                                       batch_size=cfg.eval.batch_size, show_progress=True)
        scores[role] = {d: m["main_score"] for d, m in metrics[role].items()}
        for dim in matryoshka_dims:
            truncated = evaluate_model(model, tasks, name=name, revision=revision, results_dir=eval_dir,
                                       batch_size=cfg.eval.batch_size, dim=dim, show_progress=True)
            matryoshka[str(dim)] = {d: {role: m["main_score"]} for d, m in truncated.items()}
        timings[role] = round(time.time() - start, 1)
        for d, m in metrics[role].items():
            print(f"[{role}] {d}: nDCG@10 = {100 * m.get('ndcg_at_10', float('nan')):.2f} "
                  f"(main score {100 * m['main_score']:.2f})")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ table, chart, summary
    roles = {role: identities[role]["name"] for role in models}
    table_scores = {role: dict(s) for role, s in scores.items()}
    for dim, by_dataset in matryoshka.items():
        for d, by_role in by_dataset.items():
            for role, value in by_role.items():
                table_scores[role][f"{d} ({dim}d)"] = value
                splits[f"{d} ({dim}d)"] = splits[d]
    table = results_table(table_scores, roles, splits)
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "results.md").write_text(table, encoding="utf-8")
    bar_chart(table_scores, roles, eval_dir / "scores.png")
    print("\n" + table)
    summary = {
        "datasets": labels, "splits": {d: splits[d] for d in labels}, "models": identities,
        "ndcg_at_10": {d: {role: metrics[role][d]["ndcg_at_10"] for role in models
                           if "ndcg_at_10" in metrics[role][d]} for d in labels},
        "main_score": {d: {role: scores[role][d] for role in models} for d in labels},
        "matryoshka_main_score": matryoshka,
        "metrics": metrics, "timings_s": timings, "peak_rss_gb": peak_rss_gb(),
        "outputs": {"results": "eval/results", "table": "eval/results.md", "chart": "eval/scores.png"},
    }
    write_json_atomic(run_dir / "eval_summary.json", summary)
    shutil.copy2(run_dir / "eval_summary.json", eval_dir / "eval_summary.json")

    # ------------------------------------------------------------------ leaderboard: card, results PR folder, upload
    if not with_recipe:
        return
    trained = identities["trained"]
    card = model_card(trained["name"], identities["base"]["name"], metrics["trained"], tasks, table,
                      trained["query_prompt"], trained["document_prompt"], package_modules(run_dir / "model"))
    (run_dir / "model" / "README.md").write_text(card, encoding="utf-8")
    official = {t.metadata.name for t in tasks if not is_local_task(t)}
    copied = prepare_submission(eval_dir, trained["name"], trained["revision"], eval_dir / "submission", official)
    if copied:
        print(f"results-repo PR ready: copy {eval_dir / 'submission' / 'results'}/* into a clone of "
              "embeddings-benchmark/results (folder results/) and open a pull request")
    else:
        print("no results-repo submission: only MTEB tasks go to the leaderboard (local BEIR folders do not)")
    if flags.push_to_hub:
        print(f"uploaded: {push_to_hub(run_dir / 'model', flags.push_to_hub, token)}")


def without_lexical_channel(model):
    model.lexical = None
    return model


if __name__ == "__main__":
    run_main(main)
