"""Shared fixtures: tiny random-init models built from configs (no hub), and the shared data."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))  # `import embed` without installation too

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every cache of this test session (and of the scripts it starts) goes to a folder of its own, removed
# when the session ends: tests never read nor fill the user's cache, and parallel test workers
# (pytest -n), each its own process, never share one. Set at import, before test modules copy
# os.environ for their subprocesses; this file is imported twice per process (as pytest's conftest
# and as tests.conftest), hence the process id.
if os.environ.get("EMBED_TEST_CACHE_PID") != str(os.getpid()):
    os.environ["EMBED_CACHE_DIR"] = tempfile.mkdtemp(prefix="embed-test-cache-")
    os.environ["EMBED_TEST_CACHE_PID"] = str(os.getpid())
TEST_CACHE = Path(os.environ["EMBED_CACHE_DIR"])


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


def free_port() -> int:
    """A TCP port nobody listens on now, for a test's torch.distributed rendezvous: fixed ports
    collide when test workers run side by side (pytest -n)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_launcher() -> tuple[str, ...]:
    """`accelerate launch` of 2 CPU processes (gloo), meeting on a free port. accelerate's `--cpu
    --num_processes 2` starts one process without MPI; `--multi_gpu` without CUDA starts two."""
    return (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()))


def make_tiny_bert(path: Path, seed: int = 0, **settings) -> Path:
    """A 2-layer, 32-wide random BERT with the bundled MiniLM tokenizer, saved in our layout."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from embed.modeling.model import EmbeddingModel, EncoderSettings
    from embed.modeling.pooling import build_pooling
    from embed.runtime import resolve_model

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        attn_implementation="sdpa")
    backbone = BertModel(config, add_pooling_layer=False)
    s = EncoderSettings(max_length=64, query_max_length=32, **settings)
    model = EmbeddingModel(backbone, tokenizer, build_pooling(s.pooling, 32), s)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert") / "model")


@pytest.fixture
def scifact_dir() -> Path:
    path = SHARED_DATA / "scifact"
    if not (path / "corpus.jsonl").is_file():
        pytest.skip(f"real data not found at {path} (../shared/data is absent on a fresh clone)")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def toy_train_rows(n: int = 48, negatives: int = 2):
    """Small synthetic training rows in the training-set schema (distinct texts)."""
    topics = ["protein folding", "gene expression", "cell division", "immune response", "neural networks",
              "tax law", "contract law", "river ecology", "solar cells", "quantum dots", "graph theory", "vaccines"]
    rows = []
    for i in range(n):
        t = topics[i % len(topics)]
        rows.append({"query": f"what about {t} case {i}?", "query_id": f"q{i}",
                     "pos_ids": [f"d{i}"], "pos_texts": [f"document {i} discusses {t} in detail"],
                     "neg_ids": [f"n{i}_{k}" for k in range(negatives)],
                     "neg_texts": [f"unrelated note {i}-{k} on {topics[(i + k + 3) % len(topics)]}" for k in range(negatives)]})
    return rows
