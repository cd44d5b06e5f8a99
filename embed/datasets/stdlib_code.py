"""The embedded default domain: code search over the running interpreter's standard library.

`make demo` must run offline on any machine, so its corpus is built from the one code base every
Python install carries. It mirrors MTEB's CodeSearchNet retrieval: a document is the source of a
function or method with every docstring removed, a query is the first sentence of that function's
docstring, and the single relevant document is the function it came from.

Two BEIR folders come out:
  train/corpus.jsonl                         documents of the non-held-out modules (query
                                             generation and negative mining read only these)
  test/corpus.jsonl, queries.jsonl, qrels/test.tsv
                                             documents and docstring queries of held-out modules

Modules are split, not functions, by a stable hash of their top-level package, so neither a
module nor a sibling in the same package appears on both sides. The build is deterministic (same
interpreter => byte-identical files) and idempotent (a matching build_summary.json is reused).

    python -m embed.datasets.stdlib_code OUT_DIR [--max_train_docs 600] [--max_test_queries 300] ...
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from embed.cli import run_main
from embed.errors import ConfigError, DataError
from embed.io import write_text_atomic
from embed.runtime import cache_dir

# Bump when the extraction rules change, so an old build on disk is not reused.
BUILDER_VERSION = 1

# Directories never walked: test suites, GUI and demo code, vendored or generated trees.
EXCLUDED_DIRS = {
    "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages",
    "lib-dynload", "__pycache__",
}
OUTPUT_FILES = ("train/corpus.jsonl", "test/corpus.jsonl", "test/queries.jsonl", "test/qrels/test.tsv")
SUMMARY_FILE = "build_summary.json"
MIN_CODE_LINES = 3        # CodeSearchNet drops functions shorter than three lines
MIN_QUERY_WORDS = 4       # shorter first lines ("Return self.") describe nothing searchable
MAX_QUERY_CHARS = 300
SIGNATURE_LIKE = re.compile(r"^[\w.]+\(.*\)\s*(->|$)")   # "S.find(sub) -> int": a signature, not a query
FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(?=\s|$)")


@dataclass(frozen=True)
class BuildParams:
    heldout_fraction: float = 0.2
    max_train_docs: int | None = 600
    max_test_queries: int | None = 300
    max_test_docs: int | None = 2000
    max_doc_chars: int = 2000
    seed: int = 0


@dataclass
class CodeDoc:
    doc_id: str
    code: str
    query: str | None       # first docstring sentence when it makes a usable query


# ---------------------------------------------------------------------------------------------
# Finding modules
# ---------------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_build_dir() -> str:
    """Where `builtin:stdlib-code` is built: $EMBED_DEMO_DIR, else under the cache root (one per interpreter)."""
    return os.environ.get("EMBED_DEMO_DIR") or str(cache_dir(f"stdlib-code-{sys.implementation.cache_tag}"))


def iter_stdlib_modules(root: Path):
    """Yield (module name, path) for public pure-Python stdlib modules, in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        # Descend only into public packages; sort so the walk order never depends on the filesystem.
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in EXCLUDED_DIRS and not d.startswith("_") and (here / d / "__init__.py").is_file()
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            stem = name[:-3]
            if stem != "__init__" and stem.startswith("_"):
                continue
            parts = list(here.relative_to(root).parts) + ([] if stem == "__init__" else [stem])
            yield ".".join(parts) or root.name, here / name   # a package root's own __init__


def is_heldout(module: str, fraction: float, seed: int) -> bool:
    """Stable split by the module's top-level package (sha256, not hash(): that one is salted)."""
    unit = module.split(".")[0]
    digest = hashlib.sha256(f"{seed}\0{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# ---------------------------------------------------------------------------------------------
# Turning a module into documents
# ---------------------------------------------------------------------------------------------
def _has_docstring(body: list[ast.stmt]) -> bool:
    first = body[0] if body else None
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
        and isinstance(first.value.value, str)


def strip_docstrings(node: ast.AST) -> None:
    """Remove every docstring in the subtree in place (nested functions and classes included)."""
    for sub in ast.walk(node):
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if _has_docstring(sub.body):
                sub.body = sub.body[1:] or [ast.Pass()]


def first_sentence(docstring: str) -> str:
    """First sentence of the first paragraph, whitespace collapsed (CodeSearchNet's query)."""
    paragraph = []
    for line in docstring.strip().splitlines():
        if not line.strip():
            break
        paragraph.append(line.strip())
    text = " ".join(" ".join(paragraph).split())
    match = FIRST_SENTENCE.match(text)
    return match.group(1) if match else text


def query_reject_reason(name: str, sentence: str) -> str | None:
    if name.startswith("__") and name.endswith("__"):
        return "dunder_method"       # CodeSearchNet drops constructors and standard methods
    if name.startswith("test"):
        return "test_function"
    if len(sentence.split()) < MIN_QUERY_WORDS:
        return "short_docstring"
    if len(sentence) > MAX_QUERY_CHARS:
        return "long_docstring"
    if SIGNATURE_LIKE.match(sentence):
        return "signature_docstring"
    return None


def _functions(body: list[ast.stmt], prefix: str):
    """(qualified name, node) of functions and methods defined at module or class level.

    Module-level `if`/`try` blocks are entered (platform-specific definitions live there);
    function bodies are not: a nested helper is part of its enclosing function's document.
    """
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}.{stmt.name}", stmt
        elif isinstance(stmt, ast.ClassDef):
            yield from _functions(stmt.body, f"{prefix}.{stmt.name}")
        elif isinstance(stmt, ast.If):
            yield from _functions(stmt.body + stmt.orelse, prefix)
        elif isinstance(stmt, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            handlers = [s for h in stmt.handlers for s in h.body]
            yield from _functions(stmt.body + handlers + stmt.orelse + stmt.finalbody, prefix)


def truncate_lines(code: str, max_chars: int) -> str:
    """Cut at the last line break within max_chars, so a document never ends mid-token."""
    if len(code) <= max_chars:
        return code
    cut = code.rfind("\n", 0, max_chars + 1)
    return code[: cut if cut > 0 else max_chars]


def module_documents(module: str, tree: ast.Module, max_chars: int, stats: Counter) -> list[CodeDoc]:
    docs = []
    for qualname, node in _functions(tree.body, module):
        docstring = ast.get_docstring(node, clean=True)
        strip_docstrings(node)
        code = ast.unparse(node)
        if code.count("\n") + 1 < MIN_CODE_LINES:
            stats["docs_too_short"] += 1
            continue
        if len(code) > max_chars:
            code = truncate_lines(code, max_chars)
            stats["docs_truncated"] += 1
        query = None
        if docstring:
            sentence = first_sentence(docstring)
            reason = query_reject_reason(node.name, sentence)
            if reason is None and sentence in code:
                reason = "docstring_text_in_code"   # the answer would be a string match
            if reason:
                stats[f"query_rejected_{reason}"] += 1
            else:
                query = sentence
        docs.append(CodeDoc(qualname, code, query))
    return docs


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _corpus_rows(docs: list[CodeDoc]) -> list[dict]:
    # No title: CodeSearchNet's corpus is the code alone, and a qualified name would add the
    # module and class context that the code itself does not show.
    return [{"_id": d.doc_id, "title": "", "text": d.code} for d in docs]


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------
@dataclass
class Extraction:
    train_docs: list[CodeDoc]
    test_docs: list[CodeDoc]
    modules_train: int
    modules_heldout: int
    parse_failures: list[str]
    stats: Counter


def extract(root: Path, params: BuildParams) -> Extraction:
    """Documents of every module, split by module, with identical code kept once library-wide.

    Dropping duplicates across the split too means no test document has a twin in training.
    """
    stats = Counter(duplicates_skipped=0, docs_too_short=0, docs_truncated=0)
    parse_failures: list[str] = []
    modules = Counter()
    train_docs, test_docs = [], []
    seen_code, seen_ids = set(), Counter()
    for module, path in iter_stdlib_modules(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError) as exc:   # ValueError covers undecodable bytes
            parse_failures.append(f"{path.relative_to(root)}: {type(exc).__name__}")
            continue
        heldout = is_heldout(module, params.heldout_fraction, params.seed)
        modules[heldout] += 1
        for doc in module_documents(module, tree, params.max_doc_chars, stats):
            if doc.code in seen_code:
                stats["duplicates_skipped"] += 1
                continue
            seen_code.add(doc.code)
            seen_ids[doc.doc_id] += 1
            if seen_ids[doc.doc_id] > 1:            # same name redefined (property setters, if/else)
                doc.doc_id = f"{doc.doc_id}#{seen_ids[doc.doc_id]}"
            (test_docs if heldout else train_docs).append(doc)
    return Extraction(train_docs, test_docs, modules[False], modules[True], parse_failures, stats)


def select_test(test_docs: list[CodeDoc], params: BuildParams):
    """(corpus, queries, qrels lines, queries available, distractors) of the held-out side.

    Queries with identical text (one first line on several overrides) become one query judging
    all their documents relevant. The corpus is the chosen queries' documents plus a seeded
    sample of other held-out documents as distractors, up to max_test_docs.
    """
    rng = random.Random(f"{params.seed}:test")
    groups: dict[str, list[CodeDoc]] = {}
    for doc in test_docs:
        if doc.query is not None:
            groups.setdefault(doc.query, []).append(doc)
    chosen = set(_capped_sample(sorted(groups), params.max_test_queries, rng))
    positives = {d.doc_id for text in chosen for d in groups[text]}
    pool = [d for d in test_docs if d.doc_id not in positives]
    room = None if params.max_test_docs is None else max(0, params.max_test_docs - len(positives))
    distractors = {d.doc_id for d in _capped_sample(pool, room, rng)}
    corpus = [d for d in test_docs if d.doc_id in positives or d.doc_id in distractors]
    queries, qrels = [], []
    for text in sorted(chosen, key=lambda t: groups[t][0].doc_id):
        qid = f"q:{groups[text][0].doc_id}"
        queries.append({"_id": qid, "text": text})
        qrels.extend(f"{qid}\t{d.doc_id}\t1\n" for d in groups[text])
    return corpus, queries, qrels, len(groups), len(distractors)


def select_train(train_docs: list[CodeDoc], params: BuildParams) -> list[CodeDoc]:
    """Documented functions first (seeded order), then the rest, up to max_train_docs.

    Generation should see the kind of function the test queries describe: public, documented.
    """
    order = list(range(len(train_docs)))
    random.Random(f"{params.seed}:train").shuffle(order)
    order.sort(key=lambda i: train_docs[i].query is None)
    keep = set(order[: params.max_train_docs])
    return [d for i, d in enumerate(train_docs) if i in keep]


def _capped_sample(items: list, cap: int | None, rng: random.Random) -> list:
    if cap is None or len(items) <= cap:
        return list(items)
    return rng.sample(items, cap)


def _existing_build(out: Path, params: dict) -> dict | None:
    """The summary of a complete earlier build with the same parameters and interpreter, if any."""
    try:
        summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    complete = all((out / name).is_file() for name in OUTPUT_FILES)
    if complete and summary.get("params") == params and summary.get("python_version") == sys.version:
        return summary
    return None


def build_stdlib_code_search(
    out_dir: str | os.PathLike,
    *,
    heldout_fraction: float = 0.2,
    max_train_docs: int | None = 600,
    max_test_queries: int | None = 300,
    max_test_docs: int | None = 2000,
    max_doc_chars: int = 2000,
    seed: int = 0,
    source_root: str | os.PathLike | None = None,
) -> dict:
    """Write out_dir/train and out_dir/test (BEIR) and out_dir/build_summary.json; return the summary.

    max_train_docs caps the generation/mining corpus; max_test_queries caps the test queries;
    max_test_docs caps the test corpus (the queries' documents plus held-out distractors).
    None means no cap. source_root swaps the interpreter's stdlib for another Python source tree.
    A summary on disk with the same parameters and interpreter is returned as is.
    """
    out = Path(out_dir)
    root = Path(source_root) if source_root is not None else stdlib_dir()
    params = BuildParams(heldout_fraction, max_train_docs, max_test_queries, max_test_docs,
                         max_doc_chars, seed)
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    for name in ("max_train_docs", "max_test_queries", "max_test_docs", "max_doc_chars"):
        value = getattr(params, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive integer or None, got {value}")
    if not root.is_dir():
        raise DataError(f"{root}: source_root is not a directory")
    params_dict = {"builder_version": BUILDER_VERSION, **asdict(params), "source_root": str(root)}
    if (existing := _existing_build(out, params_dict)) is not None:
        return existing

    found = extract(root, params)
    test_corpus, queries, qrels, queries_available, distractors = select_test(found.test_docs, params)
    train_corpus = select_train(found.train_docs, params)

    # The summary goes last: its presence marks the build complete.
    train_corpus_file, test_corpus_file, test_queries_file, test_qrels_file = OUTPUT_FILES
    write_text_atomic(out / train_corpus_file, _jsonl(_corpus_rows(train_corpus)))
    write_text_atomic(out / test_corpus_file, _jsonl(_corpus_rows(test_corpus)))
    write_text_atomic(out / test_queries_file, _jsonl(queries))
    write_text_atomic(out / test_qrels_file, "query-id\tcorpus-id\tscore\n" + "".join(qrels))
    summary = {
        "params": params_dict,
        "python_version": sys.version,
        "modules_seen": found.modules_train + found.modules_heldout + len(found.parse_failures),
        "modules_heldout": found.modules_heldout,
        "modules_train": found.modules_train,
        "parse_failures": len(found.parse_failures),
        "parse_failure_files": found.parse_failures,
        "docs_extracted": len(found.train_docs) + len(found.test_docs),
        **dict(sorted(found.stats.items())),
        "train_docs_available": len(found.train_docs),
        "train_docs": len(train_corpus),
        "test_docs_available": len(found.test_docs),
        "test_queries_available": queries_available,
        "test_queries": len(queries),
        "test_docs": len(test_corpus),
        "test_distractors": distractors,
        "qrels": len(qrels),
    }
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def _optional_int(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def main(argv: list[str] | None = None) -> None:
    defaults = BuildParams()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--heldout_fraction", type=float, default=defaults.heldout_fraction)
    parser.add_argument("--max_train_docs", type=_optional_int, default=defaults.max_train_docs,
                        help="documents for generation and mining ('none': all)")
    parser.add_argument("--max_test_queries", type=_optional_int, default=defaults.max_test_queries)
    parser.add_argument("--max_test_docs", type=_optional_int, default=defaults.max_test_docs,
                        help="test corpus size: the queries' documents plus distractors")
    parser.add_argument("--max_doc_chars", type=int, default=defaults.max_doc_chars)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--source_root", default=None,
                        help="Python source tree to index instead of this interpreter's stdlib")
    args = vars(parser.parse_args(argv))
    summary = build_stdlib_code_search(args.pop("out_dir"), **args)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run_main(main)
