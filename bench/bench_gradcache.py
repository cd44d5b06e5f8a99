"""Time per training step: the plain InfoNCE loss vs GradCache, ours and sentence-transformers'.

    python bench/bench_gradcache.py                                   # CPU default, < 1 min
    python bench/bench_gradcache.py --hidden 768 --layers 12 --heads 12 --batch 256 \\
        --chunk 32 64 256 --doc-len 256 --precision bf16              # bge-base shape on a GPU

All four methods run the same random-init BERT (wrapped as a SentenceTransformer so that
sentence-transformers' MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss can
run it too) on the same random token ids, in train mode, alternating step by step. A step is
forward + loss + backward, gradients zeroed; no optimizer. Prints one JSON object: median
seconds per step, GradCache's overhead (its time / the plain loss's) per chunk size for ours and
for sentence-transformers', and peak GPU memory. The extra no-grad forward alone costs about
1.33x; small chunks add the cost of running the model in many small pieces.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from embed.training.loss import GradCache, InfoNCELoss

VOCAB = 1000


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="queries per step")
    parser.add_argument("--group", type=int, default=2, help="documents per query: 1 positive + hard negatives")
    parser.add_argument("--chunk", type=int, nargs="+", default=[8], help="GradCache chunk (mini-batch) sizes")
    parser.add_argument("--query-len", type=int, default=32)
    parser.add_argument("--doc-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method, after one warm-up")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steady on a shared machine)")
    parser.add_argument("--no-st", action="store_true", help="skip sentence-transformers' losses")
    return parser.parse_args()


def build_model(args, folder):
    """A random BERT saved with a synthetic vocabulary, loaded as a SentenceTransformer
    (transformer -> mean pooling -> normalise): nothing is downloaded."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]))
    BertTokenizerFast(vocab_file).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                        max_position_embeddings=max(512, args.doc_len))
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    transformer = models.Transformer(folder, max_seq_length=args.doc_len)
    modules = [transformer, models.Pooling(args.hidden, "mean"), models.Normalize()]
    return SentenceTransformer(modules=modules, device=args.device).train()


def random_features(rows, length, device):
    ids = torch.randint(5, VOCAB, (rows, length), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main():
    args = parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    # ---- model and batch ----------------------------------------------------------------------
    folder = tempfile.mkdtemp(prefix="bench_gradcache_")
    model = build_model(args, folder)
    batch, group = args.batch, args.group
    queries = random_features(batch, args.query_len, device)                 # B rows
    docs = random_features(batch * group, args.doc_len, device)              # B*G rows, query-major
    doc_keys = torch.arange(batch * group, device=device).view(batch, group)
    query_pos_keys = torch.full((batch, 0), -1, dtype=torch.long, device=device)
    loss_fn = InfoNCELoss(temperature=0.05)

    def encode(features):
        return model(features)["sentence_embedding"]

    # ---- the methods --------------------------------------------------------------------------
    def ours_plain():
        query_emb = encode(dict(queries))
        doc_emb = encode(dict(docs)).view(batch, group, -1)
        loss_fn(query_emb, doc_emb, doc_keys, query_pos_keys).backward()

    methods = {"ours_plain": ours_plain}
    for chunk in args.chunk:
        gradcache = GradCache(loss_fn, chunk)
        methods[f"ours_gradcache_{chunk}"] = \
            lambda gc=gradcache: gc(encode, queries, docs, doc_keys, query_pos_keys)
    if not args.no_st:
        from sentence_transformers import losses

        # sentence-transformers wants one feature dict per column: anchors, positives, negatives.
        columns = [queries] + [{k: v.view(batch, group, -1)[:, g] for k, v in docs.items()} for g in range(group)]
        st_plain = losses.MultipleNegativesRankingLoss(model, scale=20.0)
        methods["st_plain"] = lambda: st_plain([dict(c) for c in columns], None).backward()
        for chunk in args.chunk:
            st_cached = losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk)
            methods[f"st_cached_{chunk}"] = \
                lambda loss=st_cached: loss([dict(c) for c in columns], None).backward()

    # ---- timing: one warm-up, then the methods alternate step by step -------------------------
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    times = {name: [] for name in methods}
    peak_mb = {}
    for step in range(args.steps + 1):
        for name, run in methods.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with autocast:
                run()
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak_mb[name] = round(torch.cuda.max_memory_allocated() / 2**20)
            if step > 0:
                times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)

    # ---- report -------------------------------------------------------------------------------
    seconds = {name: statistics.median(t) for name, t in times.items()}
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k not in ("no_st", "threads")},
        "seconds_per_step": {name: round(s, 4) for name, s in seconds.items()},
        "ours_gradcache_overhead": {c: round(seconds[f"ours_gradcache_{c}"] / seconds["ours_plain"], 3)
                                    for c in args.chunk},
    }
    if "st_plain" in seconds:
        report["st_cached_overhead"] = {c: round(seconds[f"st_cached_{c}"] / seconds["st_plain"], 3)
                                        for c in args.chunk}
    if peak_mb:
        report["peak_memory_mb"] = peak_mb
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
