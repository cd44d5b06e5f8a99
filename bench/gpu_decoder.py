"""(c) The decoder path on a Llama-3.2-1B-shaped random-init backbone: bidirectional attention on
the GPU's attention kernels, then training steps with LoRA + latent-attention pooling + GradCache.

bidirectional  embed.modeling.bidirectional.make_bidirectional on a 2-layer model of the 1B shape, with
               sdpa (flash kernel without padding, memory-efficient with right padding, the
               default with left padding) and eager attention: changing a row's last real token
               must move its first token's hidden state after the patch, and must not before.
lora           the recipes' path (recipes/nemotron-1b-*.yaml): bf16 frozen backbone made
               bidirectional, embed.modeling.peft.apply_lora r16 on attention+MLP, gradient checkpointing,
               embed.modeling.latent_attention pooling (512 latents, 8 x 64 heads, fp32), MatryoshkaLoss
               over InfoNCE (temperature 0.02), GradCache in chunks of 32 sequences, fused AdamW.
               Batch 128 queries of 64 tokens, each with 1 positive + 1 hard negative of 256
               tokens. Seconds per step and peak allocated memory (T4 budget: 14 GB). A chunk of
               32 x 256 tokens holds as many tokens as the T4 recipe's 16 x 512.
qlora          the same on a 4-bit NF4 backbone (embed.modeling.peft.load_in_4bit), when bitsandbytes is
               importable; skipped with the reason otherwise.

    python bench/gpu_decoder.py --result c.json --seconds 100 [--dry]    # normally via gpu_check.sh
"""
from __future__ import annotations

import contextlib
import importlib.util
import tempfile

import torch
from gpu_common import (
    LLAMA_1B,
    TINY_LLAMA,
    Part,
    adamw,
    all_finite,
    autocast,
    contrastive_batch,
    free_memory,
    part_main,
    peak_memory,
    reset_peak_memory,
    time_steps,
)

FULL = dict(shape=LLAMA_1B, queries=128, group=2, query_len=64, doc_len=256, chunk=32, warmup=1, steps=3,
            head=dict(num_latents=512, num_heads=8, head_dim=64), matryoshka=[384, 512, 768, 1024, 2048])
DRY = dict(shape=TINY_LLAMA, queries=4, group=2, query_len=8, doc_len=16, chunk=4, warmup=1, steps=2,
           head=dict(num_latents=16, num_heads=2, head_dim=16), matryoshka=[16, 32, 64])
T4_BUDGET_GB = 14.0
TEMPERATURE = 0.02


# ---------------------------------------------------------------- bidirectional attention on the real kernels
def llama(shape: dict, attn_implementation: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel(LlamaConfig(**shape, attn_implementation=attn_implementation))
    return model.to(dtype)


def padded_batch(padding: str, vocab: int, device: torch.device, rows: int = 4, length: int = 128):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[0, length // 2:] = 0
    elif padding == "left":
        mask[0, :length // 2] = 0
    return ids.to(device), mask.to(device)


@torch.no_grad()
def first_token_shift(model, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Smallest, over rows, of the largest change in the first real token's state when the last real token changes."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    first = mask.argmax(dim=1)
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
    changed = ids.clone()
    changed[rows, last] = ids[rows, last] % (model.config.vocab_size - 6) + 5
    states = [model(input_ids=x, attention_mask=mask).last_hidden_state[rows, first].float() for x in (ids, changed)]
    return (states[0] - states[1]).abs().amax(dim=1).min().item()


def sdpa_kernel(name: str, device: torch.device):
    """Force one SDPA kernel on CUDA: flash (no mask) or memory-efficient (with a mask)."""
    if device.type != "cuda" or name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel as force

    return force({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[name])


def check_bidirectional(part: Part, shape: dict) -> dict:
    from embed.modeling.bidirectional import make_bidirectional

    device = part.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    length = 128 if device.type == "cuda" else 16
    cases = []
    for attn_implementation in ("sdpa", "eager"):
        model = llama(shape, attn_implementation, device, dtype).eval()
        kernels = [("none", "flash" if attn_implementation == "sdpa" else "default"),
                   ("right", "efficient" if attn_implementation == "sdpa" else "default"), ("left", "default")]
        before = {}
        for padding, kernel in kernels:
            with sdpa_kernel(kernel, device):
                before[padding] = first_token_shift(model, *padded_batch(padding, shape["vocab_size"], device, length=length))
        patched = make_bidirectional(model)
        for padding, kernel in kernels:
            with sdpa_kernel(kernel, device):
                after = first_token_shift(model, *padded_batch(padding, shape["vocab_size"], device, length=length))
            cases.append({"attn": attn_implementation, "padding": padding, "sdpa_kernel": kernel,
                          "modules_patched": patched, "shift_before": before[padding], "shift_after": after,
                          "ok": before[padding] == 0.0 and after > 1e-3})
        del model
    return {"layers": shape["num_hidden_layers"], "dtype": str(dtype).removeprefix("torch."), "cases": cases,
            "all_ok": all(case["ok"] for case in cases)}


# ---------------------------------------------------------------- LoRA / QLoRA training steps
def decoder_embedding_model(backbone, sizes: dict, device: torch.device):
    """Bidirectional backbone + LoRA adapters + checkpointing + an fp32 latent-attention head."""
    from embed.modeling.bidirectional import make_bidirectional
    from embed.modeling.model import (
        EmbeddingModel,
        EncoderSettings,
        enable_gradient_checkpointing,
    )
    from embed.modeling.peft import apply_lora
    from embed.modeling.pooling import build_pooling

    make_bidirectional(backbone)
    backbone = apply_lora(backbone, r=16, alpha=32, dropout=0.1, target="attention+mlp")
    enable_gradient_checkpointing(backbone)
    head = build_pooling("latent_attention", sizes["shape"]["hidden_size"], **sizes["head"]).to(device)
    settings = EncoderSettings(pooling="latent_attention", normalize=True, bidirectional=True)
    return EmbeddingModel(backbone, None, head, settings).train()


def lora_steps(part: Part, sizes: dict, backbone) -> dict:
    from embed.training.loss import GradCache, InfoNCELoss, MatryoshkaLoss

    device, queries, group = part.device, sizes["queries"], sizes["group"]
    model = decoder_embedding_model(backbone, sizes, device)
    loss_fn = MatryoshkaLoss(InfoNCELoss(temperature=TEMPERATURE), dims=sizes["matryoshka"])
    cache = GradCache(loss_fn, chunk_size=sizes["chunk"])
    query_features, doc_features, doc_keys, query_pos_keys = contrastive_batch(
        queries, group, sizes["query_len"], sizes["doc_len"], sizes["shape"]["vocab_size"], device)
    adapters = [p for p in model.backbone.parameters() if p.requires_grad]
    optimizer = adamw([{"params": adapters, "lr": 1e-4}, {"params": list(model.pooling.parameters()), "lr": 1e-3}],
                      lr=1e-4, device=device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None

    def encode(features):
        with autocast(device, amp_dtype):
            return model(features).float()

    def step() -> torch.Tensor:
        loss = cache(encode, query_features, doc_features, doc_keys, query_pos_keys)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    reset_peak_memory(device)
    timing = time_steps(step, device, sizes["warmup"], windows=1, steps_per_window=sizes["steps"])
    seconds = timing.pop("seconds_per_step")
    tokens = queries * sizes["query_len"] + queries * group * sizes["doc_len"]
    memory = peak_memory(device)
    result = {"steps_per_s": round(1 / seconds, 3), "seconds_per_step": round(seconds, 3),
              "queries_per_s": round(queries / seconds, 1), "tokens_per_s": round(tokens / seconds),
              "losses_finite": all_finite(timing["losses"]),
              "trainable_adapter_params": sum(p.numel() for p in adapters),
              "head_params": sum(p.numel() for p in model.pooling.parameters()),
              "settings": {"queries": queries, "documents_per_query": group, "query_length": sizes["query_len"],
                           "document_length": sizes["doc_len"], "tokens_per_step": tokens,
                           "gradcache_chunk": sizes["chunk"], "gradient_checkpointing": True,
                           "lora": "r16 alpha32 dropout0.1 attention+mlp", "pooling": f"latent attention {sizes['head']}",
                           "loss": f"Matryoshka {sizes['matryoshka']} over InfoNCE, temperature {TEMPERATURE}",
                           "precision": "bf16 autocast" if amp_dtype else "fp32 (CPU)"},
              **timing, **memory}
    if memory:
        result["within_t4_budget_14gb"] = memory["peak_allocated_gb"] <= T4_BUDGET_GB
    return result


def lora_run(part: Part, sizes: dict) -> dict:
    dtype = torch.bfloat16 if part.device.type == "cuda" else torch.float32
    result = lora_steps(part, sizes, llama(sizes["shape"], "sdpa", part.device, dtype))
    result["settings"]["backbone_weights"] = str(dtype).removeprefix("torch.")
    return result


def qlora_run(part: Part, sizes: dict) -> dict:
    """The 4-bit backbone loads from a folder (bitsandbytes quantises at load): save the random one first."""
    from embed.modeling.peft import load_in_4bit

    with tempfile.TemporaryDirectory() as folder:
        llama(sizes["shape"], "sdpa", part.device, torch.bfloat16).save_pretrained(folder)
        free_memory(part.device)
        backbone = load_in_4bit(folder, attn_implementation="sdpa")
    result = lora_steps(part, sizes, backbone)
    result["settings"]["backbone_weights"] = "nf4 (bitsandbytes, double quantisation)"
    return result


def run(part: Part) -> None:
    sizes = DRY if part.dry else FULL
    part.attempt("bidirectional", lambda: check_bidirectional(part, {**sizes["shape"], "num_hidden_layers": 2}),
                 needs_seconds=0 if part.dry else 10)
    part.attempt("lora", lambda: lora_run(part, sizes), needs_seconds=0 if part.dry else 30)
    if part.device.type != "cuda":
        part.put("qlora", {"skipped": "QLoRA needs a CUDA GPU (bitsandbytes 4-bit)"})
    elif importlib.util.find_spec("bitsandbytes") is None:
        part.put("qlora", {"skipped": "bitsandbytes is not importable here"})
    else:
        part.attempt("qlora", lambda: qlora_run(part, sizes), needs_seconds=40)
    part.put("budget_gb", T4_BUDGET_GB)
    part.check("bidirectional_all_ok", part.field("bidirectional", "all_ok"))
    for run_name in ("lora", "qlora"):
        part.check(f"{run_name}_losses_finite", part.field(run_name, "losses_finite"))
        part.check(f"{run_name}_within_14gb", part.field(run_name, "within_t4_budget_14gb"))


if __name__ == "__main__":
    part_main(run, __doc__.splitlines()[0])
