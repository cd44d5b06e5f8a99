"""scripts/train.py end to end on a tiny random BERT: smoke run, exact resume after SIGKILL, 2 processes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import REPO, ddp_launcher, toy_train_rows, write_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def train_cmd(model_dir, data, run_dir, *extra, launcher=(sys.executable,)):
    return [*launcher, str(REPO / "scripts" / "train.py"), "--run_dir", str(run_dir),
            "--model.name_or_path", str(model_dir), "--train.stages.0.data", str(data),
            "--train.per_device_batch_size", "8", "--train.stages.0.num_negatives", "1",
            "--train.stages.0.learning_rate", "1.0e-03", "--train.report_to", "[]", "--train.logging_steps", "1",
            *extra]


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (independent of embed.runtime's probe)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("no /proc/cpuinfo flags on this system")


def kill_tree(proc):
    """SIGKILL a launcher and every process under it (torchrun starts its workers in their own sessions)."""
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def weights(run_dir):
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


@pytest.fixture
def toy_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", toy_train_rows(48, negatives=2))


def test_smoke_run_writes_model_and_summary(tmp_path, tiny_bert_dir, toy_data):
    from sentence_transformers import SentenceTransformer

    run_dir = tmp_path / "run"
    out = subprocess.run(train_cmd(tiny_bert_dir, toy_data, run_dir, "--train.max_steps", "3"),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = "precision: bf16 autocast on CPU" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "precision: fp32"
    assert "total train batch size (global): 8" in out.stdout and expected in out.stdout
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss"] > 0
    emb = SentenceTransformer(str(run_dir / "model"), device="cpu").encode(["a query"])
    assert emb.shape == (1, 32)
    assert not np.allclose(weights(run_dir)["embeddings.word_embeddings.weight"],
                           load_file(str(tiny_bert_dir / "model.safetensors"))["embeddings.word_embeddings.weight"])


def test_distillation_trains_on_scored_rows_and_counts_the_rest(tmp_path, tiny_bert_dir):
    """train.stages.0.distill_weight: rows carrying mining's teacher scores train with the KL term,
    rows without them are skipped and counted; the term changes the weights the run ends with."""
    rows = toy_train_rows(48, negatives=2)
    for i, row in enumerate(rows[:40]):
        row["pos_scores"], row["neg_scores"] = [0.9], [0.6 - 0.01 * (i % 7), 0.2]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    runs = {}
    for weight in ("0.0", "2.0"):
        runs[weight] = tmp_path / f"run_{weight}"
        out = subprocess.run(train_cmd(tiny_bert_dir, data, runs[weight], "--train.max_steps", "3",
                                       "--train.stages.0.distill_weight", weight),
                             env=ENV, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    assert "'no_teacher_scores': 8" in out.stdout
    a, b = weights(runs["0.0"]), weights(runs["2.0"])
    assert not np.allclose(a["embeddings.word_embeddings.weight"], b["embeddings.word_embeddings.weight"])

    unscored = write_jsonl(tmp_path / "plain.jsonl", toy_train_rows(48, negatives=2))
    out = subprocess.run(train_cmd(tiny_bert_dir, unscored, tmp_path / "bad", "--train.stages.0.distill_weight", "1"),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "cannot fill one global batch" in out.stderr and "no_teacher_scores" in out.stderr
    assert "Traceback" not in out.stderr


def test_sigkill_then_resume_gives_identical_weights(tmp_path, tiny_bert_dir, toy_data):
    steps = ["--train.max_steps", "60", "--train.save_steps", "5", "--train.stages.0.epochs", "20"]
    reference = tmp_path / "uninterrupted"
    out = subprocess.run(train_cmd(tiny_bert_dir, toy_data, reference, *steps), env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_bert_dir, toy_data, killed, *steps), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((killed / "checkpoints").glob("*/trainer_state.json")):
        time.sleep(0.05)
    time.sleep(0.3)  # land somewhere between checkpoints
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model").exists()

    out = subprocess.run(train_cmd(tiny_bert_dir, toy_data, killed, *steps), env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming from" in out.stdout
    a, b = weights(reference), weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)
    assert json.loads((killed / "train_summary.json").read_text())["steps"] == 60


def run_in_process(argv, capsys):
    """scripts/train.py in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    import runpy

    old = sys.argv
    sys.argv = ["train.py", *map(str, argv[2:])]
    try:
        runpy.run_path(str(REPO / "scripts" / "train.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_rerun_under_other_settings_never_replaces_the_model(tmp_path, tiny_bert_dir, toy_data, capsys):
    """Issue 16's A/B reproduction: run A trains 3 steps; run B asks for 2 in the same run_dir.
    B is refused with one line naming train.max_steps and A's model stays (it used to be replaced
    by the base weights). A changed learning rate or re-mined data is refused the same way, and
    the same command again has nothing to do."""
    run_dir = tmp_path / "run"
    out = subprocess.run(train_cmd(tiny_bert_dir, toy_data, run_dir, "--train.max_steps", "3"), env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    trained = weights(run_dir)
    base = load_file(str(tiny_bert_dir / "model.safetensors"))
    assert not np.allclose(trained["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])
    assert not (run_dir / "checkpoints").exists(), "a finished run keeps no checkpoint"
    assert "checkpoints" in json.loads((run_dir / "train_summary.json").read_text())

    code, _, err = run_in_process(train_cmd(tiny_bert_dir, toy_data, run_dir, "--train.max_steps", "2"), capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert "(train.max_steps changed)" in err
    code, _, err = run_in_process(train_cmd(tiny_bert_dir, toy_data, run_dir, "--train.max_steps", "3",
                                            "--train.stages.0.learning_rate", "5.0e-04"), capsys)
    assert code == 2 and "(train.stages.0.learning_rate changed)" in err
    code, out_text, _ = run_in_process(train_cmd(tiny_bert_dir, toy_data, run_dir, "--train.max_steps", "3",
                                                 "--train.logging_steps", "2"), capsys)
    assert code == 0 and "already trained with these settings" in out_text  # cadence keys may change
    Path(toy_data).write_text(Path(toy_data).read_text().replace("case 1?", "case one?"))
    code, _, err = run_in_process(train_cmd(tiny_bert_dir, toy_data, run_dir, "--train.max_steps", "3"), capsys)
    assert code == 2 and "train.stages.0.data.0.sha256" in err
    after = weights(run_dir)
    for key in trained:
        np.testing.assert_array_equal(after[key], trained[key], err_msg=key)


def without_dropout(model_dir, target):
    """A copy of the tiny model with dropout off: 1 and 2 processes then compute the same function."""
    import shutil

    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (target / "config.json").write_text(json.dumps(config))
    return target


def uninterrupted_reference(tiny_bert_dir, tmp_path, steps):
    """(dropout-free model, 48-row train.jsonl, run_dir of one process trained on the joined batch of
    16 without interruption): what a multi-process run that was killed and resumed must end at."""
    from tests.conftest import toy_train_rows, write_jsonl

    model = without_dropout(tiny_bert_dir, tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", toy_train_rows(48, negatives=2))
    single = tmp_path / "single"
    out = subprocess.run(train_cmd(model, data, single, *steps, "--train.per_device_batch_size", "16"),
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return model, data, single


@pytest.mark.slow
def test_two_cpu_processes_train_the_weights_of_one_process_on_the_joined_batch(tmp_path, tiny_bert_dir, toy_data):
    """2 processes x 8 queries (in-batch negatives gathered across processes, gradients all-reduced)
    end where 1 process x 16 queries ends: same loss, same weights (float tolerance)."""
    model = without_dropout(tiny_bert_dir, tmp_path / "model")
    steps = ["--train.max_steps", "2", "--train.precision", "fp32"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    out = subprocess.run(train_cmd(model, toy_data, ddp, *steps, launcher=ddp_launcher()),
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "x 2 process(es)" in out.stdout and "(global): 16 = 8 per device x 2" in out.stdout
    one = subprocess.run(train_cmd(model, toy_data, single, *steps, "--train.per_device_batch_size", "16"),
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = weights(ddp), weights(single)
    base = load_file(str(model / "model.safetensors"))
    assert not np.allclose(a["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=2e-5, rtol=0, err_msg=key)
    losses = [json.loads((run / "train_summary.json").read_text())["final_loss"] for run in (ddp, single)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_stage_sources_keep_only_the_named_origins(tmp_path):
    """stages.*.sources picks rows by their `source`: 'qrels' matches 'qrels:<path>'; none left is an error."""
    from collections import Counter

    from embed.errors import DataError
    from embed.recipe import StageConfig
    from embed.training.stages import load_stage_data

    rows = toy_train_rows(8, negatives=1)
    for i, row in enumerate(rows):
        row["source"] = "generated" if i % 2 else "qrels:beir/qrels/train.tsv"
    data = str(write_jsonl(tmp_path / "train.jsonl", rows))
    judged = load_stage_data(StageConfig(data=[data], sources=["qrels"]), str(tmp_path), Counter())
    assert [e.query_id for e in judged] == ["q0", "q2", "q4", "q6"]
    every = load_stage_data(StageConfig(data=[data]), str(tmp_path), Counter())
    assert len(every) == 8
    with pytest.raises(DataError, match="stage 'stage1': no rows .* from sources \\['cloze'\\]"):
        load_stage_data(StageConfig(data=[data], sources=["cloze"]), str(tmp_path), Counter())
