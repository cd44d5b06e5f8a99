"""Dev-set nDCG@10 of the untrained hybrid: the base model plus each lexical channel scheme, by weight.

Measures, on judged queries no recipe trains on, what `model.lexical_scheme` and the channel's weight
do before any training: SciFact's train pairs (`--split train`) and CACM (the second dev domain,
`--split test`). The base model's corpus embeddings come from (or go to) the cache generation and
mining share; each scheme is fitted on the folder's corpus as training fits it (same buckets and
seed as the recipe), reading each text's first `--lexical_max_length` tokens (0: the dense half's cut). nDCG@10 over the judged documents (graded gain, log2 discount), as MTEB's
evaluator computes it. Prints one JSON object.

    python bench/lexical_dev.py --data ../shared/data/scifact --split train
    python bench/lexical_dev.py --data ../shared/data/cacm --split test
    python bench/lexical_dev.py --data ../shared/data/scifact --split train --lexical_max_length 0
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embed.config import parse_recipe  # noqa: E402
from embed.data import load_corpus, load_qrels, load_queries  # noqa: E402
from embed.modeling.lexical import fit_lexical_channel  # noqa: E402
from embed.modeling.model import load_from_config  # noqa: E402
from embed.retrieval.channel_weight import DEFAULT_GRID, lexical_scores  # noqa: E402
from embed.retrieval.embedding_cache import corpus_embeddings, teacher_cache  # noqa: E402
from embed.runtime import default_cache_root  # noqa: E402


def ndcg_at_10(scores: np.ndarray, qrels: list[dict[str, int]], doc_ids: list[str]) -> float:
    total = 0.0
    for row, judged in zip(scores, qrels):
        top = np.argsort(-row, kind="stable")[:10]
        dcg = sum(judged.get(doc_ids[j], 0) / np.log2(rank + 2) for rank, j in enumerate(top))
        ideal = sorted(judged.values(), reverse=True)[:10]
        total += dcg / sum(g / np.log2(rank + 2) for rank, g in enumerate(ideal))
    return round(100 * total / len(qrels), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="BEIR folder: its corpus, queries and qrels/<split>.tsv")
    parser.add_argument("--split", default="train", help="the judged split to score (never a test set you tune for)")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "scifact-minilm-cpu.yaml"),
                        help="model settings, buckets and seed from this recipe")
    parser.add_argument("--lexical_max_length", type=int, default=None,
                        help="tokens of each text the channel reads (default: the recipe's; 0 = the dense half's cut)")
    args = parser.parse_args()
    overrides = [] if args.lexical_max_length is None else ["--model.lexical_max_length", str(args.lexical_max_length)]
    cfg = parse_recipe("mine", [args.recipe, "--run_dir", "/tmp/lexical_dev", "--data.corpus", args.data,
                                "--data.eval", json.dumps([args.data]), *overrides])
    started = time.perf_counter()
    corpus = load_corpus(args.data)
    texts = [corpus.doc_text(i) for i in range(len(corpus))]
    queries = load_queries(args.data)
    judged = {q: {d: g for d, g in docs.items() if g > 0}
              for q, docs in load_qrels(str(Path(args.data) / "qrels" / f"{args.split}.tsv")).items() if q in queries}
    qids = [q for q, docs in judged.items() if docs]
    model = load_from_config(cfg.model)
    cache = teacher_cache(model, cfg.model.name_or_path, cfg.model.dtype, corpus, texts, default_cache_root(cfg.mine.cache_dir))
    documents, hit = corpus_embeddings(cache, texts, lambda chunk: model.encode(chunk, kind="document"))
    query_texts = [queries[q] for q in qids]
    dense = model.encode(query_texts, kind="query") @ np.asarray(documents, dtype=np.float32).T
    qrels = [judged[q] for q in qids]
    result = {"data": args.data, "split": args.split, "queries": len(qids), "documents": len(corpus),
              "model": cfg.model.name_or_path, "precision": "fp32", "lexical_dim": cfg.model.lexical_dim,
              "lexical_max_length": cfg.model.lexical_max_length,
              "corpus_embeddings_cached": hit, "dense": ndcg_at_10(dense, qrels, corpus.ids), "schemes": {}}
    for scheme in ("tfidf", "bm25"):
        channel = fit_lexical_channel(model, texts, cfg.model.lexical_dim, 0.5, seed=cfg.seed, scheme=scheme,
                                      max_length=cfg.model.lexical_max_length)
        lexical = lexical_scores(model, channel, query_texts, texts)
        by_weight = {str(w): ndcg_at_10((1 - w) * dense + w * lexical, qrels, corpus.ids) for w in DEFAULT_GRID if w}
        best = max(by_weight, key=lambda w: (by_weight[w], -float(w)))
        result["schemes"][scheme] = {"lexical_alone": ndcg_at_10(lexical, qrels, corpus.ids), "by_weight": by_weight,
                                     "best_weight": float(best), "best": by_weight[best]}
    result.update({"seconds": round(time.perf_counter() - started, 1), "machine": platform.machine(),
                   "date": time.strftime("%Y-%m-%d")})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
