"""Training throughput: our train.py loop vs sentence-transformers' Trainer + MultipleNegativesRankingLoss.

Same model (bundled MiniLM), same data (SciFact train pairs + 1 BM25 hard negative), batch 32,
max length 256, on the CPU. Ours runs at its default precision (`train.precision: auto`: bf16
autocast on a CPU with native bf16, else fp32); sentence-transformers at its default (fp32) and,
for a like-for-like figure, with `bf16=True` (the same CPU autocast) when the CPU has native
bf16. They run alternately (ours, theirs, theirs bf16, ours, ...) so machine load drifts hit all;
each figure counts training-loop time only (model loading excluded), as samples per second.
Prints JSON.

    python bench/bench_train.py [--steps 8] [--rounds 2] [--data ../shared/data/scifact]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embed.runtime import choose_precision, cpu_has_native_bf16  # noqa: E402


def build_training_set(data_dir: str, out: Path) -> Path:
    """SciFact train pairs, each with the best BM25 document that is not a judged positive."""
    import bm25s
    import Stemmer

    from embed.data import load_corpus, pairs_from_beir, write_train_set

    corpus = load_corpus(data_dir)
    examples = pairs_from_beir(data_dir, "train")
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([corpus.doc_text(i) for i in range(len(corpus))], stopwords="en", stemmer=stemmer),
                    show_progress=False)
    hits, _ = retriever.retrieve(bm25s.tokenize([e.query for e in examples], stopwords="en", stemmer=stemmer,
                                                show_progress=False), k=10, show_progress=False)
    for e, row in zip(examples, hits):
        neg = next(int(i) for i in row if corpus.ids[int(i)] not in e.pos_ids)
        e.neg_ids, e.neg_texts = [corpus.ids[neg]], [corpus.doc_text(neg)]
    write_train_set(out, examples)
    return out


def ours_train_args(train_file: Path, steps: int, batch: int, run_dir: Path) -> list[str]:
    """scripts/train.py's arguments for our side (bench/profile_like_for_like.py parses the same ones)."""
    return ["--run_dir", str(run_dir), "--model.name_or_path", "minilm", "--model.max_length", "256",
            "--train.stages.0.data", str(train_file), "--train.stages.0.num_negatives", "1",
            "--train.per_device_batch_size", str(batch), "--train.max_steps", str(steps),
            "--train.save_steps", "0", "--train.report_to", "[]", "--train.logging_steps", "1000"]


def run_ours(train_file: Path, steps: int, batch: int, workdir: Path) -> float:
    run_dir = workdir / f"ours_{time.time_ns()}"
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), *ours_train_args(train_file, steps, batch, run_dir)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return summary["train_samples_per_second"]


def st_trainer(train_file: Path, steps: int, batch: int, output_dir: Path, bf16: bool = False):
    """sentence-transformers' side: SentenceTransformerTrainer + MultipleNegativesRankingLoss (no-duplicates
    sampler) on the same rows, model and batch (bench/profile_like_for_like.py builds the same one)."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import (
        MultipleNegativesRankingLoss,
    )

    from embed.data import read_train_set
    from embed.runtime import resolve_model

    rows = read_train_set(str(train_file))
    ds = Dataset.from_dict({"anchor": [r.query for r in rows], "positive": [r.pos_texts[0] for r in rows],
                            "negative": [r.neg_texts[0] for r in rows]})
    model = SentenceTransformer(resolve_model("minilm"), device="cpu")
    model.max_seq_length = 256
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-5,
        warmup_ratio=0.1, batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none",
        logging_steps=1000, use_cpu=True, dataloader_drop_last=True, seed=42, bf16=bf16)
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=MultipleNegativesRankingLoss(model))


def run_theirs(train_file: Path, steps: int, batch: int, workdir: Path, bf16: bool = False) -> float:
    code = f"""
import json, time, sys
sys.path.insert(0, {str(REPO / 'bench')!r})
from bench_train import st_trainer
trainer = st_trainer({str(train_file)!r}, {steps}, {batch}, {str(workdir / 'st')!r}, bf16={bf16})
t0 = time.time(); trainer.train(); dt = time.time() - t0
print(json.dumps({{"samples_per_second": {steps} * {batch} / dt}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["samples_per_second"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_file = build_training_set(args.data, tmp / "train.jsonl")
        native_bf16 = cpu_has_native_bf16()
        ours, theirs, theirs_bf16 = [], [], []
        for _ in range(args.rounds):
            ours.append(run_ours(train_file, args.steps, args.batch, tmp))
            theirs.append(run_theirs(train_file, args.steps, args.batch, tmp))
            if native_bf16:
                theirs_bf16.append(run_theirs(train_file, args.steps, args.batch, tmp, bf16=True))
    result = {
        "benchmark": "train_throughput", "model": "all-MiniLM-L6-v2 (bundled)", "batch": args.batch,
        "max_length": 256, "steps_per_run": args.steps, "rounds": args.rounds, "device": "cpu",
        "cpu_count": os.cpu_count(), "ours_precision": choose_precision("auto")[1],
        "ours_samples_per_s": [round(x, 2) for x in ours],
        "sentence_transformers_fp32_samples_per_s": [round(x, 2) for x in theirs],
        "ratio_ours_over_st": round(statistics.median(ours) / statistics.median(theirs), 3),
    }
    if theirs_bf16:
        result["sentence_transformers_bf16_samples_per_s"] = [round(x, 2) for x in theirs_bf16]
        result["ratio_ours_over_st_bf16"] = round(statistics.median(ours) / statistics.median(theirs_bf16), 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
