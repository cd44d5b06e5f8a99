"""Benchmark of scripts/mine_faiss.py against sentence-transformers' `mine_hard_negatives`; prints JSON.

Usage:
    python bench/bench_mine.py [--data ../shared/data/scifact] [--num_negatives 4] [--relative_margin 0.05] \
        [--repeats 1] [--out bench/results/mine.json]
    python bench/bench_mine.py --scale [--scale_docs 1000000] [--scale_queries 1000] [--dim 384] \
        [--scale_index IVF1024,SQfp16 --scale_search_params nprobe=32]
    python bench/bench_mine.py --train [--seeds 42 43 44] [--workdir DIR]
                                            # + SciFact test nDCG@10 after training on each mined set
    python bench/bench_mine.py --train --reuse_mined --workdir DIR --seeds 42 43 44
                                            # retrain on the sets an earlier --train run mined into DIR

Default mode, on SciFact's judged train pairs (qrels/train.tsv) with the bundled MiniLM as teacher,
the same number of negatives, relative margin, encode batch size and full corpus for both:
  ours  = scripts/mine_faiss.py with recipes/scifact-mine-minilm-cpu.yaml (BM25 + dense, cold cache)
  st    = sentence_transformers.util.mine_hard_negatives(..., use_faiss=True, sampling_strategy="top")
  st_bf16 = the same under CPU bf16 autocast (only on a CPU with native bf16, where ours encodes in
          bf16 by default: mine.encode_precision auto), for a like-for-like ratio
run alternately (ours, st, ours, st, ...) in fresh processes, then `ours` again on the warm
embedding cache. Each process times its own work after imports (reading data, loading the model,
encoding, mining, writing the output), and reports its peak RSS.
`--scale`: 1,000 queries against 1,000,000 random unit 384-dim vectors stored as an fp16 memmap
(exact flat search, the positive-aware rules), reporting queries/s and the mining process's peak RSS.
`--train` trains recipes/scifact-mine-minilm-cpu.yaml on each mined set (scripts/train.py under
accelerate, then scripts/eval_mteb.py) and reports nDCG@10 of each, per seed and the mean: about 40 min on 2 CPU cores for one seed, +20 min per
extra seed. A (set, seed) already evaluated in --workdir is read back, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "scifact-mine-minilm-cpu.yaml"


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)  # Linux: KiB


class Clock:
    """Wall and CPU seconds (user + system, all threads) of this process since start.

    On a CPU shared with other jobs, wall time swings with their load; CPU time counts the
    work done and is reported beside it.
    """

    def __init__(self):
        self.wall, self.cpu, self.load = time.perf_counter(), self._cpu(), os.getloadavg()[0]

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def stop(self) -> dict:
        return {"seconds": time.perf_counter() - self.wall, "cpu_seconds": round(self._cpu() - self.cpu, 2),
                "load_average_1m": [round(self.load, 2), round(os.getloadavg()[0], 2)], "peak_rss_gb": peak_rss_gb()}


# ---------------------------------------------------------------- children: one measured job per process
def child_ours(args, overrides: tuple[str, ...] = ()) -> dict:
    """scripts/mine_faiss.py in this process; `overrides` are extra recipe keys (`--mine.encode_precision fp32`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mine_faiss", ROOT / "scripts" / "mine_faiss.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run_dir = Path(args.workdir) / args.name
    sys.argv = ["mine_faiss.py", str(RECIPE), "--run_dir", str(run_dir), "--data.corpus", args.data,
                "--mine.cache_dir", str(Path(args.workdir) / "cache"), "--mine.num_negatives", str(args.num_negatives),
                "--mine.relative_margin", str(args.relative_margin), "--mine.encode_batch_size", str(args.encode_batch_size),
                *overrides]
    clock = Clock()
    script.main()
    measured = clock.stop()
    summary = json.loads((run_dir / "mine_summary.json").read_text())
    return {**measured, "train_jsonl": str(run_dir / "train.jsonl"),
            "rows": summary["queries_mined"], "short": summary["queries_short_of_negatives"],
            "cache_hit": summary["embedding_cache"]["hit"], "timings_s": summary["timings_s"],
            **judged_positive_leaks(run_dir / "train.jsonl", args.data)}


def child_st_bf16(args) -> dict:
    """sentence-transformers under the same CPU bf16 autocast our miner uses by default there."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        return child_st(args)


def child_st(args) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from embed.data import (
        TrainExample,
        load_corpus,
        load_qrels,
        load_queries,
        write_train_set,
    )
    from embed.runtime import resolve_model

    clock = Clock()
    corpus = load_corpus(args.data)
    texts = [corpus.doc_text(i) for i in range(len(corpus))]
    queries = load_queries(args.data)
    pairs = [(queries[q], texts[corpus.index[d]]) for q, judged in load_qrels(Path(args.data) / "qrels" / "train.tsv").items()
             for d, s in judged.items() if s > 0 and q in queries and d in corpus.index]
    model = SentenceTransformer(resolve_model("minilm"), device="cpu")
    mined = mine_hard_negatives(Dataset.from_dict({"query": [q for q, _ in pairs], "positive": [p for _, p in pairs]}),
                                model, corpus=texts, relative_margin=args.relative_margin,
                                num_negatives=args.num_negatives, sampling_strategy="top", batch_size=args.encode_batch_size,
                                use_faiss=True, output_format="n-tuple", verbose=False)
    # the same training-set schema as ours, so both train through the same recipe (--train)
    id_of = {t: corpus.ids[i] for i, t in reversed(list(enumerate(texts)))}
    neg_cols = [c for c in mined.column_names if c.startswith("negative")]
    examples = [TrainExample(query=row["query"], pos_ids=[id_of[row["positive"]]], pos_texts=[row["positive"]],
                             neg_ids=[id_of[row[c]] for c in neg_cols], neg_texts=[row[c] for c in neg_cols],
                             source="sentence-transformers mine_hard_negatives") for row in mined]
    out = Path(args.workdir) / args.name / "train.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_train_set(out, examples)
    return {**clock.stop(), "train_jsonl": str(out), "rows": len(examples),
            "input_pairs": len(pairs), **judged_positive_leaks(out, args.data)}


def judged_positive_leaks(train_jsonl: Path, data: str) -> dict:
    """Negatives that are judged positives of their query (by query text), and copies of a positive's text."""
    from embed.data import load_qrels, load_queries
    from embed.io import read_jsonl

    queries = load_queries(data)
    judged_by_text: dict[str, set] = {}
    for q, judged in load_qrels(Path(data) / "qrels" / "train.tsv").items():
        if q in queries:
            judged_by_text.setdefault(queries[q], set()).update(d for d, s in judged.items() if s > 0)
    leaks = copies = 0
    for _, row in read_jsonl(train_jsonl):
        leaks += len(set(row["neg_ids"]) & judged_by_text.get(row["query"], set()))
        pos = {" ".join(t.split()).casefold() for t in row["pos_texts"]}
        copies += sum(" ".join(t.split()).casefold() in pos for t in row["neg_texts"])
    return {"negatives_that_are_judged_positives": leaks, "negatives_copying_a_positive_text": copies}


def child_scale_data(args) -> dict:
    """1M random unit vectors written chunk by chunk into an fp16 .npy (never whole in RAM)."""
    import numpy as np

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    emb = np.lib.format.open_memmap(Path(args.workdir) / "scale.npy", mode="w+", dtype=np.float16,
                                    shape=(args.scale_docs, args.dim))
    for lo in range(0, args.scale_docs, 65536):
        x = rng.standard_normal((min(65536, args.scale_docs - lo), args.dim)).astype(np.float32)
        emb[lo:lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    emb.flush()
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb()}


def child_scale(args) -> dict:
    """Mine 1,000 queries against the memmapped corpus: flat FAISS search + the positive-aware rules."""
    import numpy as np

    from embed.mining.inputs import MiningQuery
    from embed.mining.miner import NegativeMiner
    from embed.mining.negative_filters import NegativeRules
    from embed.retrieval.dense_index import DenseIndex

    emb = np.load(Path(args.workdir) / "scale.npy", mmap_mode="r")
    rng = np.random.default_rng(1)
    # each query is a noisy copy of its positive, so positive scores (~0.9) make the margin rule bite
    positives = rng.choice(len(emb), args.scale_queries, replace=False)
    q = np.asarray(emb[np.sort(positives)], dtype=np.float32)[np.argsort(np.argsort(positives))]
    q += 0.02 * rng.standard_normal(q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    queries = [MiningQuery(f"q{i}", "", [int(p)]) for i, p in enumerate(positives)]
    start = time.perf_counter()
    dense = DenseIndex(emb, index=args.scale_index, search_params=args.scale_search_params)
    built = time.perf_counter() - start
    miner = NegativeMiner(emb, NegativeRules(num_negatives=args.num_negatives, relative_margin=args.relative_margin),
                          depth=100, rrf_k=60, seed=0, dense=dense)
    mined = []
    for lo in range(0, len(queries), 1024):
        mined += miner.mine(queries[lo:lo + 1024], q[lo:lo + 1024])
    seconds = time.perf_counter() - start
    short = sum(len(m.selection.indices) < args.num_negatives for m in mined)
    leaks = sum(bool(set(m.selection.indices) & set(m.query.positive_rows)) for m in mined)
    return {"seconds": seconds, "queries_per_s": round(len(queries) / (seconds - built), 2), "index_build_seconds": round(built, 2),
            "peak_rss_gb": peak_rss_gb(),
            "corpus": list(emb.shape), "corpus_dtype": str(emb.dtype), "queries": len(queries), "short": short,
            "negatives_that_are_positives": leaks, "seconds_by_step": {k: round(v, 3) for k, v in miner.seconds.items()}}


CHILDREN = {"ours": child_ours, "st": child_st, "st_bf16": child_st_bf16, "scale_data": child_scale_data,
            "scale": child_scale}


# ---------------------------------------------------------------- parent: orchestration
def spawn(kind: str, name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--_child", kind, "--_name", name, "--workdir", args.workdir, "--data", args.data,
           "--num_negatives", str(args.num_negatives), "--relative_margin", str(args.relative_margin),
           "--encode_batch_size", str(args.encode_batch_size), "--scale_docs", str(args.scale_docs),
           "--scale_queries", str(args.scale_queries), "--dim", str(args.dim), "--scale_index", args.scale_index,
           "--scale_search_params", args.scale_search_params]
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"[bench] {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[bench] {name}: {result['seconds']:.1f}s wall, {result.get('cpu_seconds', '-')} CPU s, "
          f"peak RSS {result['peak_rss_gb']} GB", file=sys.stderr, flush=True)
    return result


def train_and_eval(train_jsonl: str, name: str, seed: int, args) -> float:
    """The same recipe trained on one mined set under one seed, then SciFact test nDCG@10 (scripts/train.py +
    eval_mteb.py). A (set, seed) already evaluated in this workdir is read back, so an interrupted run resumes."""
    run_dir = Path(args.workdir) / f"train_{name}_seed{seed}"
    summary = run_dir / "eval_summary.json"
    if not summary.exists():
        common = [str(RECIPE), "--run_dir", str(run_dir), "--seed", str(seed), "--data.corpus", args.data,
                  "--train.stages.0.data.0", train_jsonl]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        print(f"[bench] training on {name}'s set, seed {seed} ...", file=sys.stderr, flush=True)
        subprocess.run(["accelerate", "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
                        str(ROOT / "scripts" / "train.py"), *common], cwd=ROOT, env=env, check=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_mteb.py"), *common], cwd=ROOT, env=env,
                       check=True)
    (scores,) = json.loads(summary.read_text())["ndcg_at_10"].values()  # the recipe evaluates one dataset
    return round(100 * scores["trained"], 2)


def compare_training(mined: dict[str, str], args) -> dict:
    """nDCG@10 after training on each mined set, per seed and averaged: one seed's gap is within seed noise."""
    scores = {name: {seed: train_and_eval(path, name, seed, args) for seed in args.seeds}
              for name, path in mined.items()}
    return {"seeds": args.seeds,
            "per_seed": {name: [by_seed[s] for s in args.seeds] for name, by_seed in scores.items()},
            "mean": {name: round(statistics.mean(by_seed.values()), 2) for name, by_seed in scores.items()},
            "stdev": {name: round(statistics.stdev(by_seed.values()), 2) if len(by_seed) > 1 else None
                      for name, by_seed in scores.items()}}


def reused_mined_sets(args) -> dict:
    """`--reuse_mined`: the sets an earlier run mined into this workdir, trained on without timing anything again."""
    mined = {"ours": Path(args.workdir) / "ours_cold_0" / "train.jsonl", "st": Path(args.workdir) / "st_0" / "train.jsonl"}
    missing = [str(path) for path in mined.values() if not path.exists()]
    if missing:
        raise SystemExit(f"[bench] --reuse_mined: no mined set at {', '.join(missing)}; "
                         "run once with --train --workdir DIR first")
    return {"mode": "train on reused mined sets", "workdir": args.workdir,
            "ndcg_at_10_after_training": compare_training({k: str(v) for k, v in mined.items()}, args)}


def bench_scifact(args) -> dict:
    import torch

    from embed.runtime import cpu_has_native_bf16, encode_autocast

    ours, st, st_bf16 = [], [], []
    for i in range(args.repeats):  # alternate, so drifting machine load hits both alike
        if i:
            import shutil

            shutil.rmtree(Path(args.workdir) / "cache", ignore_errors=True)  # every "ours" cold run starts cold
        ours.append(spawn("ours", f"ours_cold_{i}", args))
        st.append(spawn("st", f"st_{i}", args))
        if cpu_has_native_bf16():  # like for like: ours encodes under bf16 autocast by default there
            st_bf16.append(spawn("st_bf16", f"st_bf16_{i}", args))
    cached = spawn("ours", "ours_cached", args)
    t_ours = statistics.median(r["seconds"] for r in ours)
    t_st = statistics.median(r["seconds"] for r in st)
    cpu_ours = statistics.median(r["cpu_seconds"] for r in ours)
    cpu_st = statistics.median(r["cpu_seconds"] for r in st)
    result = {
        "data": args.data, "teacher": "minilm (bundled all-MiniLM-L6-v2)", "num_negatives": args.num_negatives,
        "relative_margin": args.relative_margin, "encode_batch_size": args.encode_batch_size,
        "cpu_threads": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "ours_seconds": round(t_ours, 2), "st_seconds": round(t_st, 2),
        "ratio_st_over_ours": round(t_st / t_ours, 3),
        "ours_cpu_seconds": cpu_ours, "st_cpu_seconds": cpu_st, "cpu_ratio_st_over_ours": round(cpu_st / cpu_ours, 3),
        "ratio_st_over_ours_per_pair": [round(b["seconds"] / a["seconds"], 3) for a, b in zip(ours, st)],
        "ours_cached_seconds": round(cached["seconds"], 2), "cached_speedup": round(t_ours / cached["seconds"], 2),
        "ours_encode_precision": encode_autocast(torch.device("cpu"))[1],
        "runs": {"ours": ours, "st": st, "st_bf16": st_bf16, "ours_cached": cached},
    }
    if st_bf16:
        t_st_bf16 = statistics.median(r["seconds"] for r in st_bf16)
        result.update(st_bf16_seconds=round(t_st_bf16, 2), ratio_st_bf16_over_ours=round(t_st_bf16 / t_ours, 3))
    if args.train:
        result["ndcg_at_10_after_training"] = compare_training(
            {"ours": ours[0]["train_jsonl"], "st": st[0]["train_jsonl"]}, args)
    return result


def bench_scale(args) -> dict:
    data = spawn("scale_data", "scale_data", args)
    mined = spawn("scale", "scale_mine", args)
    return {"mode": "scale", "num_negatives": args.num_negatives, "relative_margin": args.relative_margin,
            "index": args.scale_index, "search_params": args.scale_search_params,
            "corpus_build_seconds": round(data["seconds"], 2),
            "mine_seconds": round(mined["seconds"], 2), **{k: v for k, v in mined.items() if k != "seconds"},
            "peak_rss_limit_gb": 4.0, "within_limit": mined["peak_rss_gb"] <= 4.0,
            "cpu_threads": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    p.add_argument("--num_negatives", type=int, default=4)
    p.add_argument("--relative_margin", type=float, default=0.05)
    p.add_argument("--encode_batch_size", type=int, default=32, help="both miners (sentence-transformers' default)")
    p.add_argument("--repeats", type=int, default=1, help="alternating cold runs of each; medians are reported")
    p.add_argument("--scale", action="store_true")
    p.add_argument("--scale_docs", type=int, default=1_000_000)
    p.add_argument("--scale_queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--scale_index", default="flat", help="'flat' (exact) or a faiss factory string, e.g. IVF1024,SQfp16")
    p.add_argument("--scale_search_params", default="", help="e.g. nprobe=32 for an IVF index")
    p.add_argument("--train", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="--train: one training run per seed and set")
    p.add_argument("--reuse_mined", action="store_true",
                   help="--train only: train on the sets an earlier run mined into --workdir, timing nothing")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--_child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--_name", default="", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._child:
        args.name = args._name
        print(json.dumps(CHILDREN[args._child](args)))
        return
    if args.reuse_mined and not (args.train and args.workdir):
        p.error("--reuse_mined needs --train and the --workdir of an earlier --train run")
    with tempfile.TemporaryDirectory(prefix="bench_mine_") as tmp:
        args.workdir = args.workdir or tmp
        if args.reuse_mined:
            result = reused_mined_sets(args)
        else:
            result = bench_scale(args) if args.scale else bench_scifact(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
