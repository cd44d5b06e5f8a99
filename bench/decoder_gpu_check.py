"""GPU check of the decoder path: bidirectional attention on the CUDA kernels, then LoRA + latent-attention
training steps on a Llama-3.2-1B-shaped random-init backbone (bf16), with time and peak memory.

Usage:
    python bench/decoder_gpu_check.py > decoder_gpu_check.json          # on a GPU
    python bench/decoder_gpu_check.py --tiny                            # CPU dry run of the same code
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaConfig, LlamaModel

from embed.bidirectional import make_bidirectional
from embed.latent_attention import LatentAttentionPooling
from embed.lora import apply_lora, enable_gradient_checkpointing

LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=8192)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=1000)


def build(shape: dict, attn_implementation: str, device: str, dtype: torch.dtype) -> LlamaModel:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel(LlamaConfig(**shape, attn_implementation=attn_implementation))
    return model.to(dtype).eval()


def padded_batch(padding: str, vocab: int, device: str, rows: int = 4, length: int = 128):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[0, length // 2:] = 0
    elif padding == "left":
        mask[0, :length // 2] = 0
    return ids.to(device), mask.to(device)


@torch.no_grad()
def first_token_shift(model, ids, mask) -> float:
    """Largest change of any row's first real token when its last real token changes."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    first = mask.argmax(dim=1)
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
    changed = ids.clone()
    changed[rows, last] = ids[rows, last] % (model.config.vocab_size - 1) + 1
    states = [model(input_ids=x, attention_mask=mask).last_hidden_state[rows, first].float() for x in (ids, changed)]
    return (states[0] - states[1]).abs().amax(dim=1).min().item()  # the least-affected row


def kernel(name: str, device: str):
    """Force one SDPA kernel on CUDA (flash without a mask, memory-efficient with one)."""
    if device != "cuda" or name == "default":
        return contextlib.nullcontext()
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[name])


def check_bidirectional(shape, device, dtype) -> list[dict]:
    results = []
    for attn_implementation in ("sdpa", "eager"):
        model = build(shape, attn_implementation, device, dtype)
        cases = [("none", "flash" if attn_implementation == "sdpa" else "default"),
                 ("right", "efficient" if attn_implementation == "sdpa" else "default"), ("left", "default")]
        before = {}
        for padding, sdpa_backend in cases:
            with kernel(sdpa_backend, device):
                before[padding] = first_token_shift(model, *padded_batch(padding, shape["vocab_size"], device))
        patched = make_bidirectional(model)
        for padding, sdpa_backend in cases:
            with kernel(sdpa_backend, device):
                after = first_token_shift(model, *padded_batch(padding, shape["vocab_size"], device))
            results.append({"attn": attn_implementation, "padding": padding, "sdpa_kernel": sdpa_backend,
                            "modules_patched": patched, "shift_before": before[padding], "shift_after": after,
                            "ok": before[padding] == 0.0 and after > 1e-3})
        del model
    return results


def training_steps(shape, device, dtype, queries, negatives, query_len, doc_len, checkpointing, steps=3) -> dict:
    """LoRA r16 (attention+mlp) on a frozen bidirectional backbone + a fp32 latent-attention head, InfoNCE."""
    backbone = build(shape, "sdpa", device, dtype)
    make_bidirectional(backbone)
    backbone = apply_lora(backbone, r=16, alpha=32, dropout=0.1, target="attention+mlp")
    if checkpointing:
        enable_gradient_checkpointing(backbone)
    backbone.train()
    head = LatentAttentionPooling(shape["hidden_size"], num_latents=512, num_heads=8, head_dim=64).to(device)
    parameters = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    docs = queries * (1 + negatives)
    generator = torch.Generator().manual_seed(2)
    q_ids = torch.randint(1, shape["vocab_size"], (queries, query_len), generator=generator).to(device)
    d_ids = torch.randint(1, shape["vocab_size"], (docs, doc_len), generator=generator).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def embed(ids):
        mask = torch.ones_like(ids)
        with autocast:
            token_states = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            return F.normalize(head(token_states, mask).float(), dim=-1)

    def step():
        scores = embed(q_ids) @ embed(d_ids).T / 0.02
        loss = F.cross_entropy(scores, torch.arange(queries, device=device) * (1 + negatives))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up: kernels, allocator
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    seconds = (time.perf_counter() - start) / steps
    result = {"queries": queries, "docs": docs, "query_len": query_len, "doc_len": doc_len,
              "gradient_checkpointing": checkpointing, "seconds_per_step": round(seconds, 3),
              "tokens_per_second": round((queries * query_len + docs * doc_len) / seconds),
              "losses": [round(x, 4) for x in losses],
              "trainable_lora_params": sum(p.numel() for p in backbone.parameters() if p.requires_grad),
              "head_params": sum(p.numel() for p in head.parameters())}
    if device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del backbone, head, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    shape, dtype = (TINY, torch.float32) if args.tiny else (LLAMA_32_1B, torch.bfloat16)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "shape": "tiny" if args.tiny else "llama-3.2-1b"}

    # ---------------------------------------------------------------- bidirectional on the real kernels
    report["bidirectional"] = check_bidirectional(shape, device, dtype)

    # ---------------------------------------------------------------- LoRA + latent attention steps
    runs = [(32, 4, 64, 256, True), (32, 4, 64, 256, False), (128, 4, 64, 256, True)]
    if args.tiny:
        runs = [(4, 1, 8, 16, True), (4, 1, 8, 16, False)]
    report["training"] = [training_steps(shape, device, dtype, *run) for run in runs]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
