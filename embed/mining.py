"""Hard-negative mining, stage by stage: inputs, teacher embeddings, candidates, negatives, outputs.

scripts/mine_faiss.py calls these functions in order; bench/bench_mine.py reuses the pieces.
The pieces live in their own modules: embed.embedding_cache (corpus embeddings on disk),
embed.bm25_index and embed.dense_index (candidates), embed.negative_filters (fusion and the
positive-aware rules). This module joins them and owns the run's files:

  run_dir/train.jsonl            the training-set schema (embed.data.TrainExample), one row a query; its
                                 `source` (generated, cloze, qrels:<path>) lets a training stage pick
  run_dir/mine_summary.json      counts, drops per rule, negatives-per-query histogram, timings, peak RSS
  run_dir/mine_scores.png        teacher scores of positives vs kept negatives (see the margin work)
  run_dir/train.jsonl.partial    append-only while mining, keyed by query_id; renamed when complete
  run_dir/mine_stats.jsonl.partial   per-query drop counts, so a resumed run's summary covers all queries
  run_dir/mine_resume.json       fingerprint of settings + inputs: a partial file from other settings is discarded
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from embed.config import ConfigError
from embed.data import (Corpus, DataError, JsonlAppender, TrainExample, load_qrels, load_queries, read_jsonl,
                        resolve_data_path, write_json_atomic)
from embed.negative_filters import RULES, NegativeRules, Selection, normalise_text, rrf_fuse, select_negatives

Log = Callable[[str], None]


def log_line(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- settings
def check_mine_config(mine) -> None:
    """Cross-key checks of the `mine:` section, each naming its key."""
    if mine.num_negatives < 1:
        raise ConfigError("key 'mine.num_negatives' must be >= 1")
    if mine.depth < mine.num_negatives:
        raise ConfigError(f"key 'mine.depth' ({mine.depth}) must be >= mine.num_negatives ({mine.num_negatives})")
    for key in ("relative_margin", "absolute_margin"):
        value = getattr(mine, key)
        if value is not None and value < 0:
            raise ConfigError(f"key 'mine.{key}' must be >= 0 or null")
    if mine.rank_min < 0 or mine.rank_max < 0:
        raise ConfigError("keys 'mine.rank_min' and 'mine.rank_max' must be >= 0")
    if mine.rank_max and mine.rank_max <= mine.rank_min:
        raise ConfigError(f"key 'mine.rank_max' ({mine.rank_max}) must be 0 or > mine.rank_min ({mine.rank_min})")
    if not mine.generated and not mine.qrels:
        raise ConfigError("keys 'mine.generated' (false) and 'mine.qrels' (empty) leave nothing to mine")
    if not mine.retrievers:
        raise ConfigError("key 'mine.retrievers' must name at least one of: dense, bm25")
    if not 0.0 <= mine.teacher_bm25_weight <= 1.0:
        raise ConfigError(f"key 'mine.teacher_bm25_weight' must be in [0, 1], got {mine.teacher_bm25_weight}")
    for key in ("batch_size", "encode_batch_size", "rrf_k", "cache_chunk_size"):
        if getattr(mine, key) < 1:
            raise ConfigError(f"key 'mine.{key}' must be >= 1")


def rules_from_config(mine) -> NegativeRules:
    return NegativeRules(num_negatives=mine.num_negatives, relative_margin=mine.relative_margin,
                         absolute_margin=mine.absolute_margin, rank_min=mine.rank_min, rank_max=mine.rank_max,
                         sampling=mine.sampling)


# ---------------------------------------------------------------- inputs
@dataclass
class MiningQuery:
    """A query to mine for: its positives (judged, or the document it was generated from) as corpus rows.

    `excluded_rows` are never negatives either: the positives of other queries with the same text
    (two ids, one question: a document relevant to one is relevant to the other).
    """

    query_id: str
    text: str
    positive_rows: list[int]
    excluded_rows: list[int] = dataclasses.field(default_factory=list)
    origin: str = ""
    positive_text: Optional[str] = None  # an inverse-cloze pair's positive: its document less the query sentence


def resolve_qrels_path(qrels: str, corpus_spec: str) -> Path:
    """`mine.qrels` is a TSV path, or a split name of the BEIR folder in data.corpus."""
    path = Path(qrels)
    if path.suffix == ".tsv" or path.exists():
        return path
    return Path(resolve_data_path(corpus_spec)) / "qrels" / f"{qrels}.tsv"


def queries_from_qrels(qrels_path: Path, queries_spec: str, corpus: Corpus, skipped: Counter,
                       log: Log = log_line) -> list[MiningQuery]:
    """Judged (query, positives) pairs; missing documents and query texts are skipped and counted."""
    queries_spec = queries_spec or str(qrels_path.parent.parent)
    texts = load_queries(queries_spec, skipped=skipped)  # counts 'empty_query' in the queries file
    qrels = load_qrels(qrels_path)
    missing_docs: list[tuple[str, str]] = []
    out = []
    for qid, judged in qrels.items():
        positives = [d for d, score in judged.items() if score > 0]
        if not positives:
            skipped["query_without_relevant_judgement"] += 1
            continue
        rows = []
        for doc_id in positives:
            if doc_id in corpus.index:
                rows.append(corpus.index[doc_id])
            else:
                missing_docs.append((qid, doc_id))
        if not rows:
            skipped["query_without_positive_in_corpus"] += 1
            continue
        text = texts.get(qid)
        if text is None:
            skipped["query_without_text"] += 1
            continue
        out.append(MiningQuery(qid, text, rows, origin=f"qrels:{qrels_path}"))
    if missing_docs:
        skipped["positive_not_in_corpus"] += len(missing_docs)
        qid, doc_id = missing_docs[0]
        log(f"warning: {qrels_path}: {len(missing_docs)} judged positive(s) are not in the corpus and were skipped "
            f"(first: query '{qid}', document '{doc_id}')")
    return out


def queries_from_generation(path: Path, corpus: Corpus, skipped: Counter, log: Log = log_line) -> list[MiningQuery]:
    """Kept rows of the generation stage's queries.jsonl; the source document is the positive."""
    out, seen, missing = [], set(), []
    for line_no, row in read_jsonl(path):
        for key in ("doc_id", "query"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{path}:{line_no}: field '{key}' must be a string")
        kept = row.get("kept", True)
        if not isinstance(kept, bool):
            raise DataError(f"{path}:{line_no}: field 'kept' must be true or false")
        if not kept:
            skipped["generated_not_kept"] += 1
            continue
        if not row["query"].strip():
            skipped["empty_query"] += 1
            continue
        qid = str(row.get("query_id") or f"{row['doc_id']}#{row.get('sample', 0)}")
        if qid in seen:
            skipped["duplicate_query_id"] += 1
            continue
        seen.add(qid)
        source = corpus.index.get(row["doc_id"])
        if source is None:
            missing.append((line_no, row["doc_id"]))
            continue
        positive_text = row.get("positive_text")
        if positive_text is not None and not isinstance(positive_text, str):
            raise DataError(f"{path}:{line_no}: field 'positive_text' must be a string")
        out.append(MiningQuery(qid, row["query"], [source], origin="cloze" if row.get("query_type") == "cloze" else "generated",
                               positive_text=positive_text))
    if missing:
        skipped["positive_not_in_corpus"] += len(missing)
        line_no, doc_id = missing[0]
        log(f"warning: {path}: {len(missing)} row(s) name a doc_id that is not in the corpus and were skipped "
            f"(first: line {line_no}, doc_id '{doc_id}')")
    return out


def exclude_positives_of_same_text(queries: list[MiningQuery]) -> None:
    """Give each query the positives of every other query with the same text as excluded rows."""
    by_text: dict[str, set[int]] = {}
    for q in queries:
        by_text.setdefault(normalise_text(q.text), set()).update(q.positive_rows)
    for q in queries:
        q.excluded_rows = sorted(by_text[normalise_text(q.text)] - set(q.positive_rows))


def load_mining_queries(cfg, corpus: Corpus, skipped: Counter, log: Log = log_line) -> tuple[list[MiningQuery], list[Path]]:
    """(queries, the files they came from): the generation stage's run_dir/queries.jsonl and
    run_dir/cloze_queries.jsonl, whichever exist (`mine.generated`), then the judged pairs of
    `mine.qrels`. Each train.jsonl row's `source` says which, so a stage can pick (stages.*.sources)."""
    queries, paths = [], []
    if cfg.mine.generated:  # the LLM's queries and the inverse-cloze ones, whichever the generation stage wrote
        generated = [p for p in (Path(cfg.run_dir) / "queries.jsonl", Path(cfg.run_dir) / "cloze_queries.jsonl") if p.is_file()]
        if not generated:
            raise DataError(f"{Path(cfg.run_dir) / 'queries.jsonl'}: file not found (run scripts/gen_vllm.py first, "
                            "or set mine.generated: false and mine.qrels to mine judged pairs alone)")
        queries += [q for p in generated for q in queries_from_generation(p, corpus, skipped, log)]
        paths += generated
    if cfg.mine.qrels:
        paths.append(resolve_qrels_path(cfg.mine.qrels, cfg.data.corpus))
        judged = queries_from_qrels(paths[-1], cfg.mine.queries, corpus, skipped, log)
        clash = {q.query_id for q in queries} & {q.query_id for q in judged}
        if clash:
            raise DataError(f"{paths[-1]}: query id '{min(clash)}' is also a generated query's id "
                            f"({len(clash)} shared); query ids must be unique across mined inputs")
        queries += judged
    exclude_positives_of_same_text(queries)
    return queries, paths


# ---------------------------------------------------------------- the teacher and its corpus embeddings
def load_teacher(cfg, device=None):
    """The scoring model: `mine.teacher` with its own settings, or the recipe's model as configured."""
    from embed.model import EmbeddingModel, load_from_config

    if cfg.mine.teacher:
        model = EmbeddingModel.from_pretrained(cfg.mine.teacher, attn_implementation=cfg.model.attn_implementation,
                                               trust_remote_code=cfg.model.trust_remote_code)
        name = cfg.mine.teacher
    else:
        model = load_from_config(cfg.model)
        name = cfg.model.name_or_path
    if device is not None:
        model.to(device)
    return model, name


def encode_by_token_length(model, texts: Sequence[str], kind: str, batch_size: int) -> np.ndarray:
    """`model.encode` in batches of similar *token* length: float32 [N, D] in input order.

    `encode` sorts by characters; on SciFact that pads 4% more tokens than sorting by token
    count, and on a CPU a batch costs what its padded tokens cost. Counting tokens is one fast
    tokenizer pass (under 1% of the encoding time). Each batch is one `encode` call, so its own
    sort only permutes within the batch.
    """
    s = model.settings
    prompt, max_length = (s.query_prompt, s.query_max_length) if kind == "query" else (s.document_prompt, s.max_length)
    lengths = [len(ids) for ids in model.tokenizer([prompt + t for t in texts], truncation=True, max_length=max_length)["input_ids"]]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    out = None
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        emb = model.encode([texts[i] for i in rows], kind=kind, batch_size=len(rows))
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
        out[rows] = emb
    return out


def teacher_cache(model, name: str, dtype: str, corpus: Corpus, texts: Sequence[str], cache_root, precision: str = "fp32"):
    """The cache entry for this teacher + corpus; query-side settings are left out of the key."""
    from embed.embedding_cache import CorpusEmbeddingCache, cache_key, corpus_fingerprint, model_fingerprint
    from embed.paths import resolve_model

    settings = dataclasses.asdict(model.settings)
    for query_only in ("query_prompt", "query_max_length"):
        settings.pop(query_only, None)
    settings["dtype"] = dtype
    if precision != "fp32":  # fp32 entries keep the key they had before encoding precision was a setting
        settings["encode_precision"] = precision
    key, described = cache_key(model_fingerprint(resolve_model(name)), settings, corpus_fingerprint(corpus.ids, texts))
    return CorpusEmbeddingCache(cache_root, key, described, corpus.ids)


# ---------------------------------------------------------------- mining one batch
@dataclass
class MinedQuery:
    query: MiningQuery
    positive_scores: list[float]
    selection: Selection
    n_candidates: int


class NegativeMiner:
    """Candidates from each retriever -> RRF -> teacher scores -> positive-aware selection.

    `corpus_emb` is the (memory-mapped) teacher embedding matrix; `dense` and `bm25` are the
    candidate sources (either may be None); `text_of(row)` gives a document's text for the
    duplicate rule (None: rows are their own identity, e.g. synthetic benchmarks).
    With `lexical` (a BM25Index) and `lexical_weight` w > 0 the teacher is hybrid: cosine mixed
    with relative BM25 (`BM25Index.relative_scores`). Where a small dense teacher misses the rare
    terms of a specialised domain, the hybrid ranks better than either part, so its scores make
    safer margins and better targets for distillation (train.stages.*.distill_weight).
    """

    def __init__(self, corpus_emb: np.ndarray, rules: NegativeRules, depth: int, rrf_k: int, seed: int,
                 dense=None, bm25=None, text_of: Optional[Callable[[int], str]] = None,
                 lexical=None, lexical_weight: float = 0.0):
        if dense is None and bm25 is None:
            raise ConfigError("key 'mine.retrievers' must name at least one of: dense, bm25")
        if lexical_weight and lexical is None:
            raise ValueError("NegativeMiner: lexical_weight > 0 needs a lexical (BM25) index")
        self.corpus_emb, self.rules, self.depth, self.rrf_k, self.seed = corpus_emb, rules, depth, rrf_k, seed
        self.dense, self.bm25, self.text_of = dense, bm25, text_of
        self.lexical, self.lexical_weight = lexical, lexical_weight
        self._text_keys: dict[int, int] = {}
        self.seconds = Counter()

    def _text_key(self, row: int):
        if self.text_of is None:
            return row
        key = self._text_keys.get(row)
        if key is None:
            key = self._text_keys[row] = hash(normalise_text(self.text_of(row)))
        return key

    def _rng(self, query_id: str) -> np.random.Generator:
        """Seeded per query, so a resumed run samples exactly what an uninterrupted one would."""
        digest = int.from_bytes(hashlib.sha256(query_id.encode()).digest()[:8], "little")
        return np.random.default_rng([self.seed, digest])

    def mine(self, queries: Sequence[MiningQuery], query_emb: np.ndarray) -> list[MinedQuery]:
        # room for the positives, which are found and then removed
        k = self.depth + max(len(q.positive_rows) + len(q.excluded_rows) for q in queries)
        t0 = time.perf_counter()
        rankings: list[np.ndarray] = []
        if self.dense is not None:
            rankings.append(self.dense.search(query_emb, k)[1])            # [Q, k]
        t1 = time.perf_counter()
        if self.bm25 is not None:
            rankings.append(self.bm25.search([q.text for q in queries], k)[0])  # [Q, k]
        t2 = time.perf_counter()
        out = []
        for i, q in enumerate(queries):
            fused = rrf_fuse([r[i] for r in rankings], k=self.rrf_k)
            q_vec = query_emb[i].astype(np.float32)
            cand_scores = np.asarray(self.corpus_emb[fused], dtype=np.float32) @ q_vec if fused else np.zeros(0)
            pos_scores = np.asarray(self.corpus_emb[q.positive_rows], dtype=np.float32) @ q_vec
            if self.lexical_weight:
                w = self.lexical_weight
                lexical = self.lexical.relative_scores(q.text, list(fused) + list(q.positive_rows))
                cand_scores = (1 - w) * cand_scores + w * lexical[:len(fused)]
                pos_scores = (1 - w) * pos_scores + w * lexical[len(fused):]
            selection = select_negatives(fused, cand_scores, float(pos_scores.min()), q.positive_rows, set(q.excluded_rows),
                                         self._text_key, self.rules, self._rng(q.query_id))
            out.append(MinedQuery(q, [float(s) for s in pos_scores], selection, len(fused)))
        self.seconds.update(dense_search=t1 - t0, bm25_search=t2 - t1, filter=time.perf_counter() - t2)
        return out


def to_train_row(mined: MinedQuery, corpus: Corpus) -> dict:
    q = mined.query
    neg = mined.selection.indices
    return TrainExample(
        query=q.text, query_id=q.query_id,
        pos_ids=[corpus.ids[r] for r in q.positive_rows],
        pos_texts=[q.positive_text] if q.positive_text is not None else [corpus.doc_text(r) for r in q.positive_rows],
        neg_ids=[corpus.ids[r] for r in neg], neg_texts=[corpus.doc_text(r) for r in neg],
        pos_scores=[round(s, 6) for s in mined.positive_scores],
        neg_scores=[round(s, 6) for s in mined.selection.scores], source=q.origin,
    ).to_row()


def to_stats_row(mined: MinedQuery) -> dict:
    return {"query_id": mined.query.query_id, "candidates": mined.n_candidates,
            "negatives": len(mined.selection.indices), "drops": dict(mined.selection.drops)}


# ---------------------------------------------------------------- resumable output
class ResumableOutput:
    """train.jsonl built through an append-only partial file, renamed into place when complete."""

    def __init__(self, run_dir: str | os.PathLike, fingerprint: dict, log: Log = log_line):
        run_dir = Path(run_dir)
        self.final = run_dir / "train.jsonl"
        self.partial = run_dir / "train.jsonl.partial"
        self.stats_partial = run_dir / "mine_stats.jsonl.partial"
        self.resume_file = run_dir / "mine_resume.json"
        stored = json.loads(self.resume_file.read_text()) if self.resume_file.is_file() else None
        if stored is not None and stored != fingerprint and (self.partial.exists() or self.stats_partial.exists()):
            log(f"note: {self.partial} was mined with other settings or inputs; starting over")
            self.partial.unlink(missing_ok=True)
            self.stats_partial.unlink(missing_ok=True)
        write_json_atomic(self.resume_file, fingerprint)
        self.rows = JsonlAppender(self.partial, key_fn=lambda r: r["query_id"])
        self.stats = JsonlAppender(self.stats_partial, key_fn=lambda r: r["query_id"])

    @property
    def done(self) -> set:
        return self.rows.done

    def write(self, mined: Sequence[MinedQuery], corpus: Corpus) -> None:
        self.stats.write(to_stats_row(m) for m in mined)  # stats first: a kill in between only redoes the rows
        self.rows.write(to_train_row(m, corpus) for m in mined)

    def finalise(self, expected_ids: Sequence[str]) -> list[dict]:
        """Check every query is present exactly once, rename into place; return the per-query stats."""
        self.rows.close()
        self.stats.close()
        ids = [row["query_id"] for _, row in read_jsonl(self.partial)] if self.partial.stat().st_size else []
        if len(ids) != len(set(ids)) or set(ids) != set(expected_ids):
            raise RuntimeError(f"{self.partial}: {len(ids)} rows for {len(expected_ids)} queries; refusing to finalise")
        stats = {row["query_id"]: row for _, row in read_jsonl(self.stats_partial)} if self.stats_partial.stat().st_size else {}
        os.replace(self.partial, self.final)
        return [stats[q] for q in expected_ids if q in stats]

    def cleanup(self) -> None:
        self.stats_partial.unlink(missing_ok=True)
        self.resume_file.unlink(missing_ok=True)


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---------------------------------------------------------------- summary
def summarise(train_path: Path, stats: list[dict], num_negatives: int, skipped: Counter) -> tuple[dict, list, list]:
    """Counts for mine_summary.json, plus all positive and negative teacher scores for the plot."""
    per_query, per_source = Counter(), Counter()
    pos_scores, neg_scores, judged_leaks = [], [], 0
    for _, row in read_jsonl(train_path):
        per_query[len(row["neg_ids"])] += 1
        per_source[(row.get("source") or "").split(":", 1)[0]] += 1
        pos_scores.extend(row["pos_scores"] or [])
        neg_scores.extend(row["neg_scores"] or [])
        judged_leaks += len(set(row["neg_ids"]) & set(row["pos_ids"]))
    n = sum(per_query.values())
    drops = Counter()
    for s in stats:
        drops.update(s["drops"])
    summary = {
        "queries_mined": n,
        "queries_per_source": dict(sorted(per_source.items())),
        "queries_skipped": dict(sorted(skipped.items())),
        "negatives_per_query_mean": round(sum(k * v for k, v in per_query.items()) / max(n, 1), 4),
        "negatives_per_query_histogram": {str(k): per_query[k] for k in sorted(per_query)},
        "queries_short_of_negatives": sum(v for k, v in per_query.items() if k < num_negatives),
        "negatives_that_are_positives": judged_leaks,
        "candidates_per_query_mean": round(sum(s["candidates"] for s in stats) / max(len(stats), 1), 2),
        "drops_per_rule": {rule: drops.get(rule, 0) for rule in RULES},
        "teacher_score_mean": {"positive": _mean(pos_scores), "negative": _mean(neg_scores)},
    }
    return summary, pos_scores, neg_scores


def _mean(values: list[float]) -> Optional[float]:
    return round(float(np.mean(values)), 4) if values else None


def plot_scores(path: Path, pos_scores: list[float], neg_scores: list[float], title: str) -> None:
    """Histogram of teacher scores: kept negatives should sit left of the positives, margin apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(min(pos_scores + neg_scores, default=0.0), max(pos_scores + neg_scores, default=1.0), 50)
    for scores, label in ((neg_scores, "negatives"), (pos_scores, "positives")):
        if scores:  # density of an empty list is 0/0
            ax.hist(scores, bins=bins, alpha=0.6, density=True, label=f"{label} (n={len(scores)})")
    ax.set_xlabel("teacher score (cosine)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
