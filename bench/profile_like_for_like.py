"""Where the time goes, like for like: our training step and miner vs sentence-transformers', profiled.

Issue 19 asks for >= 1.3x over sentence-transformers at equal precision, model and data, or a
profile showing that what is left is the same kernels on both sides. This runs each side in a
fresh process under `torch.profiler` (CPU activities), both in fp32, with the bundled
all-MiniLM-L6-v2 and SciFact, set up exactly as bench_train.py / bench_mine.py set them up:

  train, ours   scripts/train.py's loop in-process (its recipe keys from bench_train.ours_train_args
                plus `train.precision: fp32`; the same load_from_config, stage_batches, _train_step,
                AdamW over optimizer_groups, accelerate's clip_grad_norm_ and scheduler)
  train, theirs bench_train.st_trainer: SentenceTransformerTrainer + MultipleNegativesRankingLoss
                Both: 1 warm-up step unprofiled, then --steps profiled steps of --batch rows
                (query, positive, BM25 negative), data loading and tokenisation included.
  mine, ours    bench_mine.child_ours (scripts/mine_faiss.py, BM25 + dense, cold embedding cache,
                `mine.encode_precision: fp32`) on a SciFact subset of --mine_queries judged train
                queries and --mine_docs documents (their positives + a seeded sample of the rest)
  mine, theirs  bench_mine.child_st (`mine_hard_negatives`, use_faiss) on the same subset
                Both profiled whole, after imports: reading, model loading, encoding, search, writing.

Per side it prints the profiled wall and CPU seconds; self CPU time of aten ops by family (matmul,
attention (bmm, softmax, sdpa), elementwise+norm, optimizer, copy/layout, other aten) as seconds
and shares of the wall; the time outside any aten op (wall minus their self time: Python, tokenisation, collation,
data loading, FAISS and BM25, which are not aten ops); the inclusive time of named regions
(tokenise, data, encode, dense_search, bm25, optimizer, ...); the top 15 ops by self time; and
the padded vs real tokens of every encoder forward. Shares, not seconds, are the result on a
shared machine.

    python bench/profile_like_for_like.py [--part train|mine|both] [--steps 4] [--batch 32] \
        [--mine_queries 200] [--mine_docs 400] [--rounds 1] [--data ../shared/data/scifact] [--out FILE]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

# ---------------------------------------------------------------- kernel families (aten op names, no prefix)
# bmm is attention: in a BERT encoder only the attention products (QK^T, PV and their backward) are
# batched matmuls (the linear layers are addmm/mm), and on the CPU training path sdpa runs its math
# fallback (dropout > 0), which is bmm + softmax + dropout.
MATMUL = {"addmm", "mm", "linear", "matmul", "_addmm_activation", "einsum"}
ATTENTION = {"bmm", "baddbmm", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_attention_math",
             "softmax", "_softmax", "_softmax_backward_data", "_safe_softmax", "log_softmax", "_log_softmax",
             "_log_softmax_backward_data"}
ELEMENTWISE_NORM = {"gelu", "gelu_backward", "layer_norm", "native_layer_norm", "native_layer_norm_backward",
                    "add", "add_", "mul", "mul_", "div", "div_", "sub", "sub_", "rsub", "neg", "tanh", "exp", "log",
                    "pow", "sqrt", "rsqrt", "dropout", "native_dropout", "native_dropout_backward", "bernoulli_",
                    "where", "masked_fill", "masked_fill_", "sum", "mean", "norm", "linalg_vector_norm", "clamp",
                    "clamp_min", "maximum", "threshold_backward", "eq", "ne", "any", "nll_loss_forward",
                    "nll_loss_backward", "nll_loss", "cross_entropy_loss", "normalize", "addcmul_", "addcdiv_", "lerp_"}
COPY_LAYOUT = {"copy_", "clone", "contiguous", "to", "_to_copy", "cat", "stack", "empty", "empty_like", "zeros",
               "zeros_like", "ones", "fill_", "zero_", "view", "reshape", "_reshape_alias", "transpose", "permute",
               "expand", "slice", "select", "index_select", "embedding", "embedding_backward",
               "embedding_dense_backward", "index_add_", "_unsafe_view", "as_strided", "unsqueeze", "squeeze",
               "resize_", "detach", "t", "set_", "split", "narrow", "_local_scalar_dense", "item", "from_numpy",
               "lift_fresh", "new_zeros", "new_empty", "scatter", "gather", "arange", "tensor"}
# Regions whose aten ops all count as the optimizer's: AdamW (torch names it Optimizer.step#AdamW.step),
# zero_grad, gradient clipping (annotated below on accelerate's clip_grad_norm_, which both sides call).
OPTIMIZER_REGIONS = ("Optimizer.step", "Optimizer.zero_grad", "clip_grad_norm")
REGIONS = ["load_model", "data", "tokenise", "forward_backward", "clip_grad_norm", "Optimizer.step",
           "scheduler", "encode", "dense_search", "bm25", "plot"]


def family(name: str) -> str:
    op = name[len("aten::"):]
    if op in MATMUL:
        return "matmul"
    if op in ATTENTION:
        return "attention"
    if op in ELEMENTWISE_NORM:
        return "elementwise_norm"
    if op.startswith(("_foreach_", "_fused_adam")):
        return "optimizer"
    if op in COPY_LAYOUT:
        return "copy_layout"
    return "other_aten"


# ---------------------------------------------------------------- probes: named regions and padding
def annotate(owner, attr: str, label: str) -> None:
    """Wrap owner.attr so each call is a `record_function(label)` region in the profile."""
    from torch.profiler import record_function

    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)
    setattr(owner, attr, wrapper)


class Padding:
    """Rows, padded length and real tokens of every BERT forward while `on` (both sides run transformers'
    BertModel: ours as EmbeddingModel.backbone, theirs inside the Transformer module)."""

    def __init__(self):
        from transformers.models.bert.modeling_bert import BertModel

        self.on, self.forwards = False, []
        original = BertModel.forward
        probe = self

        @functools.wraps(original)
        def forward(module, *args, **kwargs):
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            if probe.on and mask is not None:
                probe.forwards.append((mask.shape[0], mask.shape[1], int(mask.sum())))
            return original(module, *args, **kwargs)
        BertModel.forward = forward

    def summary(self, steps: int | None = None) -> dict:
        rows = sum(r for r, _, _ in self.forwards)
        padded = sum(r * t for r, t, _ in self.forwards)
        real = sum(n for _, _, n in self.forwards)
        out = {"forwards": len(self.forwards), "rows": rows, "padded_tokens": padded, "real_tokens": real,
               "padding_share": round(1 - real / padded, 4) if padded else None,
               "attention_cost_rows_x_len2": sum(r * t * t for r, t, _ in self.forwards)}
        if steps:
            out["per_step"] = [[r, t, n] for r, t, n in self.forwards[:len(self.forwards) // steps]]
            out["per_step_legend"] = "first profiled step: [rows, padded length, real tokens] per forward"
        return out


def install_common_probes() -> Padding:
    from accelerate import Accelerator
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    annotate(PreTrainedTokenizerBase, "__call__", "tokenise")  # both sides' fast tokenizer
    annotate(Accelerator, "clip_grad_norm_", "clip_grad_norm")  # both trainers clip through accelerate
    return Padding()


class Stopwatch:
    """Wall and CPU seconds (user + system, every thread of this process) of the profiled window. On a
    shared machine wall time follows the other jobs' load; CPU time follows the work done."""

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    def stop(self) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu


def profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False)


# ---------------------------------------------------------------- summary of one profile
def summarise(prof, clock: Stopwatch, padding: Padding, steps: int | None = None) -> dict:
    events, wall = prof.events(), clock.wall
    in_optimizer: dict[int, bool] = {}

    def under_optimizer(evt) -> bool:
        chain, parent, found = [], evt.cpu_parent, False
        while parent is not None:
            if id(parent) in in_optimizer:
                found = in_optimizer[id(parent)]
                break
            chain.append(parent)
            if parent.name.startswith(OPTIMIZER_REGIONS):
                found = True
                break
            parent = parent.cpu_parent
        for p in chain:
            in_optimizer[id(p)] = found
        return found

    def has_ancestor_named(evt, name: str) -> bool:
        parent = evt.cpu_parent
        while parent is not None:
            if parent.name == name:
                return True
            parent = parent.cpu_parent
        return False

    by_family, by_op, regions, threads = Counter(), Counter(), Counter(), set()
    calls = Counter()
    for evt in events:
        self_s = evt.self_cpu_time_total / 1e6
        base = evt.name.split("#")[0] if evt.name.startswith("Optimizer.") else evt.name
        if base in REGIONS and not has_ancestor_named(evt, evt.name):
            regions[base] += evt.cpu_time_total / 1e6
        if not evt.name.startswith("aten::"):
            by_op[evt.name] += self_s
            calls[evt.name] += 1
            continue
        threads.add(evt.thread)
        fam = "optimizer" if under_optimizer(evt) else family(evt.name)
        by_family[fam] += self_s
        by_op[evt.name] += self_s
        calls[evt.name] += 1
    op_seconds = sum(by_family.values())
    outside = wall - op_seconds
    families = ["matmul", "attention", "elementwise_norm", "optimizer", "copy_layout", "other_aten"]
    return {
        "profiled_seconds": round(wall, 2),
        "cpu_seconds": round(clock.cpu, 2),
        "aten_self_seconds": round(op_seconds, 2),
        "outside_aten_ops_seconds": round(outside, 2),
        "share_of_wall": {**{f: round(by_family[f] / wall, 4) for f in families},
                          "outside_aten_ops": round(outside / wall, 4)},
        "share_of_aten_time": {f: round(by_family[f] / op_seconds, 4) for f in families},
        "seconds_by_family": {f: round(by_family[f], 2) for f in families},
        "same_encoder_kernels_share_of_wall": round(
            (by_family["matmul"] + by_family["attention"] + by_family["elementwise_norm"]) / wall, 4),
        "regions_inclusive_seconds": {k: round(v, 2) for k, v in regions.items()},
        "top15_self_cpu": [{"op": name, "family": family(name) if name.startswith("aten::") else "not an aten op",
                            "seconds": round(s, 3), "share_of_wall": round(s / wall, 4), "calls": calls[name]}
                           for name, s in by_op.most_common(15)],
        "aten_threads": len(threads),
        "padding": padding.summary(steps),
    }


# ---------------------------------------------------------------- children: one side per process
def child_train_ours(args) -> dict:
    import importlib.util

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from bench_train import ours_train_args
    from torch.profiler import record_function
    from transformers import get_scheduler

    from embed.config import parse_recipe
    from embed.modeling.model import load_from_config
    from embed.training.stages import (
        freeze_unused_parameters,
        load_stage_data,
        optimizer_groups,
        plan_stages,
        stage_batches,
        stage_loss,
    )

    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    padding = install_common_probes()

    total = args.warmup + args.steps
    cfg = parse_recipe("train", ours_train_args(Path(args.train_file), total, args.batch, Path(args.workdir) / "ours_train")
                       + ["--train.precision", "fp32"])
    tc, stage = cfg.train, cfg.train.stages[0]
    accelerator = Accelerator(mixed_precision="no", cpu=True, step_scheduler_with_optimizer=False)
    set_seed(cfg.seed)
    with record_function("load_model"):
        raw_model = load_from_config(cfg.model)
    freeze_unused_parameters(raw_model)
    skipped = Counter()
    (plan,) = plan_stages(tc.stages, [load_stage_data(stage, cfg.run_dir, skipped)], tc.per_device_batch_size,
                          cfg.seed, tc.max_steps, skipped)
    optimizer = torch.optim.AdamW(optimizer_groups(raw_model, stage.learning_rate, tc.weight_decay,
                                                   cfg.model.latent_attention.learning_rate), lr=stage.learning_rate)
    scheduler = get_scheduler(tc.scheduler if tc.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(tc.warmup_ratio * plan.steps), num_training_steps=plan.steps)
    model, optimizer, scheduler = accelerator.prepare(raw_model, optimizer, scheduler)
    loss_fn = stage_loss(stage, tc.temperature, tc.distill_temperature, cfg.model.matryoshka_dims)
    model.train()
    batches = stage_batches(plan, tc.per_device_batch_size, cfg.seed)

    def step():
        with record_function("data"):
            groups = next(batches)
        with record_function("forward_backward"):
            train_script._train_step(accelerator, model, raw_model, loss_fn, groups, stage, tc.gradcache_chunk_size)
        accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        optimizer.step()
        with record_function("scheduler"):
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    padding.on, clock = True, Stopwatch()
    with profiler() as prof:
        clock.start()
        for _ in range(args.steps):
            step()
        clock.stop()
    padding.on = False
    return {"profiled": f"scripts/train.py's loop in-process ({args.steps} steps after {args.warmup} warm-up): "
                        "stage_batches, _train_step (tokenise, forward, InfoNCE, backward), clip_grad_norm_, "
                        "AdamW, scheduler", "precision": "fp32", "optimizer": type(optimizer.optimizer).__name__,
            **summarise(prof, clock, padding, args.steps)}


def child_train_st(args) -> dict:
    from bench_train import st_trainer
    from transformers import TrainerCallback

    padding = install_common_probes()
    from sentence_transformers import SentenceTransformer

    annotate(SentenceTransformer, "__init__", "load_model")
    trainer = st_trainer(Path(args.train_file), args.warmup + args.steps, args.batch, Path(args.workdir) / "st_train")
    annotate(trainer, "get_batch_samples", "data")  # the dataloader: sampler, collator (tokenisation)
    annotate(trainer, "training_step", "forward_backward")
    window = {"clock": Stopwatch()}

    class Window(TrainerCallback):
        """Profile from the end of the warm-up steps to the end of the last one (the next batch's
        loading included, as on our side)."""

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step == args.warmup:
                window["prof"] = profiler()
                padding.on = True
                window["prof"].start()
                window["clock"].start()
            elif state.global_step == args.warmup + args.steps:
                window["clock"].stop()
                window["prof"].stop()
                padding.on = False

    trainer.add_callback(Window())
    trainer.train()
    return {"profiled": f"SentenceTransformerTrainer.train ({args.steps} steps after {args.warmup} warm-up), "
                        "MultipleNegativesRankingLoss, no-duplicates sampler", "precision": "fp32",
            "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__ + f" ({trainer.args.optim})",
            **summarise(window["prof"], window["clock"], padding, args.steps)}


def mine_namespace(args, name: str) -> argparse.Namespace:
    return argparse.Namespace(workdir=args.workdir, name=name, data=args.mine_data, num_negatives=4,
                              relative_margin=0.05, encode_batch_size=32)


def child_mine_ours(args) -> dict:
    import bench_mine

    import embed.mining.miner
    import embed.mining.output
    from embed.retrieval.bm25_index import BM25Index
    from embed.retrieval.dense_index import DenseIndex

    preimport()
    padding = install_common_probes()
    annotate(embed.mining.miner, "load_teacher", "load_model")  # before the script imports these names
    annotate(embed.mining.miner, "encode_by_token_length", "encode")
    annotate(embed.mining.output, "plot_margin_scatter", "plot")
    annotate(DenseIndex, "search", "dense_search")
    annotate(BM25Index, "__init__", "bm25")
    annotate(BM25Index, "search", "bm25")
    padding.on, clock = True, Stopwatch()
    with profiler() as prof:
        clock.start()
        result = bench_mine.child_ours(mine_namespace(args, "ours_mine"), ("--mine.encode_precision", "fp32"))
        clock.stop()
    return {"profiled": "bench_mine.child_ours: scripts/mine_faiss.py in-process (BM25 + dense, cold cache, "
                        "encode_precision fp32)", "precision": "fp32", "rows": result["rows"],
            "timings_s": result["timings_s"], **summarise(prof, clock, padding)}


def child_mine_st(args) -> dict:
    import bench_mine
    import faiss
    from sentence_transformers import SentenceTransformer

    preimport()
    padding = install_common_probes()
    annotate(SentenceTransformer, "__init__", "load_model")
    annotate(SentenceTransformer, "encode", "encode")
    annotate(faiss.IndexFlatIP, "search", "dense_search")
    padding.on, clock = True, Stopwatch()
    with profiler() as prof:
        clock.start()
        result = bench_mine.child_st(mine_namespace(args, "st_mine"))
        clock.stop()
    return {"profiled": "bench_mine.child_st: sentence_transformers.util.mine_hard_negatives(use_faiss=True, "
                        "sampling_strategy='top'), fp32", "precision": "fp32", "rows": result["rows"],
            **summarise(prof, clock, padding)}


def preimport() -> None:
    """What each mining side imports lazily, so import time stays out of the profile."""
    import accelerate  # noqa: F401
    import bm25s  # noqa: F401
    import datasets  # noqa: F401
    import faiss  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import sentence_transformers.util  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401


CHILDREN = {"train_ours": child_train_ours, "train_st": child_train_st,
            "mine_ours": child_mine_ours, "mine_st": child_mine_st}


# ---------------------------------------------------------------- parent
def mining_subset(data: str, out: Path, n_queries: int, n_docs: int, seed: int = 0) -> Path:
    """A BEIR folder with the first `n_queries` judged train queries, their positives, and a seeded
    sample of other documents up to `n_docs` (copied line for line)."""
    src = Path(data)
    qrels = (src / "qrels" / "train.tsv").read_text().splitlines()
    header, pairs = qrels[0], [line.split("\t") for line in qrels[1:] if line.strip()]
    queries = {json.loads(line)["_id"]: line for line in (src / "queries.jsonl").read_text().splitlines() if line.strip()}
    docs = {json.loads(line)["_id"]: line for line in (src / "corpus.jsonl").read_text().splitlines() if line.strip()}
    chosen_q = list(dict.fromkeys(q for q, d, _ in pairs if q in queries and d in docs))[:n_queries]
    kept_pairs = [p for p in pairs if p[0] in set(chosen_q) and p[1] in docs]
    positives = list(dict.fromkeys(d for _, d, _ in kept_pairs))
    rest = [d for d in docs if d not in set(positives)]
    chosen_d = positives + random.Random(seed).sample(rest, max(0, n_docs - len(positives)))
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    (out / "qrels" / "train.tsv").write_text("\n".join([header, *("\t".join(p) for p in kept_pairs)]) + "\n")
    (out / "queries.jsonl").write_text("\n".join(queries[q] for q in chosen_q) + "\n")
    (out / "corpus.jsonl").write_text("\n".join(docs[d] for d in chosen_d) + "\n")
    return out


def spawn(kind: str, args, extra: list[str]) -> dict:
    print(f"[profile] {kind} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, __file__, "--_child", kind, "--workdir", args.workdir, "--steps", str(args.steps),
           "--batch", str(args.batch), "--warmup", str(args.warmup), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"[profile] {kind} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[profile] {kind}: {result['profiled_seconds']} s profiled, outside aten ops "
          f"{result['share_of_wall']['outside_aten_ops']:.1%}", file=sys.stderr, flush=True)
    return result


def compare(ours: dict, theirs: dict, per: int = 1) -> dict:
    """Side by side: seconds (per step for training) of each family and of the rest, and the ratio."""
    keys = [*ours["seconds_by_family"], "outside_aten_ops"]

    def secs(side, k):
        return side["outside_aten_ops_seconds"] if k == "outside_aten_ops" else side["seconds_by_family"][k]
    return {"ratio_theirs_over_ours_wall": round(theirs["profiled_seconds"] / ours["profiled_seconds"], 3),
            "ratio_theirs_over_ours_cpu": round(theirs["cpu_seconds"] / ours["cpu_seconds"], 3),
            "unit": "seconds per step" if per > 1 else "seconds",
            "ours": {k: round(secs(ours, k) / per, 3) for k in keys},
            "theirs": {k: round(secs(theirs, k) / per, 3) for k in keys},
            "theirs_minus_ours": {k: round((secs(theirs, k) - secs(ours, k)) / per, 3) for k in keys},
            "padded_tokens_theirs_over_ours": round(theirs["padding"]["padded_tokens"]
                                                    / max(ours["padding"]["padded_tokens"], 1), 3),
            # the same kernels on the same shapes cost the same per token: a gap here is machine load, not work
            "encoder_kernel_ms_per_1k_padded_tokens": {name: encoder_ms_per_1k_tokens(side)
                                                       for name, side in (("ours", ours), ("theirs", theirs))}}


def encoder_ms_per_1k_tokens(side: dict) -> float:
    """matmul + attention + elementwise_norm milliseconds per 1,000 padded tokens of encoder forwards."""
    encoder = sum(side["seconds_by_family"][f] for f in ("matmul", "attention", "elementwise_norm"))
    return round(1000 * encoder / max(side["padding"]["padded_tokens"] / 1000, 1e-9), 2)


def run_rounds(part: str, args, extra: list[str], per: int = 1) -> dict:
    """`args.rounds` rounds of both sides in fresh processes and work folders (a cold mining cache each),
    in the order ours, theirs, then theirs, ours, ..., so a drifting load hits both alike."""
    rounds = []
    for r in range(args.rounds):
        args_r = argparse.Namespace(**{**vars(args), "workdir": str(Path(args.workdir) / f"{part}_round{r}")})
        Path(args_r.workdir).mkdir(parents=True)
        order = ["ours", "st"] if r % 2 == 0 else ["st", "ours"]
        runs = {side: spawn(f"{part}_{side}", args_r, extra) for side in order}
        rounds.append({"order": order, "ours": runs["ours"], "sentence_transformers": runs["st"],
                       "comparison": compare(runs["ours"], runs["st"], per)})
    sides = {"ours": "ours", "theirs": "sentence_transformers"}
    return {"rounds": rounds, "summary": {
        "ratio_theirs_over_ours_wall": [r["comparison"]["ratio_theirs_over_ours_wall"] for r in rounds],
        "ratio_theirs_over_ours_cpu": [r["comparison"]["ratio_theirs_over_ours_cpu"] for r in rounds],
        "same_encoder_kernels_share_of_wall": {k: [r[v]["same_encoder_kernels_share_of_wall"] for r in rounds]
                                               for k, v in sides.items()},
        "outside_aten_ops_share_of_wall": {k: [r[v]["share_of_wall"]["outside_aten_ops"] for r in rounds]
                                           for k, v in sides.items()},
        "padding_share": {k: [r[v]["padding"]["padding_share"] for r in rounds] for k, v in sides.items()},
        "encoder_kernel_ms_per_1k_padded_tokens": [r["comparison"]["encoder_kernel_ms_per_1k_padded_tokens"]
                                                   for r in rounds]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["train", "mine", "both"], default="both")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "scifact"))
    p.add_argument("--steps", type=int, default=4, help="profiled training steps per side")
    p.add_argument("--warmup", type=int, default=1, help="unprofiled training steps first")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mine_queries", type=int, default=200, help="judged SciFact train queries to mine")
    p.add_argument("--mine_docs", type=int, default=400, help="corpus documents (the queries' positives + a sample)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of both sides per part (alternating order)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--train_file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mine_data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(CHILDREN[args._child](args)))
        return

    import torch
    from bench_train import build_training_set

    from embed.runtime import cpu_has_native_bf16

    load_before = os.getloadavg()
    result = {"benchmark": "profile_like_for_like", "precision": "fp32 on both sides",
              "model": "all-MiniLM-L6-v2 (bundled, embed.runtime.resolve_model('minilm'))", "data": args.data,
              "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "native_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads()},
              "note": "shares of the profiled wall time are the result; absolute seconds depend on the machine's load"}
    try:
        import sentence_transformers
        import transformers
        result["machine"].update(sentence_transformers=sentence_transformers.__version__,
                                 transformers=transformers.__version__)
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="profile_lfl_") as tmp:
        args.workdir = tmp
        if args.part in ("train", "both"):
            train_file = build_training_set(args.data, Path(tmp) / "train.jsonl")
            extra = ["--train_file", str(train_file)]
            result["train"] = {"settings": {"batch": args.batch, "max_length": 256, "warmup_steps": args.warmup,
                                            "profiled_steps": args.steps, "hard_negatives": 1},
                               **run_rounds("train", args, extra, per=args.steps)}
        if args.part in ("mine", "both"):
            subset = mining_subset(args.data, Path(tmp) / "scifact_subset", args.mine_queries, args.mine_docs)
            extra = ["--mine_data", str(subset)]
            result["mine"] = {"settings": {"queries": args.mine_queries, "documents": args.mine_docs,
                                           "num_negatives": 4, "relative_margin": 0.05, "encode_batch_size": 32},
                              **run_rounds("mine", args, extra)}
    result["load_average_1_5_15m"] = {"before": [round(x, 2) for x in load_before],
                                      "after": [round(x, 2) for x in os.getloadavg()],
                                      "cores": os.cpu_count()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
