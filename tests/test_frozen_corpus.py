"""Stages with `frozen_documents`: the loss, the candidates mining writes for it, and train.py end to end."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from embed.config import build_config
from embed.errors import ConfigError
from embed.recipe import Recipe
from embed.training.frozen_corpus import FrozenCorpusDistillation
from tests.conftest import ddp_launcher, toy_train_rows, write_jsonl
from tests.test_train import ENV, train_cmd, without_dropout


def kl_by_hand(q, corpus, rows, teacher, temperature, teacher_temperature):
    """KL(teacher || student) for one query, written out: student over the whole corpus, teacher
    over the listed rows only."""
    logits = [sum(a * b for a, b in zip(q, d)) / temperature for d in corpus]
    log_z = math.log(sum(math.exp(x) for x in logits))
    t = [s / teacher_temperature for s in teacher]
    t_z = math.log(sum(math.exp(x) for x in t))
    return sum(math.exp(x - t_z) * ((x - t_z) - (logits[r] - log_z)) for x, r in zip(t, rows))


def test_loss_is_the_teacher_student_kl_with_padding_ignored():
    corpus = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    loss = FrozenCorpusDistillation(torch.tensor(corpus), temperature=0.5, teacher_temperature=0.2)
    q = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    rows = torch.tensor([[2, 0, -1], [1, 2, 0]])
    scores = torch.tensor([[0.9, 0.1, 123.0], [0.7, 0.6, 0.2]])
    expected = (kl_by_hand([0.8, 0.6], corpus, [2, 0], [0.9, 0.1], 0.5, 0.2)
                + kl_by_hand([0.0, 1.0], corpus, [1, 2, 0], [0.7, 0.6, 0.2], 0.5, 0.2)) / 2
    assert loss(q, rows, scores).item() == pytest.approx(expected, rel=1e-5)


def test_with_a_lexical_half_the_student_scores_with_the_whole_vector():
    """A model with a lexical channel attached: the documents' lexical half (sparse) joins the dot
    product, as in the model's own score."""
    dense = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    lexical = [[0.0, 0.5, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]]
    loss = FrozenCorpusDistillation(torch.tensor(dense), 0.5, 0.2, corpus_lexical=torch.tensor(lexical).to_sparse())
    q = [0.8, 0.6, 0.0, 1.0, 2.0]
    whole = [d + x for d, x in zip(dense, lexical)]
    expected = kl_by_hand(q, whole, [2, 0], [0.9, 0.1], 0.5, 0.2)
    assert loss(torch.tensor([q]), torch.tensor([[2, 0]]), torch.tensor([[0.9, 0.1]])).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="dimensions"):
        loss(torch.tensor([q[:2]]), torch.tensor([[2, 0]]), torch.tensor([[0.9, 0.1]]))


def test_loss_gradient_moves_the_query_towards_the_teachers_favourite():
    corpus = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0]]), dim=-1).requires_grad_(True)
    FrozenCorpusDistillation(corpus, 0.05, 0.05)(q, torch.tensor([[1, 0]]), torch.tensor([[0.9, 0.1]])).backward()
    assert q.grad[0, 1] < 0 < q.grad[0, 0]  # descending the gradient raises the score of row 1


def test_a_query_without_candidates_is_refused():
    loss = FrozenCorpusDistillation(torch.eye(2), 0.05, 0.05)
    with pytest.raises(ValueError, match="at least one candidate"):
        loss(torch.ones(1, 2), torch.tensor([[-1]]), torch.tensor([[0.0]]))


@pytest.mark.parametrize("keys, message", [
    ({"train.stages": [{"frozen_documents": True, "distill_weight": 1.0}], "mine.teacher_candidates": 8},
     "distill_weight"),
    ({"train.stages": [{"frozen_documents": True}]}, "mine.teacher_candidates > 0"),
    ({"train.stages": [{"frozen_documents": True}], "mine.teacher_candidates": 8}, "would learn nothing"),
    ({"train.stages": [{"frozen_documents": True}], "mine.teacher_candidates": 8, "mine.teacher_bm25_weight": 0.3,
      "model.matryoshka_dims": [16]},
     "matryoshka"),
])
def test_settings_a_frozen_stage_cannot_use_are_config_errors(tmp_path, keys, message):
    import yaml

    tree = {}
    for dotted, value in keys.items():
        node = tree
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"run_dir": "runs/x", **tree}))
    cfg = build_config(Recipe, [str(path)])
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


# ---------------------------------------------------------------- train.py end to end
@pytest.fixture
def frozen_setup(tmp_path):
    """A BEIR corpus holding every document of 48 toy rows, and the rows with teacher candidates."""
    rows = toy_train_rows(48, negatives=2)
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = [{"_id": i, "title": "", "text": t} for r in rows
            for i, t in zip(r["pos_ids"] + r["neg_ids"], r["pos_texts"] + r["neg_texts"])]
    write_jsonl(folder / "corpus.jsonl", docs)
    for r in rows[:40]:
        r["cand_ids"], r["cand_scores"] = r["pos_ids"] + r["neg_ids"], [0.9, 0.5, 0.3]
    return folder, rows, len(docs)


def frozen_cmd(model, data, run_dir, corpus, cache, *extra, launcher=(sys.executable,)):
    return train_cmd(model, data, run_dir, "--data.corpus", str(corpus), "--train.stages.0.frozen_documents", "true",
                     "--mine.teacher_candidates", "3", "--mine.teacher_bm25_weight", "0.3", "--mine.cache_dir", str(cache), "--train.max_steps", "3",
                     # both pinned: auto would pick bf16 on a CPU with native bf16, and the corpus is
                     # encoded at mining's precision (its cache is shared with mining)
                     "--train.precision", "fp32", "--mine.encode_precision", "fp32", *extra, launcher=launcher)


def test_frozen_stage_trains_queries_against_the_cached_corpus_with_or_without_a_channel(tmp_path, tiny_bert_dir, frozen_setup):
    corpus, rows, n_docs = frozen_setup
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = subprocess.run(frozen_cmd(tiny_bert_dir, data, tmp_path / "run", corpus, tmp_path / "cache"),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"frozen documents: {n_docs} x 32" in out.stdout and "(encoded, fp32" in out.stdout
    assert "documents frozen, the teacher's candidates as targets" in out.stdout
    assert "'no_teacher_candidates': 8" in out.stdout  # the 8 rows without candidates are counted, not trained
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss"] > 0
    trained = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    base = load_file(str(tiny_bert_dir / "model.safetensors"))
    assert not np.allclose(trained["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])

    # With a lexical channel attached: the cached dense half is reused (not re-encoded), the
    # channel's document vectors join it, and the cache entry still holds the network's vectors alone.
    again = subprocess.run(frozen_cmd(tiny_bert_dir, data, tmp_path / "run2", corpus, tmp_path / "cache",
                                      "--model.lexical_weight_rule", "fixed", "--model.lexical_weight", "0.3",
                                      "--model.lexical_dim", "64"),
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"frozen documents: {n_docs} x 32 + a lexical half of 64 buckets" in again.stdout
    assert "(cache hit, fp32" in again.stdout
    (entry,) = [p.parent for p in (tmp_path / "cache").rglob("embeddings.npy")]
    assert np.load(entry / "embeddings.npy").shape == (n_docs, 32)


def test_a_candidate_outside_the_corpus_is_one_line_naming_it(tmp_path, tiny_bert_dir, frozen_setup):
    corpus, rows, _ = frozen_setup
    rows[3]["cand_ids"][1] = "not_in_corpus"
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = subprocess.run(frozen_cmd(tiny_bert_dir, data, tmp_path / "run", corpus, tmp_path / "cache"),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "candidate 'not_in_corpus'" in out.stderr and "is not a document of data.corpus" in out.stderr


def test_two_processes_end_where_one_process_on_the_joined_batch_ends(tmp_path, tiny_bert_dir, frozen_setup):
    """2 processes x 8 queries (each encodes half of the frozen corpus; gradients all-reduced) end
    where 1 process x 16 queries ends."""
    corpus, rows, _ = frozen_setup
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    model = without_dropout(tiny_bert_dir, tmp_path / "model")
    ddp = subprocess.run(frozen_cmd(model, data, tmp_path / "ddp", corpus, tmp_path / "cache_ddp",
                                    "--mine.cache_chunk_size", "16", launcher=ddp_launcher()),
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "x 2 process(es)" in ddp.stdout and "(global): 16 = 8 per device x 2" in ddp.stdout
    one = subprocess.run(frozen_cmd(model, data, tmp_path / "one", corpus, tmp_path / "cache_one",
                                    "--train.per_device_batch_size", "16"),
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=2e-5, rtol=0, err_msg=key)

