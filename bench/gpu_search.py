"""(d) Exact top-100 inner-product search of 10,000 queries over 1,000,000 x 768 fp16 vectors on the GPU.

torch  in query chunks: one fp16 matmul against the whole corpus, a shortlist of the 128 best by
       those fp16-rounded scores, the shortlist rescored in fp32 and cut to 100, so the scores and
       the order are those of fp32 arithmetic on the stored fp16 vectors.
faiss  embed.retrieval.dense_index.DenseIndex (flat, `faiss.knn_gpu` in blocks) when faiss is importable with
       GPU support (on a CPU dry run, its CPU path); skipped with the reason otherwise.
Both are checked against a brute-force fp32 reference on a sample of queries (recall@100).
Vectors are random unit vectors: the speed of exact search does not depend on the values.

    python bench/gpu_search.py --result d.json --seconds 50 [--dry]    # normally via gpu_check.sh
"""
from __future__ import annotations

import importlib.util
import statistics
import time

import torch
import torch.nn.functional as F
from gpu_common import Part, part_main, synchronize

FULL = dict(docs=1_000_000, dim=768, queries=10_000, k=100, shortlist=128, query_chunk=2048, reference_queries=256,
            repeats=3)
DRY = dict(docs=20_000, dim=64, queries=300, k=100, shortlist=128, query_chunk=128, reference_queries=32, repeats=1)


def unit_vectors(rows: int, dim: int, device: torch.device, block: int = 131072) -> torch.Tensor:
    """[rows, dim] fp16 unit vectors, drawn and normalised in fp32 block by block."""
    return torch.cat([F.normalize(torch.randn(min(block, rows - start), dim, device=device), dim=-1).half()
                      for start in range(0, rows, block)])


def torch_search(corpus: torch.Tensor, queries: torch.Tensor, k: int, shortlist: int,
                 query_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores fp32 [Q, k], indices int64 [Q, k]), best first."""
    all_scores, all_indices = [], []
    for chunk in queries.split(query_chunk):
        rough = chunk @ corpus.T                                                   # [q, N] fp16
        candidates = rough.topk(min(shortlist, corpus.shape[0]), dim=1).indices    # [q, k']
        del rough
        exact = torch.bmm(corpus[candidates].float(), chunk.float().unsqueeze(2)).squeeze(2)  # [q, k'] fp32
        top = exact.topk(k, dim=1)
        all_scores.append(top.values)
        all_indices.append(candidates.gather(1, top.indices))
    return torch.cat(all_scores), torch.cat(all_indices)


def reference_search(corpus: torch.Tensor, queries: torch.Tensor, k: int, block: int = 131072) -> torch.Tensor:
    """Indices [Q, k] of brute-force fp32 scores (tf32 off), corpus upcast block by block."""
    queries = queries.float()
    scores = torch.cat([queries @ piece.float().T for piece in corpus.split(block)], dim=1)
    return scores.topk(k, dim=1).indices


def recall(found: torch.Tensor, reference: torch.Tensor) -> float:
    hits = (found.unsqueeze(2) == reference.unsqueeze(1)).any(dim=2).sum().item()
    return hits / reference.numel()


def timed(search, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` runs (after one warm-up run) and the last run's output."""
    output = search()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        output = search()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), output


def run(part: Part) -> None:
    sizes = DRY if part.dry else FULL
    device, k = part.device, sizes["k"]
    torch.backends.cuda.matmul.allow_tf32 = False  # the default, stated: the reference must be fp32 arithmetic
    torch.manual_seed(0)
    corpus = unit_vectors(sizes["docs"], sizes["dim"], device)
    queries = unit_vectors(sizes["queries"], sizes["dim"], device)
    sample = queries[:sizes["reference_queries"]]
    reference = reference_search(corpus, sample, k)
    setup = {"docs": sizes["docs"], "dim": sizes["dim"], "queries": sizes["queries"], "k": k, "storage": "fp16",
             "vectors": "random unit vectors", "reference": f"fp32 brute force on {len(sample)} queries"}
    part.put("setup", setup)

    def torch_run() -> dict:
        seconds, (scores, indices) = timed(
            lambda: torch_search(corpus, queries, k, sizes["shortlist"], sizes["query_chunk"]), device, sizes["repeats"])
        return {"queries_per_s": round(sizes["queries"] / seconds, 1), "seconds": round(seconds, 4),
                "recall_at_k_vs_fp32": recall(indices[:len(sample)], reference),
                "settings": {"query_chunk": sizes["query_chunk"], "shortlist": sizes["shortlist"],
                             "repeats": sizes["repeats"], "method": "fp16 matmul + topk shortlist, fp32 rescoring"}}

    part.attempt("torch", torch_run)

    if importlib.util.find_spec("faiss") is None:
        part.put("faiss", {"skipped": "faiss is not importable here"})
    else:
        from embed.retrieval.dense_index import DenseIndex, num_gpus

        if device.type == "cuda" and num_gpus() == 0:
            part.put("faiss", {"skipped": "faiss is importable but built without GPU support (faiss-cpu)"})
        else:
            def faiss_run() -> dict:
                index = DenseIndex(corpus.cpu().numpy())
                host_queries = queries.float().cpu().numpy()
                seconds, (_, indices) = timed(lambda: index.search(host_queries, k), device, sizes["repeats"])
                found = torch.from_numpy(indices[:len(sample)]).to(device)
                return {"queries_per_s": round(sizes["queries"] / seconds, 1), "seconds": round(seconds, 4),
                        "recall_at_k_vs_fp32": recall(found, reference),
                        "settings": {"index": "flat", "gpu": num_gpus() > 0, "via": "embed.retrieval.dense_index.DenseIndex"}}

            part.attempt("faiss", faiss_run)
    for method in ("torch", "faiss"):
        found_recall = part.field(method, "recall_at_k_vs_fp32")
        part.check(f"{method}_exact", None if found_recall is None else found_recall >= 0.999)


if __name__ == "__main__":
    part_main(run, __doc__.splitlines()[0])
