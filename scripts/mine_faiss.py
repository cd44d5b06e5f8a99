"""Hard-negative mining: BM25 + dense-teacher candidates, fused by reciprocal rank, positive-aware filtered.

Usage:
    python scripts/mine_faiss.py recipes/scifact-minilm-cpu.yaml --run_dir DIR  # DIR/queries.jsonl from gen_vllm.py
    python scripts/mine_faiss.py recipes/scifact-minilm-cpu-fewlabel.yaml   # generated queries + judged train pairs
    python scripts/mine_faiss.py recipes/scifact-mine-minilm-cpu.yaml       # judged pairs alone (mine.generated: false)
    python scripts/mine_faiss.py RECIPE.yaml --mine.qrels train --mine.num_negatives 8   # any key overridden
    accelerate launch --multi_gpu --num_processes 8 scripts/mine_faiss.py RECIPE.yaml   # corpus encoding sharded over processes

Reads the generation stage's `run_dir/queries.jsonl` (rows with kept=true; the source document is the
positive) and/or, with `mine.qrels`, judged pairs; mines negatives from `data.corpus`. Writes
`run_dir/train.jsonl` (training-set schema; each row's `source` names its input, which training
stages select with `sources`), `mine_summary.json` and `mine_scores.png`.
Corpus embeddings are cached (`mine.cache_dir`) and reused by any run with the same teacher and
corpus. Rerunning a killed run resumes: finished queries are kept, none is written twice.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

import numpy as np

from embed.cli import log_line, run_main
from embed.config import parse_recipe
from embed.data import load_corpus
from embed.errors import DataError
from embed.io import read_jsonl, write_json_atomic
from embed.mining.inputs import load_mining_queries, weight_rule_queries
from embed.mining.miner import (
    NegativeMiner,
    check_mine_config,
    encode_by_token_length,
    load_teacher,
    rules_from_config,
)
from embed.mining.output import ResumableOutput, batched, plot_margin_scatter, summarise
from embed.modeling.lexical import fit_lexical_channel
from embed.retrieval.bm25_index import BM25Index
from embed.retrieval.channel_weight import choose_channel_weight, lexical_scores
from embed.retrieval.dense_index import DenseIndex, num_gpus
from embed.retrieval.embedding_cache import corpus_embeddings, teacher_cache
from embed.runtime import (
    default_cache_root,
    encode_autocast,
    peak_rss_gb,
    quiet_progress_off_terminal,
)


def main():
    # ------------------------------------------------------------------ config
    cfg = parse_recipe("mine", description=__doc__)
    quiet_progress_off_terminal()
    mc, run_dir = cfg.mine, Path(cfg.run_dir)
    check_mine_config(mc)
    import torch
    from accelerate import (
        PartialState,  # after --help: importing accelerate costs a second
    )

    # cpu=True without CUDA: gloo processes under `accelerate launch --multi_gpu --num_processes N`
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    log = log_line if rank == 0 else (lambda msg: None)
    timings, started = {}, time.perf_counter()

    # ------------------------------------------------------------------ inputs
    t = time.perf_counter()
    corpus = load_corpus(cfg.data.corpus)
    skipped = Counter({f"corpus_{reason}": n for reason, n in corpus.skipped.items()})
    queries, input_files = load_mining_queries(cfg, corpus, skipped, log)
    origin = " + ".join(map(str, input_files))
    if not queries:
        raise DataError(f"{origin}: no queries to mine (skipped: {dict(skipped)})")
    texts = [corpus.doc_text(i) for i in range(len(corpus))]
    timings["load_inputs"] = time.perf_counter() - t
    log(f"inputs: {len(queries)} queries from {origin} | corpus {len(corpus)} documents | skipped {dict(skipped)}")

    # ------------------------------------------------------------------ teacher + corpus embeddings (cached, sharded)
    t = time.perf_counter()
    teacher, teacher_name = load_teacher(cfg, state.device)
    timings["load_teacher"] = time.perf_counter() - t
    t = time.perf_counter()
    autocast, precision = encode_autocast(torch.device(state.device), mc.encode_precision)
    cache = teacher_cache(teacher, teacher_name, cfg.model.dtype, corpus, texts, default_cache_root(mc.cache_dir),
                          precision=precision)
    log(f"teacher: {teacher_name} on {state.device} x {world} process(es), {precision} | cache {cache.dir}")

    def encode(texts_: list[str], kind: str):
        with autocast:
            return encode_by_token_length(teacher, texts_, kind, mc.encode_batch_size)

    corpus_emb, cache_hit = corpus_embeddings(
        cache, texts, lambda chunk: encode(chunk, "document"),
        chunk_size=mc.cache_chunk_size, rank=rank, world_size=world, barrier=state.wait_for_everyone, log=log_line)
    timings["corpus_embeddings"] = time.perf_counter() - t
    log(f"corpus embeddings: {corpus_emb.shape} fp16 ({'cache hit' if cache_hit else 'encoded'}, "
        f"{timings['corpus_embeddings']:.1f}s)")
    if rank != 0:
        return  # the other ranks only helped encode

    # ------------------------------------------------------------------ lexical channel weight (label-free)
    weight_choice = None
    if cfg.model.lexical_weight_rule == "generated":
        t = time.perf_counter()
        weight_choice = choose_weight(cfg, teacher, corpus, texts, corpus_emb, encode)
        timings["lexical_weight_rule"] = time.perf_counter() - t
        log(f"lexical channel: {weight_choice.reason} | MRR@10 by weight {weight_choice.mrr_at_10}")

    # ------------------------------------------------------------------ candidate indexes
    t = time.perf_counter()
    dense = DenseIndex(corpus_emb, mc.index, mc.index_search_params, save_dir=cache.dir) if "dense" in mc.retrievers else None
    # one BM25 index serves as a candidate source and/or as the hybrid teacher's lexical half
    bm25 = BM25Index(texts) if "bm25" in mc.retrievers or mc.teacher_bm25_weight else None
    timings["build_indexes"] = time.perf_counter() - t
    miner = NegativeMiner(corpus_emb, rules_from_config(mc), mc.depth, mc.rrf_k, cfg.seed, dense=dense,
                          bm25=bm25 if "bm25" in mc.retrievers else None, text_of=lambda row: texts[row],
                          lexical=bm25 if mc.teacher_bm25_weight else None, teacher_bm25_weight=mc.teacher_bm25_weight,
                          teacher_candidates=mc.teacher_candidates)

    # ------------------------------------------------------------------ mining (resumable, batch by batch)
    settings = {k: v for k, v in dataclasses.asdict(mc).items() if k not in ("batch_size", "encode_batch_size", "cache_dir", "cache_chunk_size")}
    inputs = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in input_files]
    output = ResumableOutput(run_dir, {"mine": settings, "seed": cfg.seed, "embeddings": cache.key,
                                       "input": inputs[0] if len(inputs) == 1 else inputs}, log)
    todo = [q for q in queries if q.query_id not in output.done]
    if len(todo) < len(queries):
        log(f"resuming: {len(queries) - len(todo)} of {len(queries)} queries already mined")
    t = time.perf_counter()
    encode_queries, mined_now = 0.0, 0
    for batch in batched(todo, mc.batch_size):
        tq = time.perf_counter()
        query_emb = encode([q.text for q in batch], "query")
        encode_queries += time.perf_counter() - tq
        output.write(miner.mine(batch, query_emb), corpus)
        mined_now += len(batch)
        log(f"mined {len(queries) - len(todo) + mined_now}/{len(queries)} queries "
            f"({mined_now / (time.perf_counter() - t):.1f} q/s)")
    timings["mine"] = time.perf_counter() - t
    timings.update({"encode_queries": encode_queries, **{k: v for k, v in miner.seconds.items()}})

    # ------------------------------------------------------------------ outputs
    stats = output.finalise([q.query_id for q in queries])
    summary = summarise(output.final, stats, mc.num_negatives, skipped)
    timings["total"] = time.perf_counter() - started
    summary.update({
        "input": origin, "corpus": cfg.data.corpus, "corpus_documents": len(corpus), "teacher": teacher_name,
        "teacher_bm25_weight": mc.teacher_bm25_weight, "teacher_candidates": mc.teacher_candidates,
        "rules": dataclasses.asdict(rules_from_config(mc)), "retrievers": mc.retrievers, "depth": mc.depth,
        "index": mc.index, "faiss_gpus": num_gpus(), "resumed_queries": len(queries) - len(todo),
        "embedding_cache": {"dir": str(cache.dir), "hit": cache_hit},
        "timings_s": {k: round(v, 3) for k, v in timings.items()}, "peak_rss_gb": peak_rss_gb(),
    })
    if weight_choice is not None:
        summary["lexical_channel"] = {**dataclasses.asdict(weight_choice), "scheme": cfg.model.lexical_scheme,
                                      "dim": cfg.model.lexical_dim, "max_length": cfg.model.lexical_max_length,
                                      "rule": "embed.retrieval.channel_weight (generated queries)"}
    write_json_atomic(run_dir / "mine_summary.json", summary)
    teacher_label = teacher_name + (f" + BM25 x {mc.teacher_bm25_weight}" if mc.teacher_bm25_weight else "")
    plot_margin_scatter(run_dir / "mine_scores.png", (row for _, row in read_jsonl(output.final)), rules_from_config(mc),
                        f"{teacher_label}: relative margin {'off' if mc.relative_margin is None else mc.relative_margin}, "
                f"absolute margin {'off' if mc.absolute_margin is None else mc.absolute_margin}")
    output.cleanup()
    log(f"wrote {output.final}: {summary['queries_mined']} queries, {summary['negatives_per_query_mean']} negatives "
        f"per query, {summary['queries_short_of_negatives']} short | drops {summary['drops_per_rule']} | "
        f"{timings['total']:.1f}s, peak RSS {summary['peak_rss_gb']} GB")


def choose_weight(cfg, model, corpus, texts, corpus_emb, encode):
    """The lexical channel's weight for this domain from its generated queries (the model is the
    recipe's own: mine.teacher is '' under this rule)."""
    queries, rows = weight_rule_queries(Path(cfg.run_dir) / "queries.jsonl", corpus)
    if not queries:
        raise DataError(f"{Path(cfg.run_dir) / 'queries.jsonl'}: no generated queries to choose the lexical weight on "
                        "(model.lexical_weight_rule: generated)")
    channel = fit_lexical_channel(model, texts, cfg.model.lexical_dim, weight=0.5, seed=cfg.seed,
                                  scheme=cfg.model.lexical_scheme, max_length=cfg.model.lexical_max_length)
    dense = encode(queries, "query").astype(np.float32) @ np.asarray(corpus_emb, dtype=np.float32).T  # [Q, N]
    return choose_channel_weight(dense, lexical_scores(model, channel, queries, texts), np.asarray(rows))


if __name__ == "__main__":
    run_main(main)
