"""Data in and out: BEIR folders or Hugging Face datasets in, the training-set schema out.

Every reader validates as it goes and names file, line and field in its error, because a
bad line found an hour into a run is worth less than one found at load time. Writers are
atomic (temp file + rename) or append-only with a torn-tail repair, so a killed job never
leaves a half file that looks whole.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from embed import datasets
from embed.errors import DataError
from embed.io import read_jsonl, write_jsonl_atomic


# ---------------------------------------------------------------- BEIR / HF inputs
@dataclass
class Corpus:
    """Documents in file order. `skipped` counts lines by reason: dropped, or for empty documents
    read with `keep_empty=True`, kept but counted."""

    ids: list[str]
    titles: list[str]
    texts: list[str]
    source: str = ""
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self.index = {doc_id: i for i, doc_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def doc_text(self, i: int) -> str:
        """Title and text joined by a space: how BEIR and MTEB present a document to a model."""
        return f"{self.titles[i]} {self.texts[i]}".strip()


def resolve_data_path(spec: str) -> str:
    """A BEIR folder or file path, `builtin:...`, or an HF dataset id (returned unchanged)."""
    return datasets.resolve(spec) if datasets.is_builtin(spec) else spec


def _str_field(path, line_no, obj, key, required: bool) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(f"{path}:{line_no}: missing field '{key}'")
        return ""
    if isinstance(value, (int, float)) and key == "_id" and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{path}:{line_no}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _hf_split(spec: str, config: str):
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core requirement
        raise DataError(f"'{spec}' is not a local path and the datasets package is missing") from e
    try:
        ds = datasets.load_dataset(spec, config)
    except Exception as e:  # the hub being unreachable is a user-environment problem
        raise DataError(f"'{spec}' is neither a local BEIR folder nor a loadable HF dataset ({type(e).__name__}: {e})".splitlines()[0]) from None
    return ds[next(iter(ds))]


def load_corpus(spec: str, keep_empty: bool = False) -> Corpus:
    """Read a BEIR `corpus.jsonl` (folder or file), `builtin:...`, or an HF dataset id's `corpus` config.

    Documents with empty title and text are skipped and counted in `skipped["empty_text"]`: nothing
    can be generated for or mined from them. Evaluation passes `keep_empty=True` (they are still
    counted): qrels may judge an empty document relevant, and MTEB ranks it like any other document.
    """
    spec = resolve_data_path(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if path.exists() or path.suffix == ".jsonl" or os.sep in spec or spec.startswith("."):
        rows = ((ln, obj) for ln, obj in read_jsonl(path))
        source = str(path)
    else:
        rows = enumerate(_hf_split(spec, "corpus"), start=1)
        source = spec
    ids, titles, texts, skipped, first_seen = [], [], [], Counter(), {}
    for line_no, obj in rows:
        doc_id = _str_field(source, line_no, obj, "_id", required=True)
        title = _str_field(source, line_no, obj, "title", required=False)
        text = _str_field(source, line_no, obj, "text", required=False)
        if doc_id in first_seen:
            raise DataError(f"{source}:{line_no}: field '_id': duplicate id '{doc_id}' (first on line {first_seen[doc_id]})")
        first_seen[doc_id] = line_no
        if not (title.strip() or text.strip()):
            skipped["empty_text"] += 1
            if not keep_empty:
                continue
        ids.append(doc_id)
        titles.append(title)
        texts.append(text)
    if not ids:
        raise DataError(f"{source}: no documents")
    return Corpus(ids, titles, texts, source=source, skipped=skipped)


def load_queries(spec: str, skipped: Optional[Counter] = None) -> dict[str, str]:
    """Read a BEIR `queries.jsonl` (folder or file); empty queries are skipped and counted."""
    spec = resolve_data_path(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "queries.jsonl"
    queries: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    for line_no, obj in read_jsonl(path):
        qid = _str_field(path, line_no, obj, "_id", required=True)
        text = _str_field(path, line_no, obj, "text", required=True)
        if qid in first_seen:
            raise DataError(f"{path}:{line_no}: field '_id': duplicate id '{qid}' (first on line {first_seen[qid]})")
        first_seen[qid] = line_no
        if not text.strip():
            if skipped is not None:
                skipped["empty_query"] += 1
            continue
        queries[qid] = text
    return queries


def load_qrels(spec: str, corpus_ids=None, query_ids=None, on_unknown: str = "error",
               skipped: Optional[Counter] = None) -> dict[str, dict[str, int]]:
    """Read `qrels/<split>.tsv` (query-id, corpus-id, score; header line).

    Judgements naming a document or query that does not exist are an error by default
    (evaluation must not silently score against a different collection), or with
    on_unknown="skip" are dropped and counted in `skipped`.
    """
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{path}: qrels file not found")
    corpus_ids = set(corpus_ids) if corpus_ids is not None else None
    query_ids = set(query_ids) if query_ids is not None else None
    qrels: dict[str, dict[str, int]] = {}
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line_no = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line_no}: not valid UTF-8") from None
    for line_no, row in enumerate(csv.reader(lines, delimiter="\t"), start=1):
        if not row or not "".join(row).strip():
            continue
        if line_no == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(row) < 3:
            raise DataError(f"{path}:{line_no}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(row)}")
        qid, did, score = row[0].strip(), row[1].strip(), row[2].strip()
        try:
            score_int = int(float(score))
        except ValueError:
            raise DataError(f"{path}:{line_no}: field 'score' must be a number, got {score!r}") from None
        for known, value, name in ((corpus_ids, did, "corpus-id"), (query_ids, qid, "query-id")):
            if known is not None and value not in known:
                if on_unknown == "skip":
                    if skipped is not None:
                        skipped[f"qrels_unknown_{name.split('-')[0]}"] += 1
                    break
                raise DataError(f"{path}:{line_no}: field '{name}': unknown id '{value}'")
        else:
            qrels.setdefault(qid, {})[did] = score_int
    if not qrels:
        raise DataError(f"{path}: no judgements")
    return qrels


# ---------------------------------------------------------------- training-set schema
@dataclass
class TrainExample:
    """One row of `train.jsonl`: a query, its positives and hard negatives, all with texts."""

    query: str
    pos_ids: list[str]
    pos_texts: list[str]
    neg_ids: list[str] = field(default_factory=list)
    neg_texts: list[str] = field(default_factory=list)
    query_id: Optional[str] = None
    instruction: Optional[str] = None
    pos_scores: Optional[list[float]] = None
    neg_scores: Optional[list[float]] = None
    source: Optional[str] = None
    # The mining teacher's best candidates for the query (positives first) and its scores of them:
    # the target of a training stage with `frozen_documents` (mine.teacher_candidates).
    cand_ids: Optional[list[str]] = None
    cand_scores: Optional[list[float]] = None

    def to_row(self) -> dict:
        return asdict(self)


def source_kind(source: str | None) -> str:
    """A train.jsonl row's kind from its `source`: 'generated', 'cloze', or 'qrels' / 'unjudged' for '<kind>:<path>'."""
    return (source or "").split(":", 1)[0]


_LIST_FIELDS = ("pos_ids", "pos_texts", "neg_ids", "neg_texts")


def parse_train_row(path, line_no: int, obj: dict) -> TrainExample:
    known = set(TrainExample.__dataclass_fields__)
    unknown = sorted(set(obj) - known)
    if unknown:
        raise DataError(f"{path}:{line_no}: unknown field '{unknown[0]}'")
    if not isinstance(obj.get("query"), str):
        raise DataError(f"{path}:{line_no}: field 'query' must be a string")
    for key in _LIST_FIELDS:
        value = obj.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{path}:{line_no}: field '{key}' must be a list of strings")
    if not obj.get("pos_ids"):
        raise DataError(f"{path}:{line_no}: field 'pos_ids' must name at least one positive")
    for ids, texts in (("pos_ids", "pos_texts"), ("neg_ids", "neg_texts")):
        if len(obj.get(ids, [])) != len(obj.get(texts, [])):
            raise DataError(f"{path}:{line_no}: field '{texts}' must have one text per id in '{ids}'")
    cand_ids = obj.get("cand_ids")
    if cand_ids is not None and (not isinstance(cand_ids, list) or not all(isinstance(v, str) for v in cand_ids)):
        raise DataError(f"{path}:{line_no}: field 'cand_ids' must be a list of strings")
    if (cand_ids is None) != (obj.get("cand_scores") is None):
        raise DataError(f"{path}:{line_no}: fields 'cand_ids' and 'cand_scores' come together")
    for key, ids in (("pos_scores", "pos_ids"), ("neg_scores", "neg_ids"), ("cand_scores", "cand_ids")):
        scores = obj.get(key)
        if scores is not None and (not isinstance(scores, list) or len(scores) != len(obj.get(ids, []))):
            raise DataError(f"{path}:{line_no}: field '{key}' must be a list with one score per id in '{ids}'")
        if scores is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and -float("inf") < v < float("inf") for v in scores):
            raise DataError(f"{path}:{line_no}: field '{key}' must hold finite numbers, got {scores}")
    return TrainExample(**{k: v for k, v in obj.items()})


def read_train_set(path: str | os.PathLike, skipped: Optional[Counter] = None) -> list[TrainExample]:
    """Validate and load `train.jsonl`; rows with an empty query are skipped and counted."""
    examples = []
    for line_no, obj in read_jsonl(path):
        ex = parse_train_row(path, line_no, obj)
        if not ex.query.strip() or not any(t.strip() for t in ex.pos_texts):
            if skipped is not None:
                skipped["empty_query_or_positive"] += 1
            continue
        examples.append(ex)
    return examples


def write_train_set(path: str | os.PathLike, examples: Iterable[TrainExample]) -> int:
    return write_jsonl_atomic(path, (ex.to_row() for ex in examples))


@dataclass
class JudgedQuery:
    """A judged query: its text and the corpus rows of its relevant documents (score > 0)."""

    query_id: str
    text: str
    rows: list[int]


def judged_queries(qrels_path: Path, queries_spec: str, corpus: Corpus, skipped: Counter,
                   log: Callable[[str], None] = print) -> list[JudgedQuery]:
    """The one reader of judged pairs (training stages and mining): queries without a relevant
    judgement, without text or whose positives are all missing from the corpus are skipped and
    counted; a missing positive is counted and named once in a warning."""
    texts = load_queries(queries_spec or str(Path(qrels_path).parent.parent), skipped=skipped)
    missing_docs: list[tuple[str, str]] = []
    out = []
    for qid, judged in load_qrels(qrels_path).items():
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
        if qid not in texts:
            skipped["query_without_text"] += 1
            continue
        out.append(JudgedQuery(qid, texts[qid], rows))
    if missing_docs:
        qid, doc_id = missing_docs[0]
        warn_missing_positives(skipped, log, len(missing_docs), f"{qrels_path}: {{n}} judged positive(s) are not in "
                               f"the corpus and were skipped (first: query '{qid}', document '{doc_id}')")
    return out


def warn_missing_positives(skipped: Counter, log: Callable[[str], None], n: int, message: str) -> None:
    """Count `n` positives missing from the corpus and say so once (`message` with `{n}`)."""
    skipped["positive_not_in_corpus"] += n
    log("warning: " + message.replace("{n}", str(n)))


def pairs_from_beir(folder: str, split: str, skipped: Optional[Counter] = None) -> list[TrainExample]:
    """Training examples straight from judged (query, positive) pairs: no negatives yet."""
    folder = resolve_data_path(folder)
    corpus = load_corpus(folder)
    qrels_path = Path(folder) / "qrels" / f"{split}.tsv"
    judged = judged_queries(qrels_path, folder, corpus, skipped if skipped is not None else Counter())
    return [TrainExample(query=j.text, query_id=j.query_id, pos_ids=[corpus.ids[r] for r in j.rows],
                         pos_texts=[corpus.doc_text(r) for r in j.rows], source=f"qrels:{qrels_path}")
            for j in judged]


def read_beir_eval(folder: str, split: str) -> tuple[Corpus, dict[str, str], dict[str, dict[str, int]]]:
    """(corpus, queries, qrels) of a BEIR folder as evaluation reads it: empty documents kept (qrels
    may judge them, as in MTEB's tasks), and a judgement naming an unknown document or query is an
    error naming the file, the line and the field."""
    corpus = load_corpus(folder, keep_empty=True)
    queries = load_queries(folder)
    qrels = load_qrels(str(Path(resolve_data_path(folder)) / "qrels" / f"{split}.tsv"),
                       corpus_ids=corpus.ids, query_ids=queries)
    return corpus, queries, qrels


def check_eval_folders(specs: list[str], split: str) -> None:
    """Read every BEIR folder of `data.eval` now: the generation, mining and training stages call
    this first, so a data problem that would stop evaluation is reported in their first seconds,
    not after hours of work. MTEB task names are left to evaluation."""
    for spec in specs:
        if datasets.is_builtin(spec) or Path(spec).exists():
            read_beir_eval(spec, split)
