"""MTEB evaluation: the trained model against its baselines, table and charts, model card, leaderboard files.

Usage:
    # a trained run: run_dir/model against the base model as published on every data.eval target
    python scripts/eval_mteb.py recipes/scifact-minilm-cpu.yaml [--run_dir DIR] [--key value ...]
    # one model alone (an alias, a folder or a hub id); a recipe, if given, supplies its settings
    python scripts/eval_mteb.py [RECIPE.yaml] --model minilm --data ../shared/data/scifact --run_dir runs/eval-minilm
    # which tasks of a benchmark have the most headroom over the base model (offline: --results_dir)
    python scripts/eval_mteb.py --analyze "MTEB(Medical, v1)" --results_dir RESULTS_REPO_CLONE [--model minilm]
    # also upload run_dir/model with its model card (needs HF_TOKEN in the environment)
    python scripts/eval_mteb.py RECIPE.yaml --push_to_hub user/my-domain-model

`--model M` and `--data D` (repeatable) are short for `--model.name_or_path M` and `--data.eval [D, ...]`;
every recipe key can be given too, e.g. `--model.matryoshka_dims "[16, 32]"`.

Columns (embed/evaluation/comparison.py): `base` = the base model with its own saved settings;
`trained` = run_dir/model; with a lexical channel also `trained_dense` (its dense half),
`untrained_hybrid` (base + the same channel, no training) and `sparse` (the lexical half exported
as a SparseEncoder, run_dir/model/sparse: IDF over data.corpus, untrained). Scores come from mteb's own evaluator
(a local task for BEIR folders), so they are the leaderboard's numbers. Outputs:
  run_dir/eval/results/<model>/<revision>/<task>.json  mteb's results layout; revision = fingerprint of
      the model's settings and outputs, so a rerun reuses finished results and a trained model never
      reads its base model's cache
  run_dir/eval/results.md, scores.png, per_query.png   table (with published figures), chart with the
      delta, each judged query's nDCG@10 change base -> trained (local BEIR folders)
  run_dir/eval/predictions/<model>/<revision>/         mteb's rankings behind the per-query scores
  run_dir/eval_summary.json                            ndcg_at_10 per dataset for each column, all metrics
  run_dir/model/README.md                              model card with mteb metadata (trained runs)
  run_dir/eval/submission/results/...                  official-task results, ready for a pull request
                                                       to embeddings-benchmark/results
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from embed.cli import run_main
from embed.config import build_config, format_help, save_config
from embed.errors import ConfigError
from embed.evaluation.comparison import (
    plan_one_model,
    plan_trained_run,
    run_comparison,
    summary,
    table_rows,
)
from embed.evaluation.domain_analysis import analyze_benchmark
from embed.evaluation.leaderboard import (
    bar_chart,
    model_card,
    per_query_chart,
    prepare_submission,
    push_to_hub,
    results_table,
)
from embed.evaluation.mteb_eval import (
    PUBLISHED_NAMES,
    default_model_name,
    is_local_task,
    resolve_eval_tasks,
    task_label,
    task_splits,
)
from embed.io import write_json_atomic, write_text_atomic
from embed.modeling.model import package_modules, saved_lexical_channel
from embed.modeling.sparse_export import DENSE_DIR, has_dense_half
from embed.recipe import Recipe
from embed.runtime import peak_rss_gb, quiet_progress_off_terminal


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Recipe]:
    """This script's own flags, then the recipe and its `--key value` overrides (one pass each)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", help="evaluate this model alone (alias, folder or hub id)")
    parser.add_argument("--data", action="append", help="BEIR folder or MTEB task/benchmark (repeatable)")
    parser.add_argument("--analyze", metavar="BENCHMARK", help="rank the benchmark's tasks by headroom")
    parser.add_argument("--results_dir", help="--analyze offline: a folder in mteb's results-repo layout")
    parser.add_argument("--small_params", type=float, default=1e9,
                        help="--analyze: 'small' = at most this many parameters")
    parser.add_argument("--top", type=int, default=3, help="--analyze: number of recommended targets")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="upload run_dir/model and its card (needs HF_TOKEN)")
    flags, rest = parser.parse_known_args(argv)
    if flags.model and not flags.analyze:
        rest += ["--model.name_or_path", flags.model]
    if flags.data:
        rest += ["--data.eval", json.dumps(flags.data)]
    cfg = build_config(Recipe, rest)
    cfg.validate()
    return flags, cfg


def main():
    # ------------------------------------------------------------------ command line
    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(format_help(Recipe, "eval_mteb.py", "evaluation stage"))
        return
    flags, cfg = parse_args(argv)
    quiet_progress_off_terminal()
    if flags.analyze:  # published results only: no model is loaded
        base = flags.model or cfg.eval.base_model or cfg.model.name_or_path
        print(analyze_benchmark(flags.analyze, flags.results_dir, PUBLISHED_NAMES.get(base, base),
                                flags.small_params, flags.top))
        return
    one_model = flags.model is not None
    run_dir = Path(cfg.run_dir)
    eval_dir, model_dir = run_dir / "eval", run_dir / "model"
    token = os.environ.get("HF_TOKEN")
    if flags.push_to_hub and (one_model or not token):
        raise ConfigError("--push_to_hub uploads a trained run: it needs a recipe (no --model) and a token in "
                          "the HF_TOKEN environment variable")
    if not cfg.data.eval:
        raise ConfigError("key 'data.eval' is empty: name BEIR folders or MTEB tasks to evaluate on (--data)")
    if not one_model and not model_dir.is_dir():
        raise ConfigError(f"{model_dir} not found: train first (scripts/train.py), or evaluate one model "
                          "with --model/--data")

    # ------------------------------------------------------------------ data (all targets before any model)
    tasks = resolve_eval_tasks(cfg.data.eval, cfg.data.eval_split)
    labels = [task_label(t) for t in tasks]
    splits = {label: task_splits(t) for label, t in zip(labels, tasks)}
    print(f"eval targets: {', '.join(labels)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "eval_config.yaml")

    # ------------------------------------------------------------------ the systems compared
    trained_name = cfg.eval.model_name or flags.push_to_hub or default_model_name(str(model_dir))
    networks, names = plan_one_model(cfg) if one_model else plan_trained_run(cfg, model_dir, trained_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"columns: {', '.join(names)}; device: {device}; results cache: {eval_dir / 'results'}")

    # ------------------------------------------------------------------ evaluate: each network loaded and run once
    result = run_comparison(networks, names, tasks, eval_dir=eval_dir, batch_size=cfg.eval.batch_size,
                            device=device)

    # ------------------------------------------------------------------ table, charts, summary
    scores, row_splits = table_rows(result, splits)
    table = results_table(scores, result.names, row_splits)
    write_text_atomic(eval_dir / "results.md", table)
    bar_chart(scores, result.names, eval_dir / "scores.png")
    if per_query_chart(result.per_query, eval_dir / "per_query.png"):
        print(f"per-query nDCG@10 change base -> trained: {eval_dir / 'per_query.png'}")
    write_json_atomic(run_dir / "eval_summary.json", summary(result, labels, splits, peak_rss_gb()))
    print("\n" + table)

    # ------------------------------------------------------------------ leaderboard: card, results PR folder, upload
    if one_model:
        return
    trained = result.identities["trained"]
    channel = saved_lexical_channel(model_dir) if has_dense_half(model_dir) else None
    card = model_card(trained["name"], result.names["base"], result.metrics["trained"], tasks, table,
                      load_path=flags.push_to_hub or str(model_dir), settings=result.settings["trained"],
                      package_modules=package_modules(model_dir),
                      lexical=channel,
                      dense_package_modules=package_modules(model_dir / DENSE_DIR))
    write_text_atomic(model_dir / "README.md", card)
    official = {t.metadata.name for t in tasks if not is_local_task(t)}
    copied = prepare_submission(eval_dir, trained["name"], trained["revision"], eval_dir / "submission", official)
    if copied:
        print(f"results-repo PR ready: copy {eval_dir / 'submission' / 'results'}/* into a clone of "
              "embeddings-benchmark/results (folder results/) and open a pull request")
    else:
        print("no results-repo submission: only MTEB tasks go to the leaderboard (local BEIR folders do not)")
    if flags.push_to_hub:
        print(f"uploaded: {push_to_hub(model_dir, flags.push_to_hub, token)}")


if __name__ == "__main__":
    run_main(main)
