"""Corpus embeddings computed once, kept on disk as fp16 `.npy`, and memory-mapped on reuse.

Encoding a corpus is by far the slowest part of mining (minutes on SciFact, hours at web scale),
while the corpus and the teacher rarely change between runs. So the embeddings are cached under a
key built from everything that changes them: the model's files (path, size, mtime), the encoding
settings (max length, document prompt, pooling, normalisation) and a fingerprint of the corpus
(every id and text). A changed model or corpus gets a new key, so a stale entry is never served.

Layout of one entry, `<cache_root>/<key>/`:
  embeddings.npy   float16 [N, D], row i = corpus document i (memory-mapped when read)
  ids.txt          the N document ids, one a line (checked against the corpus on load)
  meta.json        key inputs, shape, timings; written last, so its presence means "complete"
  parts-<size>/    per-chunk `.npy` files while encoding: a killed encoding resumes chunk by chunk,
                   and under `accelerate launch` each rank encodes its own chunks (rank 0 joins them)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from embed.data import Corpus
from embed.errors import DataError
from embed.io import atomic_open, write_json_atomic, write_text_atomic
from embed.runtime import resolve_model


# ---------------------------------------------------------------- the key
def model_files_fingerprint(name_or_path: str) -> dict:
    """Identify a model by its files (relative path, size, mtime) so a retrained model is a new key.

    Hashing file contents would be exact but reads gigabytes for a 1B model on every run;
    size + mtime changes whenever `save_pretrained` rewrites a file. A hub id (not a local
    path) is identified by its name only.
    """
    path = Path(name_or_path)
    if not path.exists():
        return {"name": name_or_path}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    digest = hashlib.sha256()
    for p in files:
        stat = p.stat()
        digest.update(f"{p.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"path": str(path.resolve()), "files": len(files), "files_sha256": digest.hexdigest()}


def corpus_fingerprint(ids: Sequence[str], texts: Sequence[str]) -> str:
    """sha256 over every (id, text): any edited, added, removed or reordered document changes it."""
    digest = hashlib.sha256()
    for doc_id, text in zip(ids, texts, strict=True):
        digest.update(doc_id.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\1")
    return digest.hexdigest()


def cache_key(model: dict, settings: dict, corpus_sha256: str) -> tuple[str, dict]:
    """(short key, the full description it hashes); the description is saved in meta.json."""
    described = {"model": model, "settings": settings, "corpus_sha256": corpus_sha256}
    key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]
    return key, described


# ---------------------------------------------------------------- the entry
class CorpusEmbeddingCache:
    """One cache entry: `load()` an existing one, or `build()` it from an encode function."""

    def __init__(self, root: str | os.PathLike, key: str, described: dict, ids: Sequence[str]):
        self.dir = Path(root) / key
        self.key = key
        self.described = described
        self.ids = ids

    @property
    def complete(self) -> bool:
        return (self.dir / "meta.json").is_file() and (self.dir / "embeddings.npy").is_file()

    def load(self) -> np.ndarray:
        """The cached [N, D] float16 matrix, memory-mapped read-only (pages load on demand)."""
        emb = np.load(self.dir / "embeddings.npy", mmap_mode="r")
        stored_ids = (self.dir / "ids.txt").read_text(encoding="utf-8").split("\n")[:-1]
        if emb.shape[0] != len(self.ids) or stored_ids != list(self.ids):
            raise DataError(f"{self.dir}: cached embeddings do not match the corpus (ids differ); delete the folder")
        return emb

    def build(self, texts: Sequence[str], encode: Callable[[list[str]], np.ndarray], *,
              chunk_size: int = 8192, rank: int = 0, world_size: int = 1,
              barrier: Callable[[], None] = lambda: None, log: Callable[[str], None] = print) -> None:
        """Encode the corpus in chunks (this rank's share), then rank 0 joins them into one file.

        Each chunk is written atomically to parts/ as soon as it is done, so a killed run
        re-encodes at most one chunk per rank. `barrier` is the process group's
        wait_for_everyone (a no-op in a single process).
        """
        parts = self.dir / f"parts-{chunk_size}"  # a resume with another chunk size starts its own parts
        parts.mkdir(parents=True, exist_ok=True)
        n_chunks = (len(texts) + chunk_size - 1) // chunk_size
        mine = [c for c in range(n_chunks) if c % world_size == rank]
        todo = [c for c in mine if not (parts / f"{c:06d}.npy").is_file()]
        if len(todo) < len(mine):
            log(f"[cache] rank {rank}: resuming, {len(mine) - len(todo)} of {len(mine)} chunks already encoded")
        started, done_docs = time.perf_counter(), 0
        for c in todo:
            chunk = list(texts[c * chunk_size:(c + 1) * chunk_size])
            emb = np.asarray(encode(chunk), dtype=np.float16)
            if emb.ndim != 2 or emb.shape[0] != len(chunk):
                raise RuntimeError(f"encoder returned shape {emb.shape} for {len(chunk)} texts")
            with atomic_open(parts / f"{c:06d}.npy", "wb") as f:
                np.save(f, emb)
            done_docs += len(chunk)
            rate = done_docs / max(time.perf_counter() - started, 1e-9)
            log(f"[cache] rank {rank}: chunk {c + 1}/{n_chunks} encoded ({rate:.1f} docs/s)")
        barrier()
        if rank == 0:
            self._join(parts, n_chunks, encode_seconds=time.perf_counter() - started)
        barrier()

    def _join(self, parts: Path, n_chunks: int, encode_seconds: float) -> None:
        """Stream the chunk files into one memory-mapped .npy: never the whole matrix in RAM twice."""
        first = np.load(parts / f"{0:06d}.npy", mmap_mode="r")
        shape = (len(self.ids), first.shape[1])
        tmp = self.dir / "embeddings.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        row = 0
        for c in range(n_chunks):
            part = np.load(parts / f"{c:06d}.npy", mmap_mode="r")
            out[row:row + part.shape[0]] = part
            row += part.shape[0]
        if row != shape[0]:
            raise RuntimeError(f"{parts}: chunks hold {row} rows, the corpus has {shape[0]}")
        out.flush()
        del out
        os.replace(tmp, self.dir / "embeddings.npy")
        write_text_atomic(self.dir / "ids.txt", "".join(f"{i}\n" for i in self.ids))
        write_json_atomic(self.dir / "meta.json", {**self.described, "shape": list(shape), "dtype": "float16",
                                                   "encode_seconds_last_build": round(encode_seconds, 3)})
        for leftover in self.dir.glob("parts-*"):
            shutil.rmtree(leftover)


def corpus_embeddings(cache: CorpusEmbeddingCache, texts: Sequence[str], encode: Callable[[list[str]], np.ndarray],
                      **build_kwargs) -> tuple[np.ndarray, bool]:
    """(memory-mapped embeddings, whether the cache already had them): the one call mining makes."""
    if cache.complete:
        return cache.load(), True
    cache.build(texts, encode, **build_kwargs)
    return cache.load(), False


def teacher_cache(model, name: str, dtype: str, corpus: Corpus, texts: Sequence[str], cache_root, precision: str = "fp32"):
    """The cache entry for this teacher + corpus; query-side settings are left out of the key."""
    settings = dataclasses.asdict(model.settings)
    for query_only in ("query_prompt", "query_max_length"):
        settings.pop(query_only, None)
    settings["dtype"] = dtype
    if precision != "fp32":  # fp32 entries keep the key they had before encoding precision was a setting
        settings["encode_precision"] = precision
    key, described = cache_key(model_files_fingerprint(resolve_model(name)), settings, corpus_fingerprint(corpus.ids, texts))
    return CorpusEmbeddingCache(cache_root, key, described, corpus.ids)
