"""The generation stage: documents -> prompts -> LLM answers -> parsed, filtered rows.

Output is `run_dir/queries.jsonl`, append-only and keyed by (doc_id, sample). Every planned
(document, sample) gets exactly one row, kept or not: a rejected row records why
(`reject_reason`), so a rerun never regenerates it and the summary can count it. The mining
stage reads the rows with `kept: true`.

Determinism and resume: the plan (which documents, in which order, which query type) depends
only on the seed; the plan is cut into fixed blocks of `batch_size` units and each block is
generated with a seed of its own. A killed run therefore regenerates, on rerun, the block it
was in exactly as the first run would have, and `JsonlAppender` drops the rows already on disk.
Every filter decides per row from the corpus and from the kept rows before it (the round-trip
retrievers index the whole corpus, not the queries), so verdicts are final when written and no
second pass over the file is needed.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from embed.cli import Log
from embed.data import Corpus
from embed.errors import ConfigError
from embed.generation.filters import REASONS, QueryFilter
from embed.generation.prompts import (
    DEFAULT_TASK,
    PromptBuilder,
    parse_answer,
    task_prompt,
)
from embed.io import JsonlAppender, read_jsonl, write_json_atomic

RAW_CHARS = 300  # unparseable answers are kept (shortened) in their row, for inspection


@dataclass(frozen=True)
class Unit:
    """One answer to generate: sample `sample` of corpus row `doc_row`, asking for `query_type`
    of at most `word_limit` words."""

    doc_row: int
    doc_id: str
    sample: int
    query_type: str
    word_limit: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.doc_id, self.sample)


def row_key(row: dict) -> tuple[str, int]:
    return (row["doc_id"], row["sample"])


def plan_units(corpus: Corpus, max_docs: int, queries_per_doc: int, query_types: Sequence[str],
               word_limits: Sequence[int], seed: int) -> list[Unit]:
    """A seeded random order of documents (the first `max_docs` of it); query types rotate over
    documents, and word limits over each round of types, so every type gets every length. A
    document's `queries_per_doc` samples share one prompt, so the backend prefills the document once
    and samples it k times (TransformersBackend; vLLM's prefix cache does the same)."""
    order = np.random.default_rng(seed).permutation(len(corpus))
    if max_docs > 0:
        order = order[:max_docs]
    units = []
    for position, row in enumerate(order.tolist()):
        qtype = query_types[position % len(query_types)]
        limit = word_limits[(position // len(query_types)) % len(word_limits)]
        units.extend(Unit(row, corpus.ids[row], sample, qtype, limit) for sample in range(queries_per_doc))
    return units


def block_seed(seed: int, block: int, attempt: int) -> int:
    """A seed per (block, attempt): a block's answers do not depend on what ran before it."""
    return (seed * 1_000_003 + block * 7_919 + attempt * 104_729) % 2**31


# Keys that do not change a row of queries.jsonl, so a rerun may differ in them (max_docs: the plan is
# a prefix of one seeded order, so more documents extend a run; the inverse-cloze queries go to their
# own file, rewritten whole on every run).
RESUME_FREE_KEYS = ("max_docs", "vllm", "openai", "trust_remote_code", "cloze_queries", "cloze_keep_sentence")


def check_resume(run_dir: Path, gen, seed: int, corpus_key: str) -> None:
    """Refuse to extend queries.jsonl written with other settings or another corpus: the rows would
    silently mix. `corpus_key` is `embedding_cache.corpus_fingerprint` (content, not file times), so a
    copied or re-downloaded corpus still resumes."""
    fingerprint = {"seed": seed, "corpus": corpus_key,
                   **{k: v for k, v in dataclasses.asdict(gen).items() if k not in RESUME_FREE_KEYS}}
    path = run_dir / "gen_resume.json"
    if (run_dir / "queries.jsonl").exists() and path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        # a key added to the recipe since that run counts as unchanged while it keeps its default
        defaults = dataclasses.asdict(type(gen)())
        changed = sorted(k for k in fingerprint.keys() | before.keys()
                         if before.get(k, defaults.get(k)) != fingerprint.get(k))
        if changed:
            names = ", ".join(k if k in ("seed", "corpus") else f"gen.{k}" for k in changed)
            raise ConfigError(f"{run_dir / 'queries.jsonl'} was generated with other settings ({names} changed): "
                              "use another --run_dir, or delete the file to start over")
    write_json_atomic(path, fingerprint)


def resolve_task(task: str, backend, corpus: Corpus, seed: int, path: Path, log: Log) -> str:
    """The task description: as given, generic when empty, or brainstormed once and saved for `auto`."""
    if task != "auto":
        return task or DEFAULT_TASK
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["task"]
    rows = np.random.default_rng(seed).choice(len(corpus), size=min(5, len(corpus)), replace=False)
    answer = backend.generate([task_prompt([corpus.doc_text(int(r)) for r in rows])], seed)[0]
    parsed = parse_answer(answer, field="task")
    brainstormed = parsed.query if parsed.query and 4 <= len(parsed.query.split()) <= 40 else None
    chosen = brainstormed or DEFAULT_TASK
    if brainstormed is None:
        log(f"task: the generator's brainstorm was unusable ({parsed.error or 'length'}: {answer[:120]!r}); "
            "using the generic task")
    write_json_atomic(path, {"task": chosen, "brainstormed": brainstormed is not None, "answer": answer})
    return chosen


class QueryGenerator:
    """Generates, parses, retries and filters block by block, appending rows as it goes."""

    def __init__(self, backend, builder: PromptBuilder, qfilter: QueryFilter, corpus: Corpus, *,
                 batch_size: int, max_retries: int, retry_temperature: float, seed: int, log: Log = print):
        self.backend = backend
        self.builder = builder
        self.qfilter = qfilter
        self.corpus = corpus
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.retry_temperature = retry_temperature
        self.seed = seed
        self.log = log
        self.retries = 0

    def resume(self, out: JsonlAppender) -> int:
        """Register the kept rows already on disk (duplicate check); return how many rows exist."""
        if not out.path.exists():
            return 0
        n = 0
        for _, row in read_jsonl(out.path):
            if row.get("kept"):
                self.qfilter.register_kept(row["query"], row_key(row))
            n += 1
        return n

    def answers(self, units: Sequence[Unit], block: int) -> tuple[list, list, list[int], list[str]]:
        """Parsed answers, their assessments, attempts used and raw texts.

        An answer that fails any per-query check (unparseable, length, meta-text, copied, round
        trip) is generated again with another seed and `retry_temperature`: a 135M generator
        fails often but not consistently on one document, and at a low temperature it repeats
        its failure.
        """
        documents = [self.corpus.doc_text(u.doc_row) for u in units]
        rows = [u.doc_row for u in units]
        prompts = [self.builder.build(d, u.query_type, u.word_limit) for d, u in zip(documents, units)]
        parsed, assessed, attempts, raw = [None] * len(units), [None] * len(units), [0] * len(units), [""] * len(units)
        todo = list(range(len(units)))
        for attempt in range(self.max_retries + 1):
            if not todo:
                break
            if attempt:
                self.retries += len(todo)
            texts = self.backend.generate([prompts[i] for i in todo], block_seed(self.seed, block, attempt),
                                          temperature=self.retry_temperature if attempt else None)
            answers = [parse_answer(t) for t in texts]
            checks = self.qfilter.assess([a.query for a in answers], [documents[i] for i in todo], [rows[i] for i in todo])
            for i, text, answer, check in zip(todo, texts, answers, checks):
                parsed[i], assessed[i], attempts[i], raw[i] = answer, check, attempt + 1, text
            todo = [i for i in todo if not assessed[i].usable]
        return parsed, assessed, attempts, raw

    def rows(self, units: Sequence[Unit], block: int) -> list[dict]:
        parsed, assessed, attempts, raw = self.answers(units, block)
        verdicts = self.qfilter.check([u.key for u in units], [p.query for p in parsed],
                                      [self.corpus.doc_text(u.doc_row) for u in units], [u.doc_row for u in units],
                                      assessed)
        rows = []
        for u, p, n, text, v in zip(units, parsed, attempts, raw, verdicts):
            row = {"query_id": f"{u.doc_id}#{u.sample}", "doc_id": u.doc_id, "sample": u.sample,
                   "query_type": u.query_type, "word_limit": u.word_limit, "query": p.query or "", "kept": v.kept,
                   "reject_reason": v.reason, "attempts": n}
            row.update({f"{name}_rank": rank for name, rank in v.ranks.items()})
            if p.error:
                row["parse_error"] = p.error
                row["raw"] = text[:RAW_CHARS]
            rows.append(row)
        return rows

    def run(self, units: Sequence[Unit], out: JsonlAppender, progress=None) -> dict:
        """Generate every block with a unit not yet on disk; return this session's throughput.

        A block holds one query type: its prompts share one chat prefix (the worked example differs
        by type), so the backend runs the whole block as one batch from one prefix cache, where
        rotating types would split a block of 16 into three small batches. The order is a function
        of the plan alone, so a resumed run forms the same blocks."""
        type_order: dict[str, int] = {}
        for u in units:
            type_order.setdefault(u.query_type, len(type_order))
        units = sorted(units, key=lambda u: type_order[u.query_type])  # stable: plan order within a type
        blocks = [units[i:i + self.batch_size] for i in range(0, len(units), self.batch_size)]
        started, docs_done, units_done = time.perf_counter(), 0, 0
        for b, block in enumerate(blocks):
            missing = [u for u in block if u.key not in out.done]
            if not missing:
                continue
            out.write(self.rows(block, b))
            docs = len({u.doc_id for u in missing})
            docs_done += docs
            units_done += len(missing)
            if progress is not None:
                elapsed = time.perf_counter() - started
                progress.update(docs)
                progress.set_postfix(queries_per_s=f"{units_done / max(elapsed, 1e-9):.2f}")
        seconds = time.perf_counter() - started
        return {"generated_units": units_done, "generated_docs": docs_done, "seconds": round(seconds, 3),
                "docs_per_s": round(docs_done / seconds, 4) if seconds > 0 and docs_done else None,
                "queries_per_s": round(units_done / seconds, 4) if seconds > 0 and units_done else None,
                "retried_answers": self.retries}


def summarise(path: Path, units: Sequence[Unit], corpus: Corpus, n_samples: int = 5) -> dict:
    """Counts over the whole queries.jsonl (earlier sessions included) and a few kept samples."""
    planned = {u.key for u in units}
    rows = [row for _, row in read_jsonl(path) if row_key(row) in planned]
    reasons = Counter(row["reject_reason"] for row in rows if not row["kept"])
    parse_errors = Counter(row["parse_error"] for row in rows if row.get("parse_error"))
    by_type = Counter(row["query_type"] for row in rows)
    kept_by_type = Counter(row["query_type"] for row in rows if row["kept"])
    kept = [row for row in rows if row["kept"]]
    docs = {u.doc_id for u in units}
    docs_with_kept = {row["doc_id"] for row in kept}
    step = max(1, len(kept) // n_samples)
    samples = [{"doc_id": r["doc_id"], "title": corpus.titles[corpus.index[r["doc_id"]]][:120],
                "query_type": r["query_type"], "query": r["query"]} for r in kept[::step][:n_samples]]
    return {
        "documents_planned": len(docs), "queries_planned": len(planned), "queries_written": len(rows),
        "queries_kept": len(kept), "keep_rate": round(len(kept) / len(rows), 4) if rows else None,
        "documents_with_kept_query": len(docs_with_kept),
        "share_documents_with_kept_query": round(len(docs_with_kept) / len(docs), 4) if docs else None,
        "rejected": {reason: reasons.get(reason, 0) for reason in REASONS},
        "parse_errors": dict(parse_errors),
        "queries_by_type": dict(by_type), "kept_by_type": dict(kept_by_type),
        "samples": samples,
    }


def log_samples(summary: dict, log: Log) -> None:
    for s in summary["samples"]:
        log(f"sample [{s['query_type']}] doc {s['doc_id']} \"{s['title'][:60]}\" -> {s['query']}")
