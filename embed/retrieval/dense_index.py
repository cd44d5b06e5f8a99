"""Dense candidates for mining: inner-product search over the cached corpus embeddings with FAISS.

`flat` (the default) is exact: the fp16 cache is streamed through `faiss.knn` in blocks and the
per-block top-k lists are merged with `faiss.ResultHeap`, so RAM holds the memory-mapped cache
plus one float32 block, never a second full copy of the corpus (1M x 384 dims stays under 1 GB).
Any other value is a `faiss.index_factory` string (`IVF4096,SQfp16`, `HNSW32,SQfp16`, ...) for
corpora where exact search is too slow; it is built once, saved next to the embeddings, and
tuned at search time with `search_params` (`nprobe=32`, `efSearch=128`). With faiss-gpu and a
visible GPU, exact search runs on the GPU (`faiss.knn_gpu`) and IVF indexes are cloned to it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import faiss
import numpy as np

from embed.errors import ConfigError


def num_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class DenseIndex:
    """Top-k inner-product search over `corpus` ([N, D], usually the memory-mapped fp16 cache)."""

    def __init__(self, corpus: np.ndarray, index: str = "flat", search_params: str = "",
                 block_rows: int = 131072, save_dir: Optional[str | os.PathLike] = None):
        self.corpus = corpus
        self.kind = index
        self.block_rows = block_rows
        self._gpu = num_gpus() > 0
        self._gpu_res = faiss.StandardGpuResources() if self._gpu else None
        self._ann = None
        if index != "flat":
            self._ann = self._load_or_build_ann(index, save_dir)
            if search_params:
                try:
                    faiss.ParameterSpace().set_index_parameters(self._ann, search_params)
                except RuntimeError as e:
                    raise ConfigError(f"key 'mine.index_search_params': faiss rejected {search_params!r} ({e})") from None
        elif search_params:
            raise ConfigError("key 'mine.index_search_params' only applies to an approximate index (mine.index is 'flat')")

    # ------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, indices [Q, k] int64), best first; -1 marks an empty slot."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.corpus))
        if self._ann is not None:
            scores, indices = self._ann.search(queries, k)
            return scores, indices.astype(np.int64)
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        for start in range(0, len(self.corpus), self.block_rows):
            block = self.corpus[start:start + self.block_rows]
            kb = min(k, len(block))
            if self._gpu:  # knn_gpu takes fp16 vectors as they are
                scores, indices = faiss.knn_gpu(self._gpu_res, queries, np.ascontiguousarray(block), kb,
                                                metric=faiss.METRIC_INNER_PRODUCT)
            else:
                scores, indices = faiss.knn(queries, np.ascontiguousarray(block, dtype=np.float32), kb,
                                            metric=faiss.METRIC_INNER_PRODUCT)
            if kb < k:  # the last block may hold fewer than k rows: pad so the heap sees k columns
                pad = k - kb
                scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
                indices = np.pad(indices, ((0, 0), (0, pad)), constant_values=-1 - start)
            heap.add_result(np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(indices + start))
        heap.finalize()
        indices = np.where(np.isfinite(heap.D), heap.I, -1)
        return heap.D, indices.astype(np.int64)

    # ------------------------------------------------------------ approximate indexes
    def _load_or_build_ann(self, factory: str, save_dir) -> faiss.Index:
        path = None
        if save_dir is not None:
            safe = "".join(ch if ch.isalnum() else "_" for ch in factory)
            path = Path(save_dir) / f"index_{safe}.faiss"
            if path.is_file():
                return self._to_gpu(faiss.read_index(str(path)))
        dim = self.corpus.shape[1]
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ConfigError(f"key 'mine.index': {factory!r} is not 'flat' or a faiss index_factory string ({e})") from None
        if not index.is_trained:
            rng = np.random.default_rng(0)
            n_train = min(len(self.corpus), 131072)
            rows = np.sort(rng.choice(len(self.corpus), n_train, replace=False))
            index.train(np.asarray(self.corpus[rows], dtype=np.float32))
        for start in range(0, len(self.corpus), self.block_rows):
            index.add(np.asarray(self.corpus[start:start + self.block_rows], dtype=np.float32))
        if path is not None:
            tmp = path.with_suffix(".tmp")
            faiss.write_index(index, str(tmp))
            os.replace(tmp, path)
        return self._to_gpu(index)

    def _to_gpu(self, index: faiss.Index) -> faiss.Index:
        """Clone IVF-style indexes to the GPUs when faiss-gpu has some; HNSW stays on the CPU."""
        if not self._gpu:
            return index
        try:
            return faiss.index_cpu_to_all_gpus(index)
        except RuntimeError:
            return index
