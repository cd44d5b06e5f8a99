"""The reliability battery: every script meets bad input with a one-line error naming file, line and
field (exit code 2), never a traceback. Skipped-and-counted cases are checked on the loaders that
every script shares (their counts go into each stage's summary)."""
import runpy
import sys
from collections import Counter

import pytest

from embed.data import load_corpus
from tests.conftest import REPO

SCRIPTS = ["gen_vllm.py", "mine_faiss.py", "train.py", "eval_mteb.py"]
GOOD_DOC = '{"_id": "d1", "title": "T", "text": "proteins fold"}'

CORPUS_CASES = {
    "invalid_json": ([GOOD_DOC, '{"_id": "d2", "text": '], ["corpus.jsonl:2", "invalid JSON"]),
    "missing_id": ([GOOD_DOC, '{"text": "no id"}'], ["corpus.jsonl:2", "'_id'"]),
    "duplicate_ids": ([GOOD_DOC, GOOD_DOC], ["corpus.jsonl:2", "'_id'", "duplicate"]),
    "non_utf8": ([GOOD_DOC, b'{"_id": "d2", "text": "\xff\xfe"}'], ["corpus.jsonl:2", "UTF-8"]),
}


def beir(tmp_path, corpus_lines, qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\n"):
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True, exist_ok=True)
    (d / "corpus.jsonl").write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in corpus_lines))
    (d / "queries.jsonl").write_text('{"_id": "q1", "text": "how do proteins fold"}\n')
    for split in ("test", "train"):
        (d / "qrels" / f"{split}.tsv").write_text(qrels)
    return d


def recipe(tmp_path, data_dir, model_dir, extra=""):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""run_dir: {tmp_path / 'run'}
model: {{name_or_path: {model_dir}}}
data: {{corpus: {data_dir}, eval: [{data_dir}]}}
mine: {{generated: false, qrels: train}}
train:
  report_to: []
  stages: [{{data: [{data_dir}], num_negatives: 0}}]
{extra}""")
    return path


def stage_argv(script, recipe_path, data_dir, model_dir, tmp_path):
    """eval_mteb.py without a trained run_dir/model is called in its one-model form."""
    if script == "eval_mteb.py":
        return ["--model", model_dir, "--data", data_dir, "--run_dir", tmp_path / "eval"]
    return [recipe_path]


def run_script(script, argv, capsys):
    old = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "scripts" / script), run_name="__main__")
    finally:
        sys.argv = old
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    assert err and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    for needle in needles:
        assert needle in err[-1], (needle, err[-1])


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", list(CORPUS_CASES))
def test_bad_corpus_line(tmp_path, tiny_bert_dir, capsys, script, case):
    lines, needles = CORPUS_CASES[case]
    data = beir(tmp_path, lines)
    argv = stage_argv(script, recipe(tmp_path, data, tiny_bert_dir), data, tiny_bert_dir, tmp_path)
    assert_one_line_error(*run_script(script, argv, capsys), *needles)


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_yaml_key(tmp_path, tiny_bert_dir, capsys, script):
    path = recipe(tmp_path, beir(tmp_path, [GOOD_DOC]), tiny_bert_dir, extra="eval:\n  batchsize: 3\n")
    assert_one_line_error(*run_script(script, [path], capsys), "unknown key 'eval.batchsize'")


@pytest.mark.parametrize("script", SCRIPTS)
def test_wrong_value_type(tmp_path, tiny_bert_dir, capsys, script):
    path = recipe(tmp_path, beir(tmp_path, [GOOD_DOC]), tiny_bert_dir)
    assert_one_line_error(*run_script(script, [path, "--seed", "abc"], capsys), "key 'seed' must be int")


@pytest.mark.parametrize("script", ["mine_faiss.py", "train.py", "eval_mteb.py"])
def test_missing_model_path(tmp_path, capsys, script):
    data = beir(tmp_path, [GOOD_DOC, '{"_id": "d2", "text": "cells divide"}'])
    argv = stage_argv(script, recipe(tmp_path, data, tmp_path / "no_model"), data, tmp_path / "no_model", tmp_path)
    assert_one_line_error(*run_script(script, argv, capsys), "no_model")


def test_missing_generator_path(tmp_path, tiny_bert_dir, capsys):
    path = recipe(tmp_path, beir(tmp_path, [GOOD_DOC]), tiny_bert_dir)
    assert_one_line_error(*run_script("gen_vllm.py", [path, "--gen.model", str(tmp_path / "no_llm"),
                                                     "--gen.round_trip", "none"], capsys), "no_llm")


def test_eval_qrels_naming_unknown_document(tmp_path, tiny_bert_dir, capsys):
    data = beir(tmp_path, [GOOD_DOC], qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tghost\t1\n")
    argv = stage_argv("eval_mteb.py", None, data, tiny_bert_dir, tmp_path)
    assert_one_line_error(*run_script("eval_mteb.py", argv, capsys), "test.tsv:3", "corpus-id", "ghost")


def test_empty_text_is_skipped_and_counted(tmp_path):
    data = beir(tmp_path, [GOOD_DOC, '{"_id": "d2", "title": "", "text": ""}'])
    corpus = load_corpus(str(data))
    assert corpus.ids == ["d1"] and corpus.skipped == Counter(empty_text=1)


BAD_TRAIN_SETTINGS = {
    "temperature_nan": (["--train.temperature", "nan"], "key 'train.temperature' must be a finite number > 0"),
    "temperature_inf": (["--train.temperature", "inf"], "key 'train.temperature' must be a finite number > 0"),
    "logging_steps_0": (["--train.logging_steps", "0"], "key 'train.logging_steps' must be >= 1"),
    "matryoshka_dim_0": (["--model.matryoshka_dims", "[0]"], "key 'model.matryoshka_dims' must list distinct dimensions >= 1"),
    "gradcache_negative": (["--train.gradcache_chunk_size", "-1"], "key 'train.gradcache_chunk_size' must be >= 0"),
    "no_negatives_at_all": (["--train.stages.0.in_batch_negatives", "false", "--train.stages.0.num_negatives", "0"],
                            "key 'train.stages.0.num_negatives' must be >= 1 when in_batch_negatives is false"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN_SETTINGS))
def test_bad_train_setting_is_one_line_error(tmp_path, tiny_bert_dir, capsys, case):
    argv, needle = BAD_TRAIN_SETTINGS[case]
    path = recipe(tmp_path, beir(tmp_path, [GOOD_DOC]), tiny_bert_dir)
    assert_one_line_error(*run_script("train.py", [path, *argv], capsys), needle)
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("field, value", [("pos_scores", ["high"]), ("neg_scores", [None]),
                                          ("neg_scores", [float("nan")]), ("pos_scores", [True])])
def test_train_row_scores_must_be_numbers(tmp_path, tiny_bert_dir, capsys, field, value):
    import json

    good = {"query": "q", "pos_ids": ["d1"], "pos_texts": ["p"], "neg_ids": ["n1"], "neg_texts": ["n"],
            "pos_scores": [0.9], "neg_scores": [0.2]}
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, field: value}) + "\n")
    path = recipe(tmp_path, beir(tmp_path, [GOOD_DOC]), tiny_bert_dir)
    assert_one_line_error(*run_script("train.py", [path, "--train.stages.0.data", f"[{data}]"], capsys),
                          "train.jsonl:2", f"field '{field}'", "finite numbers")


@pytest.mark.parametrize("script", ["gen_vllm.py", "mine_faiss.py", "train.py"])
def test_an_evaluation_data_problem_stops_the_first_stages_not_evaluation(tmp_path, tiny_bert_dir, capsys, script):
    """A judgement of data.eval naming a document the corpus lacks: reported by every stage before
    its work, as the one-line error evaluation would give hours later."""
    data = beir(tmp_path, [GOOD_DOC])
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td404\t1\n")
    code, err = run_script(script, [recipe(tmp_path, data, tiny_bert_dir)], capsys)
    assert_one_line_error(code, err, "qrels/test.tsv:2", "field 'corpus-id'", "unknown id 'd404'")
    assert not (tmp_path / "run" / "queries.jsonl").exists() and not (tmp_path / "run" / "model").exists()
