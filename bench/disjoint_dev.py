"""What training on a domain's own queries can give the dense model, on a split that shares no document.

Why: SciFact's train claims come in groups that cite the same abstracts (a claim and its negation,
several claims from one citing sentence). Split at random, 60% of one half's claims share a positive
document with the other half, and 65% of the test claims share one with the train claims: a model
trained on one side has seen the other side's answers as positives, so a random split credits a
training method with what is memorised documents. This script splits one judged split's queries into
two halves by connected groups of shared positive documents (no document is a positive on both
sides), trains the base model (all-MiniLM-L6-v2, the recipe's settings, fp32) on one half and
scores the other, so the figure says what such queries teach about documents never seen in training.

  --labels human    each training query's judged positive (an upper bound: real queries, real labels)
  --labels teacher  the hybrid teacher's choice, (1 - w) cosine + w relative BM25, as mining computes
                    it: real queries, no labels read (what perfect query generation would give)
  --mode contrastive  InfoNCE over in-batch and one mined negative each, queries and documents trained
                      (the recipes' stage); the corpus is re-encoded by the trained model to score
  --mode frozen       queries only, KL to the teacher over the corpus (train.stages.*.frozen_documents);
                      the documents keep the base model's embeddings

nDCG@10 over the scored half's judged documents, as bench/lexical_dev.py computes it. Prints one JSON object.

    python bench/disjoint_dev.py --labels human --mode contrastive
    python bench/disjoint_dev.py --labels teacher --mode frozen
    python bench/disjoint_dev.py --labels teacher --max_train_queries 160 --select easiest

--max_train_queries with --select compares which queries teach most at a generated set's size:
a seeded sample, or those the base model finds hardest or easiest (where it ranks the teacher's top
document), read without a label.

--write_split DIR writes the halves as a BEIR folder and stops, to score the whole pipeline (the
recipe's mining, schedule and evaluation, not this script's loop) on the same split:

    python bench/disjoint_dev.py --write_split /tmp/sfsplit
    bash scripts/pipeline.sh recipes/scifact-minilm-cpu.yaml --run_dir runs/split \
        --data.corpus /tmp/sfsplit --data.eval /tmp/sfsplit --data.eval_split scored_half \
        --mine.generated false --mine.unjudged_queries /tmp/sfsplit/train_half_queries.jsonl \
        --mine.teacher_bm25_weight 0.25 --model.lexical_weight_rule fixed
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from lexical_dev import ndcg_at_10  # noqa: E402

from embed.config import parse_recipe  # noqa: E402
from embed.data import load_corpus, load_qrels, load_queries  # noqa: E402
from embed.io import write_jsonl_atomic, write_text_atomic  # noqa: E402
from embed.modeling.model import load_from_config  # noqa: E402
from embed.retrieval.bm25_index import BM25Index  # noqa: E402
from embed.retrieval.embedding_cache import corpus_embeddings, teacher_cache  # noqa: E402
from embed.runtime import default_cache_root  # noqa: E402
from embed.training.frozen_corpus import FrozenCorpusDistillation  # noqa: E402
from embed.training.loss import InfoNCELoss  # noqa: E402


def document_disjoint_halves(judged: dict[str, dict[str, int]], seed: int) -> tuple[list[str], list[str]]:
    """(train, scored) query ids: queries linked by a shared positive document stay on one side."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for docs in judged.values():
        first, *rest = sorted(docs)
        for d in rest:
            parent[root(d)] = root(first)
    groups: dict[str, list[str]] = {}
    for q, docs in judged.items():
        groups.setdefault(root(min(docs)), []).append(q)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    train = [q for i, k in enumerate(keys) if i % 2 == 0 for q in groups[k]]
    scored = [q for i, k in enumerate(keys) if i % 2 == 1 for q in groups[k]]
    return train, scored


def write_split(out: Path, data: Path, queries: dict[str, str], judged: dict[str, dict[str, int]],
                train_ids: list[str], scored_ids: list[str]) -> dict:
    """A BEIR folder over the same corpus (linked, not copied) whose qrels are the two halves."""
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    link = out / "corpus.jsonl"
    if link.is_symlink():  # a folder written before, perhaps from another --data
        link.unlink()
    link.symlink_to((data / "corpus.jsonl").resolve())
    write_jsonl_atomic(out / "queries.jsonl", ({"_id": q, "text": queries[q]} for q in [*train_ids, *scored_ids]))
    write_jsonl_atomic(out / "train_half_queries.jsonl", ({"_id": q, "text": queries[q]} for q in train_ids))
    for name, ids in (("train_half", train_ids), ("scored_half", scored_ids)):
        lines = [f"{q}\t{d}\t{g}\n" for q in ids for d, g in sorted(judged[q].items())]
        write_text_atomic(out / "qrels" / f"{name}.tsv", "query-id\tcorpus-id\tscore\n" + "".join(lines))
    return {"wrote": str(out), "train_half": len(train_ids), "scored_half": len(scored_ids)}


def by_difficulty(base_rank: list[int], count: int, select: str) -> list[int]:
    """Indices of the `count` queries the base model finds hardest or easiest, in their original order.

    Difficulty is where the base model ranks the teacher's top document (1 = it agrees), so no label
    is read; ties keep the original order, so the choice is deterministic."""
    sign = -1 if select == "hardest" else 1
    order = sorted(range(len(base_rank)), key=lambda i: (sign * base_rank[i], i))
    return sorted(order[:count])


def relative_bm25(index: BM25Index, texts: list[str], n_docs: int) -> np.ndarray:
    """[Q, N] BM25 over each query's best score in the corpus (BM25Index.relative_scores, all rows)."""
    rows = list(range(n_docs))
    return np.stack([index.relative_scores(t, rows) for t in texts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "scifact"), help="BEIR folder")
    parser.add_argument("--split", default="train", help="the judged split to halve (never a test set you tune for)")
    parser.add_argument("--labels", choices=("human", "teacher"), default="human", help="training targets (see above)")
    parser.add_argument("--mode", choices=("contrastive", "frozen"), default="contrastive", help="what is trained (see above)")
    parser.add_argument("--teacher_bm25_weight", type=float, default=0.25, help="w in the teacher's (1 - w) cosine + w BM25")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training half")
    parser.add_argument("--learning_rate", type=float, default=2e-5, help="AdamW learning rate")
    parser.add_argument("--batch_size", type=int, default=32, help="queries per step")
    parser.add_argument("--score_split", default="",
                        help="train on all of --split and score this split instead of halving (an upper bound, "
                             "never a setting chosen: e.g. test with --labels teacher = real queries, no labels)")
    parser.add_argument("--max_train_queries", type=int, default=0,
                        help="train on this many of the training half (0 = all): compare at a generated set's size")
    parser.add_argument("--select", choices=("random", "hardest", "easiest"), default="random",
                        help="which --max_train_queries: a seeded sample, or those whose teacher's top document the "
                             "base model ranks lowest (hardest) or highest (easiest); no label is read")
    parser.add_argument("--seed", type=int, default=0, help="split, order and negatives")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "scifact-minilm-cpu.yaml"), help="model settings")
    parser.add_argument("--write_split", default="",
                        help="write the two halves as a BEIR folder here and stop: qrels/train_half.tsv and "
                             "qrels/scored_half.tsv, plus train_half_queries.jsonl (texts, no labels) for "
                             "mine.unjudged_queries, so the whole pipeline can be scored on the disjoint half")
    args = parser.parse_args()
    if args.write_split and args.select != "random":
        # the folder is written before any model runs, so there is no difficulty to select by yet
        parser.error("--select hardest/easiest needs the base model's ranks; --write_split writes a seeded sample only")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    cfg = parse_recipe("mine", [args.recipe, "--run_dir", "/tmp/disjoint_dev", "--data.corpus", args.data,
                                "--data.eval", json.dumps([args.data])])
    corpus = load_corpus(args.data)
    texts = [corpus.doc_text(i) for i in range(len(corpus))]
    queries = load_queries(args.data)

    def judged_split(split: str) -> dict[str, dict[str, int]]:
        qrels = load_qrels(str(Path(args.data) / "qrels" / f"{split}.tsv"))
        return {q: positive for q, docs in qrels.items() if q in queries
                and (positive := {d: g for d, g in docs.items() if g > 0})}

    judged = judged_split(args.split)
    if args.score_split:
        scored_judged = judged_split(args.score_split)
        train_ids, scored_ids = sorted(judged), sorted(scored_judged)
        judged = {**judged, **scored_judged}
    else:
        train_ids, scored_ids = document_disjoint_halves(judged, args.seed)
    if 0 < args.max_train_queries < len(train_ids) and args.select == "random":
        train_ids = sorted(random.Random(args.seed).sample(train_ids, args.max_train_queries))
    if args.write_split:
        print(json.dumps(write_split(Path(args.write_split), Path(args.data), queries, judged, train_ids, scored_ids)))
        return
    row = {d: i for i, d in enumerate(corpus.ids)}

    model = load_from_config(cfg.model)
    cache = teacher_cache(model, cfg.model.name_or_path, cfg.model.dtype, corpus, texts, default_cache_root(cfg.mine.cache_dir))
    base_docs, hit = corpus_embeddings(cache, texts, lambda chunk: model.encode(chunk, kind="document"))
    base_docs = torch.tensor(np.asarray(base_docs, dtype=np.float32))
    train_text = [queries[q] for q in train_ids]
    scored_text = [queries[q] for q in scored_ids]
    scored_qrels = [judged[q] for q in scored_ids]
    base = ndcg_at_10(model.encode(scored_text, kind="query") @ base_docs.numpy().T, scored_qrels, corpus.ids)

    w = args.teacher_bm25_weight
    cosine = torch.tensor(model.encode(train_text, kind="query")) @ base_docs.T                  # [Q, N]
    teacher = (1 - w) * cosine + w * torch.tensor(relative_bm25(BM25Index(texts), train_text, len(texts)))
    teacher_top = teacher.argmax(1).tolist()
    # how hard each query is for the base model, without a label: where it ranks the teacher's top document
    base_rank = (cosine > cosine.gather(1, torch.tensor(teacher_top)[:, None])).sum(1) + 1   # [Q]
    if 0 < args.max_train_queries < len(train_ids) and args.select != "random":
        keep = by_difficulty(base_rank.tolist(), args.max_train_queries, args.select)
        train_ids, train_text = [train_ids[i] for i in keep], [train_text[i] for i in keep]
        teacher, teacher_top, base_rank = teacher[keep], [teacher_top[i] for i in keep], base_rank[keep]
    teacher_right = float(np.mean([corpus.ids[d] in judged[q] for d, q in zip(teacher_top, train_ids)]))
    if args.labels == "human":
        rng = random.Random(args.seed)
        positives = [row[rng.choice(sorted(judged[q]))] for q in train_ids]
    else:
        positives = teacher_top
    # one mined negative: the teacher's best document below its top two that is not the positive (nor,
    # with human labels, a judged one: teacher labels read no judgement at all)
    negatives = []
    for i, q in enumerate(train_ids if args.mode == "contrastive" else []):
        known = judged[q] if args.labels == "human" else {}
        ranked = teacher[i].topk(100).indices.tolist()[2:]
        negatives.append(next(d for d in ranked if d != positives[i] and corpus.ids[d] not in known))

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    if args.mode == "frozen":
        distill = FrozenCorpusDistillation(base_docs, temperature=0.05, teacher_temperature=0.05 * (1 - w))
        top_k = teacher.topk(64, dim=1)
    else:
        info_nce = InfoNCELoss(temperature=0.05, gather_across_processes=False)
    order, steps, train_started = list(range(len(train_ids))), 0, time.perf_counter()
    rng = random.Random(args.seed)
    for _ in range(args.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), args.batch_size):
            idx = order[start:start + args.batch_size]
            q = model(model.tokenize([train_text[i] for i in idx], kind="query"))
            if args.mode == "frozen":
                loss = distill(q, top_k.indices[idx], top_k.values[idx])
            else:
                group = [d for i in idx for d in (positives[i], negatives[i])]
                docs = model(model.tokenize([texts[d] for d in group], kind="document")).view(len(idx), 2, -1)
                keys = torch.tensor(group).view(len(idx), 2)
                loss = info_nce(q, docs, keys, keys[:, :1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    train_seconds = time.perf_counter() - train_started
    scored_q = model.encode(scored_text, kind="query")
    with_base_docs = ndcg_at_10(scored_q @ base_docs.numpy().T, scored_qrels, corpus.ids)
    result = {"data": args.data, "split": args.split, "score_split": args.score_split or "the other half",
              "labels": args.labels, "mode": args.mode,
              "train_queries": len(train_ids), "select": args.select, "scored_queries": len(scored_ids),
              "base_rank_of_teacher_top": {"median": float(base_rank.float().median()),
                                           "share_first": round(float((base_rank == 1).float().mean()), 3)},
              "teacher_bm25_weight": w, "teacher_top1_is_judged": round(teacher_right, 3),
              "epochs": args.epochs, "steps": steps, "learning_rate": args.learning_rate, "precision": "fp32",
              "corpus_embeddings_cached": hit, "base": base, "trained_queries_base_documents": with_base_docs}
    if args.mode == "contrastive":
        result["trained"] = ndcg_at_10(scored_q @ model.encode(texts, kind="document").T, scored_qrels, corpus.ids)
    result.update({"train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - started, 1),
                   "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
