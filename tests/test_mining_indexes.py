"""Candidate sources (BM25, FAISS) and the on-disk corpus-embedding cache."""
import os
import time

import numpy as np
import pytest

from embed.errors import ConfigError, DataError
from embed.retrieval.bm25_index import BM25Index
from embed.retrieval.dense_index import DenseIndex
from embed.retrieval.embedding_cache import (
    CorpusEmbeddingCache,
    cache_key,
    corpus_embeddings,
    corpus_fingerprint,
    model_files_fingerprint,
)


def random_unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------- dense
@pytest.mark.parametrize("block_rows", [1000, 64, 7])  # one block; several; a last block smaller than k
def test_flat_search_is_exact_over_fp16_blocks(block_rows):
    corpus = random_unit(300, 16, 0).astype(np.float16)
    queries = random_unit(9, 16, 1)
    scores, indices = DenseIndex(corpus, block_rows=block_rows).search(queries, 10)
    brute = queries @ corpus.astype(np.float32).T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(brute, indices, 1), scores, rtol=1e-5, atol=1e-5)


def test_flat_search_with_k_above_corpus_size_returns_all_rows():
    corpus = random_unit(5, 8, 0).astype(np.float16)
    scores, indices = DenseIndex(corpus, block_rows=2).search(random_unit(2, 8, 1), 50)
    assert indices.shape == (2, 5) and sorted(indices[0]) == list(range(5))


def test_ivf_with_every_list_probed_equals_exact(tmp_path):
    corpus = random_unit(400, 16, 2).astype(np.float16)
    queries = random_unit(5, 16, 3)
    exact = DenseIndex(corpus).search(queries, 8)[1]
    ivf = DenseIndex(corpus, index="IVF4,Flat", search_params="nprobe=4", save_dir=tmp_path)
    np.testing.assert_array_equal(ivf.search(queries, 8)[1], exact)
    assert list(tmp_path.glob("index_*.faiss"))  # built once, reused by the next run
    again = DenseIndex(corpus, index="IVF4,Flat", search_params="nprobe=4", save_dir=tmp_path)
    np.testing.assert_array_equal(again.search(queries, 8)[1], exact)


def test_hnsw_finds_nearly_all_exact_neighbours():
    corpus = random_unit(500, 16, 4).astype(np.float16)
    queries = random_unit(20, 16, 5)
    exact = DenseIndex(corpus).search(queries, 10)[1]
    approx = DenseIndex(corpus, index="HNSW16,SQfp16", search_params="efSearch=64").search(queries, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9


def test_bad_index_settings_name_the_key():
    corpus = random_unit(10, 8, 0).astype(np.float16)
    with pytest.raises(ConfigError, match="mine.index"):
        DenseIndex(corpus, index="NotAnIndex")
    with pytest.raises(ConfigError, match="mine.index_search_params"):
        DenseIndex(corpus, index="flat", search_params="nprobe=4")


# ---------------------------------------------------------------- BM25
def test_bm25_stems_drops_stopwords_and_marks_unmatched_slots():
    docs = ["The cats are running in the garden", "A dog sleeps", "Quantum computing with qubits", "cat food"]
    index = BM25Index(docs)
    indices, scores = index.search(["running cat", "the of and", "zebra", "qubit"], k=3)
    assert indices[0][0] == 0 and set(indices[0][:2]) == {0, 3}  # 'cats'/'running' stem-match
    assert (indices[1] == -1).all() and (indices[2] == -1).all()  # stopwords only; unknown word
    assert indices[3][0] == 2 and (indices[3][1:] == -1).all() and scores[3][0] > 0


def test_bm25_relative_scores_divide_by_the_best_match_in_the_corpus():
    docs = ["The cats are running in the garden", "A dog sleeps", "cat food", "cat cat cat"]
    index = BM25Index(docs)
    _, top = index.search(["cat"], k=4)
    rel = index.relative_scores("cat", [2, 1, 0, 3])
    best = float(top[0][0])
    assert rel.dtype == np.float32 and rel.max() == pytest.approx(1.0) and rel[1] == 0.0
    expected = {row: float(s) / best for row, s in zip(*index.search(["cat"], k=4)) for row, s in zip(row, s) if row >= 0}
    assert rel.tolist() == pytest.approx([expected[2], 0.0, expected[0], expected[3]], rel=1e-5)
    assert index.relative_scores("the of and", [0, 1]).tolist() == [0.0, 0.0]   # stopwords only
    assert index.relative_scores("zebra", [0]).tolist() == [0.0]                # no match anywhere


# ---------------------------------------------------------------- cache
class CountingEncoder:
    def __init__(self, fail_at_call=None):
        self.calls, self.fail_at_call = 0, fail_at_call

    def __call__(self, texts):
        self.calls += 1
        if self.fail_at_call == self.calls:
            raise KeyboardInterrupt("simulated kill")
        return np.stack([np.full(4, len(t), dtype=np.float32) for t in texts])


def make_cache(root, ids, texts, model="m"):
    key, described = cache_key({"name": model}, {"max_length": 8}, corpus_fingerprint(ids, texts))
    return CorpusEmbeddingCache(root, key, described, ids)


def test_cache_encodes_once_then_serves_a_memory_map(tmp_path):
    ids = [f"d{i}" for i in range(10)]
    texts = ["x" * i for i in range(10)]
    enc = CountingEncoder()
    emb, hit = corpus_embeddings(make_cache(tmp_path, ids, texts), texts, enc, chunk_size=3)
    assert not hit and enc.calls == 4 and emb.dtype == np.float16
    np.testing.assert_array_equal(emb[:, 0], np.arange(10))
    emb2, hit2 = corpus_embeddings(make_cache(tmp_path, ids, texts), texts, enc, chunk_size=3)
    assert hit2 and enc.calls == 4 and isinstance(emb2, np.memmap)
    np.testing.assert_array_equal(emb, emb2)


def test_cache_key_changes_with_corpus_text_and_model_files(tmp_path):
    ids, texts = ["a", "b"], ["one", "two"]
    assert make_cache(tmp_path, ids, texts).key != make_cache(tmp_path, ids, ["one", "two!"]).key
    assert make_cache(tmp_path, ids, texts).key != make_cache(tmp_path, ["a", "c"], texts).key
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"1")
    before = model_files_fingerprint(str(model))
    os.utime(model / "weights.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert model_files_fingerprint(str(model)) != before
    assert model_files_fingerprint("org/hub-model") == {"name": "org/hub-model"}


def test_killed_encoding_resumes_chunk_by_chunk(tmp_path):
    ids = [f"d{i}" for i in range(10)]
    texts = ["x" * i for i in range(10)]
    with pytest.raises(KeyboardInterrupt):
        corpus_embeddings(make_cache(tmp_path, ids, texts), texts, CountingEncoder(fail_at_call=3), chunk_size=3)
    enc = CountingEncoder()
    emb, hit = corpus_embeddings(make_cache(tmp_path, ids, texts), texts, enc, chunk_size=3)
    assert not hit and enc.calls == 2  # chunks 0 and 1 survived the kill
    np.testing.assert_array_equal(emb[:, 0], np.arange(10))


def test_two_ranks_each_encode_their_share_and_rank0_joins(tmp_path):
    ids = [f"d{i}" for i in range(10)]
    texts = ["x" * i for i in range(10)]
    enc1, enc0 = CountingEncoder(), CountingEncoder()
    # ranks run one after the other here; the barrier is a no-op (tests/test_mining_script.py runs 2 processes)
    make_cache(tmp_path, ids, texts).build(texts, enc1, chunk_size=3, rank=1, world_size=2)
    emb, _ = corpus_embeddings(make_cache(tmp_path, ids, texts), texts, enc0, chunk_size=3, rank=0, world_size=2)
    assert (enc0.calls, enc1.calls) == (2, 2)
    np.testing.assert_array_equal(emb[:, 0], np.arange(10))


def test_cache_refuses_entries_whose_ids_differ(tmp_path):
    ids, texts = ["a", "b"], ["one", "two"]
    cache = make_cache(tmp_path, ids, texts)
    corpus_embeddings(cache, texts, CountingEncoder())
    (cache.dir / "ids.txt").write_text("a\nzzz\n")
    with pytest.raises(DataError, match="do not match"):
        cache.load()
