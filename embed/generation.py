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

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from embed.data import Corpus, JsonlAppender, read_jsonl, write_json_atomic
from embed.prompts import DEFAULT_TASK, PromptBuilder, parse_answer, task_prompt
from embed.query_filters import REASONS, QueryFilter

Log = Callable[[str], None]
RAW_CHARS = 300  # unparseable answers are kept (shortened) in their row, for inspection


@dataclass(frozen=True)
class Unit:
    """One answer to generate: sample `sample` of corpus row `doc_row`, asking for `query_type`."""

    doc_row: int
    doc_id: str
    sample: int
    query_type: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.doc_id, self.sample)


def row_key(row: dict) -> tuple[str, int]:
    return (row["doc_id"], row["sample"])


def plan_units(corpus: Corpus, max_docs: int, queries_per_doc: int, query_types: Sequence[str],
               seed: int) -> list[Unit]:
    """A seeded random order of documents (the first `max_docs` of it), types rotated over units."""
    order = np.random.default_rng(seed).permutation(len(corpus))
    if max_docs > 0:
        order = order[:max_docs]
    units = []
    for position, row in enumerate(order.tolist()):
        for sample in range(queries_per_doc):
            qtype = query_types[(position * queries_per_doc + sample) % len(query_types)]
            units.append(Unit(row, corpus.ids[row], sample, qtype))
    return units


def block_seed(seed: int, block: int, attempt: int) -> int:
    """A seed per (block, attempt): a block's answers do not depend on what ran before it."""
    return (seed * 1_000_003 + block * 7_919 + attempt * 104_729) % 2**31


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
                 batch_size: int, max_retries: int, seed: int, log: Log = print):
        self.backend = backend
        self.builder = builder
        self.qfilter = qfilter
        self.corpus = corpus
        self.batch_size = batch_size
        self.max_retries = max_retries
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

    def answers(self, units: Sequence[Unit], block: int) -> tuple[list, list[int], list[str]]:
        """Parsed answers, attempts used and raw texts.

        An unusable answer (unparseable, too short or long, meta-text, copied) is generated again
        with another seed: a 135M generator fails often but not consistently on one document.
        """
        documents = [self.corpus.doc_text(u.doc_row) for u in units]
        prompts = [self.builder.build(d, u.query_type) for d, u in zip(documents, units)]
        parsed, attempts, raw = [None] * len(units), [0] * len(units), [""] * len(units)
        todo = list(range(len(units)))
        for attempt in range(self.max_retries + 1):
            if not todo:
                break
            if attempt:
                self.retries += len(todo)
            texts = self.backend.generate([prompts[i] for i in todo], block_seed(self.seed, block, attempt))
            for i, text in zip(todo, texts):
                parsed[i], attempts[i], raw[i] = parse_answer(text), attempt + 1, text
            todo = [i for i in todo if self.qfilter.text_reason(parsed[i].query, documents[i]) is not None]
        return parsed, attempts, raw

    def rows(self, units: Sequence[Unit], block: int) -> list[dict]:
        parsed, attempts, raw = self.answers(units, block)
        verdicts = self.qfilter.check([u.key for u in units], [p.query for p in parsed],
                                      [self.corpus.doc_text(u.doc_row) for u in units], [u.doc_row for u in units])
        rows = []
        for u, p, n, text, v in zip(units, parsed, attempts, raw, verdicts):
            row = {"query_id": f"{u.doc_id}#{u.sample}", "doc_id": u.doc_id, "sample": u.sample,
                   "query_type": u.query_type, "query": p.query or "", "kept": v.kept,
                   "reject_reason": v.reason, "attempts": n}
            row.update({f"{name}_rank": rank for name, rank in v.ranks.items()})
            if p.error:
                row["parse_error"] = p.error
                row["raw"] = text[:RAW_CHARS]
            rows.append(row)
        return rows

    def run(self, units: Sequence[Unit], out: JsonlAppender, progress=None) -> dict:
        """Generate every block with a unit not yet on disk; return this session's throughput."""
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
