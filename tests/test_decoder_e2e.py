"""Issue 6 end to end: a tiny random Llama, bidirectional + LoRA + latent attention + GradCache +
Matryoshka through scripts/train.py, then scripts/eval_mteb.py loads and scores what it saved, at the
same Matryoshka dims (the full width included, issue 16)."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, toy_train_rows, write_jsonl
from tests.test_train import ENV

TINY_BEIR = REPO / "tests" / "fixtures" / "tiny_beir"


def make_tiny_llama(path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from embed.modeling.model import EmbeddingModel, EncoderSettings
    from embed.modeling.pooling import build_pooling
    from embed.runtime import resolve_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))  # any local tokenizer: ids are ids
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id)
    settings = EncoderSettings(pooling="latent_attention", max_length=64, query_max_length=32,
                               query_prompt="Instruct: find the passage\nQuery: ", pool_prompt_tokens=False,
                               bidirectional=True)
    model = EmbeddingModel(LlamaModel(config), tokenizer,
                           build_pooling("latent_attention", 32, num_latents=8, num_heads=2, head_dim=8), settings)
    model.save_pretrained(path)
    return path


@pytest.mark.slow
def test_decoder_lora_latent_gradcache_matryoshka_train_and_eval(tmp_path):
    base = make_tiny_llama(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", toy_train_rows(32, negatives=1))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--run_dir", str(run_dir),
           "--model.name_or_path", str(base), "--model.bidirectional", "true",
           "--model.lora.enabled", "true", "--model.lora.r", "4", "--model.lora.alpha", "8",
           "--model.matryoshka_dims", "[16, 32]", "--train.gradcache_chunk_size", "4",
           "--train.stages.0.data", str(data), "--train.stages.0.num_negatives", "1",
           "--train.per_device_batch_size", "8", "--train.max_steps", "3", "--train.report_to", "[]",
           "--train.stages.0.learning_rate", "1.0e-03"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads((run_dir / "model" / "embed_config.json").read_text())["settings"]
    assert saved["pooling"] == "latent_attention" and saved["bidirectional"] is True
    assert json.loads((run_dir / "model" / "config.json").read_text()).get("is_causal") is False
    assert not list((run_dir / "model").glob("adapter_*")), "LoRA must be merged into the saved weights"

    # the same Matryoshka dims as training, the last one the full width (as the nemotron recipes list 2048)
    eval_dir = tmp_path / "eval"
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_mteb.py"), "--model", str(run_dir / "model"),
                          "--data", str(TINY_BEIR), "--run_dir", str(eval_dir), "--model.matryoshka_dims", "[16, 32]"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((eval_dir / "eval_summary.json").read_text())
    scores = summary["ndcg_at_10"]["tiny_beir"]
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    by_dim = summary["matryoshka_main_score"]
    assert set(by_dim) == {"16", "32"} and summary["embedding_dim"] == {"model": 32}
    assert by_dim["32"]["tiny_beir"]["model"] == scores["model"]  # the full width is the untruncated embedding
    assert "| tiny_beir (32d, full) |" in (eval_dir / "eval" / "results.md").read_text()
