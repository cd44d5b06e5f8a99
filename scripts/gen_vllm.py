r"""Synthetic queries for a domain corpus: an LLM writes them, filters keep the good ones.

Usage:
    python scripts/gen_vllm.py recipes/scifact-minilm-cpu.yaml [--gen.max_docs 64] [--run_dir DIR]
    python scripts/gen_vllm.py RECIPE.yaml --gen.backend vllm --gen.model Qwen/Qwen2.5-7B-Instruct \
        --gen.vllm.tensor_parallel_size 2 --gen.vllm.data_parallel_size 4          # 8 GPUs
    OPENAI_API_KEY=... python scripts/gen_vllm.py RECIPE.yaml --gen.backend openai \
        --gen.openai.api_base https://openrouter.ai/api/v1 --gen.model meta-llama/llama-3.1-8b-instruct

Writes `run_dir/queries.jsonl`: one row per (doc_id, sample) with `query`, `query_type`, `kept`
and `reject_reason` (null when kept), plus the source document's round-trip rank(s). The mining
stage reads the rows with `kept: true`. Also `run_dir/gen_summary.json` (counts per filter,
throughput, samples, peak memory) and, with `--gen.task auto`, `run_dir/gen_task.json`.
Rerunning a killed run resumes where it stopped, without duplicates or gaps.
"""
from __future__ import annotations

import os

# Sleeping, not spinning, OpenMP threads: on a CPU shared with other jobs, spinning threads made
# every decode step ~10x slower here (2 cores, load ~6). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import time
from pathlib import Path

from tqdm.auto import tqdm

from embed.cli import run_main
from embed.config import parse_recipe
from embed.data import load_corpus
from embed.errors import ConfigError
from embed.generation.cloze import cloze_pairs
from embed.generation.filters import (
    RANK_DEPTH,
    BM25RoundTrip,
    DenseRoundTrip,
    ExampleProximity,
    FilterSettings,
    QueryFilter,
    SharedQueryEncoder,
)
from embed.generation.generator import (
    QueryGenerator,
    check_resume,
    log_samples,
    plan_units,
    resolve_task,
    row_key,
    summarise,
)
from embed.generation.prompts import QUERY_TYPES, PromptBuilder, example_texts
from embed.io import JsonlAppender, read_jsonl, write_json_atomic, write_jsonl_atomic
from embed.retrieval.embedding_cache import corpus_fingerprint
from embed.runtime import (
    cache_dir,
    peak_rss_gb,
    progress_bar,
    quiet_progress_off_terminal,
)


def log(msg: str) -> None:
    tqdm.write(f"[gen] {msg}")


def check_gen_config(gen) -> None:
    unknown = [t for t in gen.query_types if t not in QUERY_TYPES]
    if not gen.query_types or unknown:
        raise ConfigError(f"key 'gen.query_types': unknown type '{unknown[0] if unknown else ''}' "
                          f"(known: {', '.join(QUERY_TYPES)})")
    for key in ("queries_per_doc", "batch_size", "max_new_tokens", "min_words", "copy_ngram", "round_trip_k"):
        if getattr(gen, key) < 1:
            raise ConfigError(f"key 'gen.{key}' must be >= 1")
    if not gen.query_lengths or not gen.min_words <= min(gen.query_lengths) <= max(gen.query_lengths) <= gen.max_words:
        raise ConfigError("key 'gen.query_lengths' must list word limits between gen.min_words and gen.max_words")
    if gen.round_trip_k > RANK_DEPTH:
        raise ConfigError(f"key 'gen.round_trip_k' must be <= {RANK_DEPTH}")
    if min(gen.max_docs, gen.max_retries, gen.temperature, gen.retry_temperature) < 0 or not 0 < gen.top_p <= 1:
        raise ConfigError("keys 'gen.max_docs', 'gen.max_retries', 'gen.temperature', 'gen.retry_temperature' "
                          "must be >= 0 and 'gen.top_p' in (0, 1]")


def filter_settings(gen) -> FilterSettings:
    return FilterSettings(gen.min_words, gen.max_words, gen.max_copy_overlap, gen.copy_ngram,
                          gen.round_trip, gen.round_trip_k)


def query_filter(cfg, corpus, texts, log) -> QueryFilter:
    """The filters of `gen`: text checks, the worked example's echoes, and the round trip (BM25 and/or
    the base embedding model over the whole corpus, as `gen.round_trip` asks).

    The base model also checks queries against the worked example (`ExampleProximity`) whenever the
    prompt shows one, so it is loaded even for a BM25-only round trip. Its corpus embeddings go to
    the same cache the mining stage uses (same model and settings), so they are encoded once per
    pipeline.
    """
    gen = cfg.gen
    prompt_texts = example_texts() if gen.few_shot else []
    retrievers, proximity = [], None
    if gen.round_trip in ("bm25", "both", "either"):
        retrievers.append(BM25RoundTrip(texts))
    if gen.round_trip in ("model", "both", "either") or prompt_texts:
        from embed.modeling.model import load_from_config
        from embed.retrieval.embedding_cache import corpus_embeddings, teacher_cache
        from embed.runtime import default_cache_root

        model = load_from_config(cfg.model)
        cache = teacher_cache(model, cfg.model.name_or_path, cfg.model.dtype, corpus, texts,
                              default_cache_root(cfg.mine.cache_dir))
        emb, hit = corpus_embeddings(cache, texts, lambda chunk: model.encode(chunk, kind="document"), log=log)
        log(f"filters: base model {cfg.model.name_or_path}, corpus embeddings {emb.shape} "
            f"({'cache hit' if hit else 'encoded'}: {cache.dir})")
        encode_queries = SharedQueryEncoder(lambda qs: model.encode(qs, kind="query"))
        if gen.round_trip in ("model", "both", "either"):
            retrievers.append(DenseRoundTrip(encode_queries, emb))
        if prompt_texts:
            proximity = ExampleProximity(encode_queries, emb, model.encode(prompt_texts, kind="document"))
    return QueryFilter(filter_settings(gen), retrievers, prompt_texts=prompt_texts, example_proximity=proximity)


def write_cloze_queries(path: Path, corpus, gen, seed: int) -> int:
    """Made whole in seconds, deterministic in the seed, so no resume is needed; an unchanged file is
    left untouched, so that the mining stage's resume (keyed on its inputs' size and mtime) holds.
    Cloze sentences run longer than typed queries, hence the longer limit."""
    pairs = cloze_pairs(corpus, seed=seed, min_words=max(gen.min_words, 6), max_words=gen.max_words + 8,
                        keep_probability=gen.cloze_keep_sentence)
    rows = [{"doc_id": p.doc_id, "query_id": f"cloze:{p.doc_id}", "query": p.query, "query_type": "cloze",
             "kept": True, "positive_text": p.positive, "kept_sentence": p.kept_sentence} for p in pairs]
    if path.is_file() and [row for _, row in read_jsonl(path)] == rows:
        return len(rows)
    return write_jsonl_atomic(path, rows)


def main():
    # ------------------------------------------------------------------ config
    quiet_progress_off_terminal()
    cfg = parse_recipe("gen", description=__doc__)
    gen, run_dir = cfg.gen, Path(cfg.run_dir)
    check_gen_config(gen)
    builder = PromptBuilder(template=gen.prompt_template, few_shot=gen.few_shot, max_words=max(gen.query_lengths),
                            max_doc_words=gen.max_doc_words)  # checks the template before anything loads
    started, timings = time.perf_counter(), {}

    # ------------------------------------------------------------------ inputs and plan
    corpus = load_corpus(cfg.data.corpus)
    texts = [corpus.doc_text(i) for i in range(len(corpus))]
    check_resume(run_dir, gen, cfg.seed, corpus_fingerprint(corpus.ids, texts))
    units = plan_units(corpus, gen.max_docs, gen.queries_per_doc, gen.query_types, gen.query_lengths, cfg.seed)
    out = JsonlAppender(run_dir / "queries.jsonl", row_key)
    todo = [u for u in units if u.key not in out.done]
    log(f"corpus {corpus.source}: {len(corpus)} documents (skipped {dict(corpus.skipped)}) | plan "
        f"{len(units)} queries for {len({u.doc_id for u in units})} documents | {len(units) - len(todo)} already done")

    # ------------------------------------------------------------------ filters (round trip over the whole corpus)
    t = time.perf_counter()
    if todo:
        qfilter = query_filter(cfg, corpus, texts, log)
    timings["filters_setup"] = time.perf_counter() - t

    # ------------------------------------------------------------------ generator and task
    t = time.perf_counter()
    backend = None
    if todo or (gen.task == "auto" and not (run_dir / "gen_task.json").is_file()):
        from embed.generation.backends import build_backend

        backend = build_backend(gen, cfg.seed, cache_dir=cache_dir("generators"), log=log)
        log(f"generator: {gen.backend} {gen.model} loaded in {time.perf_counter() - t:.1f}s")
    timings["load_generator"] = time.perf_counter() - t
    builder.task = resolve_task(gen.task, backend, corpus, cfg.seed, run_dir / "gen_task.json", log)
    log(f"task: {builder.task}")

    # ------------------------------------------------------------------ generation (resumable, block by block)
    throughput = {"generated_units": 0, "generated_docs": 0}
    if todo:
        generator = QueryGenerator(backend, builder, qfilter, corpus, batch_size=gen.batch_size,
                                   max_retries=gen.max_retries, retry_temperature=gen.retry_temperature,
                                   seed=cfg.seed, log=log)
        generator.resume(out)
        all_docs = {u.doc_id for u in units}
        with progress_bar(len(all_docs), "gen", log, initial=len(all_docs - {u.doc_id for u in todo}),
                          unit="doc") as progress:
            throughput = generator.run(units, out, progress)
    out.close()
    if backend is not None:
        backend.close()

    # ------------------------------------------------------------------ inverse-cloze queries (seconds, every document)
    cloze_written = write_cloze_queries(run_dir / "cloze_queries.jsonl", corpus, gen, cfg.seed) if gen.cloze_queries else 0
    if gen.cloze_queries:
        log(f"cloze: {cloze_written} inverse-cloze queries for {len(corpus)} documents -> {run_dir / 'cloze_queries.jsonl'}")

    # ------------------------------------------------------------------ summary
    summary = summarise(out.path, units, corpus)
    summary["cloze_queries"] = cloze_written
    timings["total"] = time.perf_counter() - started
    summary.update({
        "backend": gen.backend, "generator": gen.model, "seed": cfg.seed, "task": builder.task,
        "corpus": cfg.data.corpus, "corpus_documents": len(corpus), "corpus_skipped": dict(corpus.skipped),
        "filters": dataclasses.asdict(filter_settings(gen)), "throughput": throughput,
        "timings_s": {k: round(v, 3) for k, v in timings.items()}, "peak_rss_gb": peak_rss_gb(),
    })
    write_json_atomic(run_dir / "gen_summary.json", summary)
    log_samples(summary, log)
    log(f"kept {summary['queries_kept']}/{summary['queries_written']} queries "
        f"({summary['share_documents_with_kept_query']:.0%} of documents have one) | rejected {summary['rejected']} | "
        f"{throughput.get('docs_per_s') or 0:.3f} docs/s this session | peak RSS {summary['peak_rss_gb']} GB | "
        f"{timings['total']:.0f}s -> {out.path}")


if __name__ == "__main__":
    run_main(main)
