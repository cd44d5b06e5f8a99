"""The embedded demo domain: stdlib code search, split by module, docstrings only ever as queries."""
from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import pytest

from embed.cli import run_main
from embed.data import load_corpus, load_qrels, load_queries, resolve_data_path
from embed.datasets import stdlib_code as demo_corpus
from embed.datasets.stdlib_code import (
    OUTPUT_FILES,
    SUMMARY_FILE,
    build_stdlib_code_search,
    first_sentence,
    is_heldout,
    iter_stdlib_modules,
    stdlib_dir,
    strip_docstrings,
)
from embed.errors import ConfigError

ALL_FILES = OUTPUT_FILES + (SUMMARY_FILE,)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_qrels(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


# ---------------------------------------------------------------- the real standard library
@pytest.fixture(scope="module")
def stdlib_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("stdlib_code")
    return out, build_stdlib_code_search(out)


def test_two_builds_are_byte_identical(stdlib_build, tmp_path):
    out, _ = stdlib_build
    build_stdlib_code_search(tmp_path)
    for name in ALL_FILES:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_no_top_level_package_on_both_sides(stdlib_build):
    out, summary = stdlib_build
    train = {row["_id"].split(".")[0] for row in read_rows(out / "train/corpus.jsonl")}
    test = {row["_id"].split(".")[0] for row in read_rows(out / "test/corpus.jsonl")}
    assert train and test and not train & test
    seed, fraction = summary["params"]["seed"], summary["params"]["heldout_fraction"]
    assert all(is_heldout(pkg, fraction, seed) for pkg in test)
    assert not any(is_heldout(pkg, fraction, seed) for pkg in train)


def test_no_docstring_text_in_any_document(stdlib_build):
    """Every stdlib docstring, read independently of the builder, is absent from every document."""
    out, _ = stdlib_build
    blob = "\0".join(row["text"] for split in ("train", "test")
                     for row in read_rows(out / split / "corpus.jsonl"))
    docstrings = set()
    for _, path in iter_stdlib_modules(stdlib_dir()):
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                text = ast.get_docstring(node, clean=False)
                if text and len(text.strip()) >= 40:   # shorter ones ("Return self.") may be code too
                    docstrings.add(text.strip())
    assert len(docstrings) > 1000
    assert [d for d in docstrings if d in blob] == []
    queries = [row["text"] for row in read_rows(out / "test/queries.jsonl")]
    assert [q for q in queries if q in blob] == []


def test_qrels_name_existing_queries_and_documents(stdlib_build):
    out, _ = stdlib_build
    rows = read_qrels(out / "test/qrels/test.tsv")
    assert rows[0] == ["query-id", "corpus-id", "score"]
    doc_ids = {row["_id"] for row in read_rows(out / "test/corpus.jsonl")}
    query_ids = {row["_id"] for row in read_rows(out / "test/queries.jsonl")}
    judged = {qid for qid, _, _ in rows[1:]}
    assert all(did in doc_ids and score == "1" for _, did, score in rows[1:])
    assert judged == query_ids
    assert len(set(map(tuple, rows[1:]))) == len(rows) - 1


def test_summary_counts_match_the_files(stdlib_build):
    out, summary = stdlib_build
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    train = read_rows(out / "train/corpus.jsonl")
    test = read_rows(out / "test/corpus.jsonl")
    assert summary["train_docs"] == len(train) == 600
    assert summary["test_docs"] == len(test) <= 2000
    assert summary["test_queries"] == len(read_rows(out / "test/queries.jsonl")) == 300
    assert summary["qrels"] == len(read_qrels(out / "test/qrels/test.tsv")) - 1
    positives = {did for _, did, _ in read_qrels(out / "test/qrels/test.tsv")[1:]}
    assert summary["test_distractors"] == len(test) - len(positives)
    assert summary["modules_seen"] == \
        summary["modules_train"] + summary["modules_heldout"] + summary["parse_failures"]
    assert all(len(row["text"]) <= 2000 and row["title"] == "" for row in train + test)
    all_ids = [row["_id"] for row in train + test]
    assert len(all_ids) == len(set(all_ids))


def test_loads_with_the_pipeline_readers(stdlib_build, monkeypatch):
    out, summary = stdlib_build
    test = load_corpus(str(out / "test"))
    queries = load_queries(str(out / "test"))
    qrels = load_qrels(str(out / "test/qrels/test.tsv"), corpus_ids=test.ids, query_ids=queries)
    assert (len(test), len(queries), sum(map(len, qrels.values()))) == \
        (summary["test_docs"], summary["test_queries"], summary["qrels"])
    assert len(load_corpus(str(out / "train"))) == summary["train_docs"]
    # `builtin:stdlib-code/...` resolves to this build (the defaults match, so nothing is rebuilt).
    monkeypatch.setenv("EMBED_DEMO_DIR", str(out))
    assert resolve_data_path("builtin:stdlib-code/test") == str(out / "test")


def test_cli_prints_the_summary(stdlib_build, capsys):
    out, summary = stdlib_build
    demo_corpus.main([str(out)])
    assert json.loads(capsys.readouterr().out) == summary


def test_cli_user_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: demo_corpus.main([str(tmp_path), "--max_test_queries", "0"]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: max_test_queries must be a positive integer or None, got 0"]


# ---------------------------------------------------------------- a small synthetic source tree
ALPHA = '''
def parse_header(line):
    """Split a header line
    into its name and value.

    Long description that is never part of a query.
    """
    def helper(part):
        """Nested helper docstring that must vanish."""
        return part.strip()
    name, _, value = line.partition(":")
    return helper(name), helper(value)


class Box:
    """A box."""

    def __init__(self, size):
        """Create a box with the given size."""
        self.size = size
        self.items = []

    def volume_of_box(self):
        """Return the volume of the box in litres."""
        side = self.size
        return side * side * side


def tiny():
    """Do nothing at all here."""
    return 1
'''

BETA = '''
def volume_of_box(self):
    """A different docstring for the same code."""
    side = self.size
    return side * side * side


def combine(a, b):
    """Combine two values into a tuple."""
    pair = (a, b)
    return pair
'''

PKG_SUB = '''
def load_settings(path):
    """Read the settings file at the given path."""
    with open(path) as f:
        return f.read()
'''

PRIVATE = '''
def secret_function(x):
    """Private modules are not part of the corpus."""
    y = x
    return y
'''


@pytest.fixture
def source_tree(tmp_path):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "notpkg").mkdir()
    (root / "alpha.py").write_text(ALPHA)
    (root / "beta.py").write_text(BETA)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "sub.py").write_text(PKG_SUB)
    (root / "_private.py").write_text(PRIVATE)
    (root / "test" / "__init__.py").write_text("")
    (root / "test" / "test_alpha.py").write_text(PRIVATE.replace("secret_function", "in_test_dir"))
    (root / "notpkg" / "loose.py").write_text(PRIVATE.replace("secret_function", "not_in_package"))
    (root / "broken.py").write_text("def f(:\n    pass\n")
    (root / "latin.py").write_bytes(b"x = '\xe9t\xe9'\n")           # Latin-1 bytes, no coding cookie
    return root


def _seed_holding_out_alpha_only() -> int:
    """A seed whose 50% split holds out `alpha` and keeps `beta` and `pkg` for training."""
    return next(s for s in range(1000) if is_heldout("alpha", 0.5, s)
                and not is_heldout("beta", 0.5, s) and not is_heldout("pkg", 0.5, s))


def test_synthetic_tree_documents_queries_and_counts(source_tree, tmp_path):
    seed = _seed_holding_out_alpha_only()
    summary = build_stdlib_code_search(tmp_path / "out", heldout_fraction=0.5, seed=seed,
                                       source_root=source_tree)
    out = tmp_path / "out"
    test = {row["_id"]: row["text"] for row in read_rows(out / "test/corpus.jsonl")}
    train = {row["_id"]: row["text"] for row in read_rows(out / "train/corpus.jsonl")}
    queries = {row["_id"]: row["text"] for row in read_rows(out / "test/queries.jsonl")}

    assert summary["parse_failures"] == 2
    assert sorted(summary["parse_failure_files"]) == ["broken.py: SyntaxError", "latin.py: SyntaxError"]
    assert summary["modules_seen"] == 6             # alpha beta broken latin pkg pkg.sub
    assert summary["docs_too_short"] == 1           # tiny()
    assert summary["duplicates_skipped"] == 1       # beta.volume_of_box repeats alpha's code
    assert summary["query_rejected_dunder_method"] == 1
    assert set(test) == {"alpha.parse_header", "alpha.Box.__init__", "alpha.Box.volume_of_box"}
    assert set(train) == {"beta.combine", "pkg.sub.load_settings"}
    # First sentence of the first paragraph, across the line break; never the docstring in the code.
    assert queries == {"q:alpha.parse_header": "Split a header line into its name and value.",
                       "q:alpha.Box.volume_of_box": "Return the volume of the box in litres."}
    assert "helper(part)" in test["alpha.parse_header"]
    assert all('"""' not in text and "docstring" not in text for text in {**test, **train}.values())
    assert read_qrels(out / "test/qrels/test.tsv")[1:] == [
        ["q:alpha.Box.volume_of_box", "alpha.Box.volume_of_box", "1"],
        ["q:alpha.parse_header", "alpha.parse_header", "1"]]


def test_caps_keep_positives_and_drop_distractors(source_tree, tmp_path):
    seed = _seed_holding_out_alpha_only()
    summary = build_stdlib_code_search(tmp_path, heldout_fraction=0.5, seed=seed, source_root=source_tree,
                                       max_test_queries=1, max_test_docs=1, max_train_docs=1)
    test_ids = {row["_id"] for row in read_rows(tmp_path / "test/corpus.jsonl")}
    judged = {did for _, did, _ in read_qrels(tmp_path / "test/qrels/test.tsv")[1:]}
    assert (summary["test_queries"], summary["test_docs"], summary["train_docs"]) == (1, 1, 1)
    assert test_ids == judged and summary["test_distractors"] == 0


def test_rebuild_only_when_parameters_or_files_change(source_tree, tmp_path, monkeypatch):
    first = build_stdlib_code_search(tmp_path, source_root=source_tree)

    def must_not_run(*args, **kwargs):
        raise AssertionError("rebuilt although a matching build exists")

    monkeypatch.setattr(demo_corpus, "extract", must_not_run)
    assert build_stdlib_code_search(tmp_path, source_root=source_tree) == first
    with pytest.raises(AssertionError, match="rebuilt"):
        build_stdlib_code_search(tmp_path, source_root=source_tree, seed=1)
    (tmp_path / "test/queries.jsonl").unlink()
    with pytest.raises(AssertionError, match="rebuilt"):
        build_stdlib_code_search(tmp_path, source_root=source_tree)


def test_bad_parameters_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="heldout_fraction"):
        build_stdlib_code_search(tmp_path, heldout_fraction=1.0)
    with pytest.raises(ConfigError, match="max_train_docs"):
        build_stdlib_code_search(tmp_path, max_train_docs=0)


# ---------------------------------------------------------------- helpers
def test_strip_docstrings_removes_nested_ones_and_keeps_bodies_valid():
    tree = ast.parse('def f():\n    """Doc."""\n    class C:\n        """Inner."""\n    return C\n')
    strip_docstrings(tree.body[0])
    code = ast.unparse(tree)
    assert "Doc." not in code and "Inner." not in code
    ast.parse(code)                                  # an emptied class body became `pass`
    assert "pass" in code


@pytest.mark.parametrize("docstring, expected", [
    ("Return the answer.\n\nDetails.", "Return the answer."),
    ("Return the\n    answer over two lines. Second sentence.", "Return the answer over two lines."),
    ("No final period here", "No final period here"),
    ("Version 3.11 changed this. More.", "Version 3.11 changed this."),
])
def test_first_sentence(docstring, expected):
    assert first_sentence(docstring) == expected
