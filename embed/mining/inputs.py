"""What mining reads: generated queries and/or judged pairs, as `MiningQuery` rows."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from embed.cli import Log, log_line
from embed.data import (
    Corpus,
    judged_queries,
    load_queries,
    resolve_data_path,
    source_kind,
    warn_missing_positives,
)
from embed.errors import DataError
from embed.io import read_jsonl
from embed.mining.negative_filters import normalise_text


# ---------------------------------------------------------------- inputs
@dataclass
class MiningQuery:
    """A query to mine for: its positives (judged, or the document it was generated from) as corpus rows;
    none for an unjudged query, whose positive the miner takes from the teacher.

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
    """Judged (query, positives) pairs (`data.judged_queries`) as mining queries."""
    return [MiningQuery(j.query_id, j.text, j.rows, origin=f"qrels:{qrels_path}")
            for j in judged_queries(qrels_path, queries_spec, corpus, skipped, log)]


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
        line_no, doc_id = missing[0]
        warn_missing_positives(skipped, log, len(missing), f"{path}: {{n}} row(s) name a doc_id that is not in the "
                               f"corpus and were skipped (first: line {line_no}, doc_id '{doc_id}')")
    return out


def queries_unjudged(spec: str, skipped: Counter) -> tuple[list[MiningQuery], Path]:
    """Real queries without judgments (mine.unjudged_queries), and the file they came from.

    Why: a domain's own queries (a search log) are what generation imitates. On SciFact, its 809 train
    claims with the mining teacher's best document as the positive, no label read, train the dense model
    as far as the same claims with their judgements (bench/disjoint_dev.py)."""
    path = Path(resolve_data_path(spec))
    path = path / "queries.jsonl" if path.is_dir() else path
    return [MiningQuery(qid, text, [], origin=f"unjudged:{path}") for qid, text in load_queries(str(path), skipped).items()], path


def weight_rule_queries(path: Path, corpus: Corpus) -> tuple[list[str], list[int]]:
    """(query texts, source rows) the lexical weight rule ranks: the kept generated queries and those
    only the round-trip filter rejected (embed.retrieval.channel_weight says why both)."""
    texts, rows = [], []
    for _, row in read_jsonl(path):
        usable = row.get("kept") is True or row.get("reject_reason") == "round_trip"
        if usable and isinstance(row.get("query"), str) and row["query"].strip() and row.get("doc_id") in corpus.index:
            texts.append(row["query"])
            rows.append(corpus.index[row["doc_id"]])
    return texts, rows


def exclude_positives_of_same_text(queries: list[MiningQuery]) -> None:
    """Give each query the positives of every other query with the same text as excluded rows."""
    by_text: dict[str, set[int]] = {}
    for q in queries:
        by_text.setdefault(normalise_text(q.text), set()).update(q.positive_rows)
    for q in queries:
        q.excluded_rows = sorted(by_text[normalise_text(q.text)] - set(q.positive_rows))


def _extend_unique(queries: list[MiningQuery], new: list[MiningQuery], path: Path) -> None:
    """Append `new` (read from `path`) to `queries`; a query id already taken is an error naming both inputs."""
    taken = {q.query_id: q for q in queries}
    clash = sorted(q.query_id for q in new if q.query_id in taken)
    if clash:
        kind = source_kind(taken[clash[0]].origin) or "mined"
        raise DataError(f"{path}: query id '{clash[0]}' is also {'an' if kind[0] in 'aeiou' else 'a'} {kind} query's id "
                        f"({len(clash)} shared); query ids must be unique across mined inputs")
    queries += new


def load_mining_queries(cfg, corpus: Corpus, skipped: Counter, log: Log = log_line) -> tuple[list[MiningQuery], list[Path]]:
    """(queries, the files they came from): the generation stage's run_dir/queries.jsonl and
    run_dir/cloze_queries.jsonl, whichever exist (`mine.generated`), then the judged pairs of
    `mine.qrels`, then the unjudged queries of `mine.unjudged_queries`. Each train.jsonl row's `source` says which, so a stage can pick (stages.*.sources)."""
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
        _extend_unique(queries, queries_from_qrels(paths[-1], cfg.mine.queries, corpus, skipped, log), paths[-1])
    if cfg.mine.unjudged_queries:
        unjudged, path = queries_unjudged(cfg.mine.unjudged_queries, skipped)
        paths.append(path)
        _extend_unique(queries, unjudged, path)
    exclude_positives_of_same_text(queries)
    return queries, paths
