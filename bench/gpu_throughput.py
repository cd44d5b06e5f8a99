"""(a) bf16 training throughput and MFU of a bge-base-shaped encoder at sequence length 256.

One training step is the project's own: embed.modeling.model.EmbeddingModel (random-init BERT-base, mean
pooling, normalised) encodes 128 queries and 128 documents of 256 tokens, embed.training.loss.InfoNCELoss
(temperature 0.02, in-batch negatives) scores them, backward, fused AdamW. Variants, each on a
fresh model: eager with bf16 autocast over fp32 weights; the same with every transformer layer
torch.compile'd (inductor's default mode: no CUDA graphs); compiled with bf16 weights.

MFU = model FLOPs per second / a ceiling, the ceiling being a bf16 8192^3 matmul measured in the
same process (and, separately, the datasheet's dense bf16 peak). Model FLOPs per sequence of S
tokens, forward + backward: 6 * N * S + 12 * L * H * S^2, N the parameters of the L layers
(embeddings excluded), H the hidden size; the second term counts attention's score and
weighted-sum products, which the 6 N S rule leaves out. Recomputation is not counted.

    python bench/gpu_throughput.py --result a.json --seconds 200 [--dry]    # normally via gpu_check.sh
"""
from __future__ import annotations

import statistics
import time

import torch
from gpu_common import (
    BGE_BASE,
    TINY_BERT,
    Part,
    adamw,
    all_finite,
    autocast,
    contrastive_batch,
    part_main,
    peak_memory,
    reset_peak_memory,
    time_steps,
)

FLOPS_FORMULA = ("model FLOPs per sequence of S tokens, forward+backward = 6*N*S + 12*L*H*S^2; N = parameters "
                 "of the L transformer layers (embeddings excluded), H = hidden size; recomputation not counted")
# Dense bf16 tensor-core peaks from the datasheets (no sparsity), matched in order on the device name.
DATASHEET_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                         ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0)]
MFU_GOAL = 0.40

FULL = dict(shape=BGE_BASE, queries=128, seq=256, matmul=8192, warmup=3, windows=3, steps=5, compile_backend="inductor")
# Dry: the same code on CPU; "aot_eager" traces the graphs as inductor would, without generating code.
DRY = dict(shape=TINY_BERT, queries=4, seq=32, matmul=256, warmup=1, windows=1, steps=2, compile_backend="aot_eager")
# name -> (compile the layers, weight dtype, dropout); fp32 weights run under bf16 autocast. Pure bf16
# weights are the fastest but not what train.py does: AdamW updates of ~lr*1 vanish in bf16's 8-bit
# mantissa (the loss falls far slower), so the recipe path is the autocast one.
VARIANTS = {"eager_autocast": (False, torch.float32, 0.1), "compiled_autocast": (True, torch.float32, 0.1),
            "compiled_autocast_no_dropout": (True, torch.float32, 0.0),
            "compiled_bf16_weights": (True, torch.bfloat16, 0.1)}
SECONDS_NEEDED = {"eager_autocast": 20, "compiled_autocast": 60, "compiled_autocast_no_dropout": 60,
                  "compiled_bf16_weights": 60}


def training_flops_per_sequence(layer_params: int, layers: int, hidden: int, seq: int) -> int:
    return 6 * layer_params * seq + 12 * layers * hidden * seq ** 2


def datasheet_tflops(device_name: str) -> float | None:
    return next((tflops for key, tflops in DATASHEET_BF16_TFLOPS if key in device_name), None)


def bert_embedding_model(shape: dict, device: torch.device, dtype: torch.dtype = torch.float32, dropout: float = 0.1):
    """EmbeddingModel over a random-init BERT (sdpa attention, no pooler: it never reaches the embedding)."""
    from transformers import BertConfig, BertModel

    from embed.modeling.model import EmbeddingModel, EncoderSettings
    from embed.modeling.pooling import build_pooling

    torch.manual_seed(0)
    with torch.device(device):
        config = BertConfig(**shape, attn_implementation="sdpa", hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout)
        backbone = BertModel(config, add_pooling_layer=False)
    settings = EncoderSettings(pooling="mean", normalize=True)
    model = EmbeddingModel(backbone.to(dtype), None, build_pooling("mean", shape["hidden_size"]), settings)
    return model.train()


def matmul_ceiling(device: torch.device, size: int, repeats: int = 10) -> dict:
    """bf16 [size x size] @ [size x size] on random data: the median of `repeats` after 3 warm-ups."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            start_time = time.perf_counter()
            a @ b
            seconds.append(time.perf_counter() - start_time)
    median = statistics.median(seconds)
    return {"size": size, "dtype": "bfloat16", "repeats": repeats, "median_ms": round(median * 1e3, 3),
            "tflops": float(f"{2 * size ** 3 / median / 1e12:.4g}")}  # 4 digits: > 0 even on a slow CPU


def measure_variant(part: Part, sizes: dict, variant: str, ceiling_tflops: float, datasheet: float | None) -> dict:
    from embed.training.loss import InfoNCELoss

    compiled, weight_dtype, dropout = VARIANTS[variant]
    device, shape, queries, seq = part.device, sizes["shape"], sizes["queries"], sizes["seq"]
    model = bert_embedding_model(shape, device, weight_dtype, dropout)
    if compiled:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        for layer in model.backbone.encoder.layer:  # regional compilation: one graph, reused by every layer
            layer.compile(backend=sizes["compile_backend"])
    loss_fn = InfoNCELoss(temperature=0.02)
    query_features, doc_features, doc_keys, query_pos_keys = contrastive_batch(
        queries, 1, seq, seq, shape["vocab_size"], device)
    optimizer = adamw(model.parameters(), lr=2e-5, device=device)
    amp_dtype = torch.bfloat16 if weight_dtype == torch.float32 else None

    def step() -> torch.Tensor:
        with autocast(device, amp_dtype):
            query_emb = model(query_features)                                  # [B, D]
            doc_emb = model(doc_features).view(queries, 1, -1)                 # [B, 1, D]
            loss = loss_fn(query_emb, doc_emb, doc_keys, query_pos_keys)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    reset_peak_memory(device)
    timing = time_steps(step, device, sizes["warmup"], sizes["windows"], sizes["steps"])
    layer_params = sum(p.numel() for p in model.backbone.encoder.parameters())
    flops_per_sequence = training_flops_per_sequence(layer_params, shape["num_hidden_layers"], shape["hidden_size"], seq)
    sequences = 2 * queries
    seconds = timing.pop("seconds_per_step")
    achieved_tflops = sequences * flops_per_sequence / seconds / 1e12
    result = {
        "sequences_per_s": round(sequences / seconds, 1), "query_doc_pairs_per_s": round(queries / seconds, 1),
        "tokens_per_s": round(sequences * seq / seconds), "seconds_per_step": round(seconds, 5),
        "achieved_tflops": round(achieved_tflops, 1),
        "mfu_vs_measured_matmul": round(achieved_tflops / ceiling_tflops, 4),
        "mfu_vs_datasheet": round(achieved_tflops / datasheet, 4) if datasheet else None,
        "flops_per_sequence": flops_per_sequence, "layer_params": layer_params,
        "losses_finite": all_finite(timing["losses"]),
        "settings": {"sequence_length": seq, "queries": queries, "documents": queries, "sequences_per_step": sequences,
                     "padding": "none (every sequence full length, so sdpa may pick flash attention)",
                     "attention": "sdpa", "precision": "bf16 autocast over fp32 weights" if amp_dtype else
                     "bf16 weights, no autocast", "compile": f"per-layer torch.compile, backend {sizes['compile_backend']}, "
                     "default mode (no CUDA graphs)" if compiled else "none (eager)",
                     "optimizer": "AdamW fused" if device.type == "cuda" else "AdamW", "dropout": dropout,
                     "loss": "InfoNCE, temperature 0.02, in-batch negatives", "pooling": "mean, normalised"},
        **timing, **peak_memory(device)}
    if compiled:
        result["dynamo_unique_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return result


def run(part: Part) -> None:
    sizes = DRY if part.dry else FULL
    device = part.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    datasheet = datasheet_tflops(device_name)
    ceiling = matmul_ceiling(device, sizes["matmul"])
    part.put("matmul_ceiling", ceiling)
    part.put("datasheet_bf16_tflops", datasheet)
    part.put("flops_formula", FLOPS_FORMULA)
    for variant in VARIANTS:
        part.attempt(variant, lambda variant=variant: measure_variant(part, sizes, variant, ceiling["tflops"], datasheet),
                     needs_seconds=0 if part.dry else SECONDS_NEEDED[variant])
    measured = {name: r for name, r in part.report["results"].items() if isinstance(r, dict) and "mfu_vs_measured_matmul" in r}
    # The check is on what train.py runs: fp32 master weights under bf16 autocast.
    training_path = {name: r for name, r in measured.items() if VARIANTS[name][1] == torch.float32}
    if training_path:
        name, best = max(training_path.items(), key=lambda item: item[1]["mfu_vs_measured_matmul"])
        part.put("best", {"variant": name, "sequences_per_s": best["sequences_per_s"],
                          "mfu_vs_measured_matmul": best["mfu_vs_measured_matmul"],
                          "mfu_vs_datasheet": best["mfu_vs_datasheet"],
                          "meets_goal_40pct_of_matmul": best["mfu_vs_measured_matmul"] >= MFU_GOAL})
        # The MFU is against the matmul measured in the same run; the datasheet ratio is reported too.
        on_gpu = part.device.type == "cuda"  # a CPU's MFU is no GPU figure: not measurable there
        part.check("mfu_at_least_40pct_of_measured_matmul", part.field("best", "meets_goal_40pct_of_matmul") if on_gpu else None)
    if measured:
        part.check("losses_finite", all(r["losses_finite"] for r in measured.values()))


if __name__ == "__main__":
    part_main(run, __doc__.splitlines()[0])
