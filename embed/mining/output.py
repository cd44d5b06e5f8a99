"""What mining writes: the resumable `train.jsonl`, the summary and the score plot."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from embed.cli import Log, log_line
from embed.data import Corpus, TrainExample, source_kind
from embed.io import JsonlAppender, read_jsonl, save_figure, write_json_atomic
from embed.mining.miner import MinedQuery
from embed.mining.negative_filters import RULES, NegativeRules


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
        cand_ids=[corpus.ids[r] for r, _ in mined.candidates] if mined.candidates else None,
        cand_scores=[round(s, 6) for _, s in mined.candidates] if mined.candidates else None,
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
def summarise(train_path: Path, stats: list[dict], num_negatives: int, skipped: Counter) -> dict:
    """Counts and mean teacher scores for mine_summary.json."""
    per_query, per_source = Counter(), Counter()
    pos_scores, neg_scores, judged_leaks = [], [], 0
    for _, row in read_jsonl(train_path):
        per_query[len(row["neg_ids"])] += 1
        per_source[source_kind(row.get("source"))] += 1
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
    return summary


def _mean(values: list[float]) -> Optional[float]:
    return round(float(np.mean(values)), 4) if values else None


def plot_margin_scatter(path: Path, rows: Iterable[dict], rules: NegativeRules, title: str) -> None:
    """Each kept negative against its positive: x = the teacher's score of the query's least similar
    positive (what the margin rules compare with), y = the negative's score.

    The margin rules allow a negative only below the solid line (the stricter of the relative and
    absolute ceilings), so every point should sit under it; the dashed diagonal is where a negative
    would score as high as its positive. Points close under the line are the hard negatives the
    rules exist to keep; a cloud far below it means the negatives are easy.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        if not row.get("pos_scores") or not row.get("neg_scores"):
            continue  # no positive score (or no negatives): nothing to compare
        xs, ys = points.setdefault(source_kind(row.get("source")), ([], []))
        positive = min(row["pos_scores"])
        xs.extend([positive] * len(row["neg_scores"]))
        ys.extend(row["neg_scores"])
    fig, ax = plt.subplots(figsize=(6, 5))
    for kind, (xs, ys) in sorted(points.items()):
        ax.scatter(xs, ys, s=14, alpha=0.6, linewidths=0, label=f"{kind} ({len(ys)} negatives)")
    positives = [x for xs, _ in points.values() for x in xs]
    grid = np.linspace(min(positives, default=0.0), max(positives, default=1.0), 200)  # the x range
    ax.plot(grid, grid, "--", color="0.6", linewidth=1, label="negative = positive")
    ceiling = np.array([min(rules.score_ceiling(float(x))) for x in grid])
    if np.isfinite(ceiling).all():
        ax.plot(grid, ceiling, color="C3", linewidth=1.5, label="margin rule: negatives stay below")
    ax.set_xlabel("teacher score of the positive (cosine)")
    ax.set_ylabel("teacher score of the kept negative")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
