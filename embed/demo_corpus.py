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

    python -m embed.demo_corpus OUT_DIR [--max_train_docs 600] [--max_test_queries 300] ...
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
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when the extraction rules change, so an old build on disk is not reused.
BUILDER_VERSION = 1

# Directories never walked: test suites, GUI and demo code, vendored or generated trees.
EXCLUDED_DIRS = {
    "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages",
    "lib-dynload", "__pycache__",
}
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
    module: str
    code: str
    query: str | None       # first docstring sentence when it makes a usable query


# ---------------------------------------------------------------------------------------------
# Finding modules
# ---------------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


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
            yield ".".join(parts), here / name


def is_heldout(module: str, fraction: float, seed: int) -> bool:
    """Stable split by the module's top-level package (sha256, not hash(): that one is salted)."""
    unit = module.split(".")[0]
    digest = hashlib.sha256(f"{seed}\0{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# ---------------------------------------------------------------------------------------------
# Turning a module into documents
# ---------------------------------------------------------------------------------------------
def _docstring_node(body: list[ast.stmt]) -> ast.Expr | None:
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def strip_docstrings(node: ast.AST) -> None:
    """Remove every docstring in the subtree in place (nested functions and classes included)."""
    for sub in ast.walk(node):
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if _docstring_node(sub.body) is not None:
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
        docs.append(CodeDoc(qualname, module, code, query))
    return docs


# ---------------------------------------------------------------------------------------------
# Writing BEIR files
# ---------------------------------------------------------------------------------------------
def write_text_atomic(path: Path, text: str) -> None:
    """tmp file in the same folder + os.replace: a crash never leaves a half file that looks whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _corpus_rows(docs: list[CodeDoc]) -> list[dict]:
    # No title: CodeSearchNet's corpus is the code alone, and a qualified name would add the
    # module and class context that the code itself does not show.
    return [{"_id": d.doc_id, "title": "", "text": d.code} for d in docs]


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------
def _capped_sample(items: list, cap: int | None, rng: random.Random) -> list:
    if cap is None or len(items) <= cap:
        return list(items)
    return rng.sample(items, cap)


def _summary_matches(path: Path, params: dict) -> dict | None:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if summary.get("params") == params and summary.get("python_version") == sys.version:
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
) -> dict:
    """Write out_dir/train and out_dir/test (BEIR) and out_dir/build_summary.json; return the summary.

    max_train_docs caps the generation/mining corpus; max_test_queries caps the test queries;
    max_test_docs caps the test corpus (the queries' documents plus held-out distractors).
    None means no cap. A summary on disk with the same parameters and interpreter is returned as is.
    """
    out = Path(out_dir)
    params = BuildParams(heldout_fraction, max_train_docs, max_test_queries, max_test_docs,
                         max_doc_chars, seed)
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    params_dict = {"builder_version": BUILDER_VERSION, **asdict(params)}
    summary_path = out / "build_summary.json"
    if (existing := _summary_matches(summary_path, params_dict)) is not None:
        return existing

    # ---- extract documents from every module, deduplicating code across the whole library ----
    stats: Counter = Counter()
    parse_failures: list[str] = []
    root = stdlib_dir()
    heldout_modules, train_modules = set(), set()
    train_docs, test_docs = [], []
    seen_code, seen_ids = set(), Counter()
    for module, path in iter_stdlib_modules(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError) as exc:   # ValueError covers undecodable bytes
            parse_failures.append(f"{path.relative_to(root)}: {type(exc).__name__}")
            continue
        heldout = is_heldout(module, heldout_fraction, seed)
        (heldout_modules if heldout else train_modules).add(module)
        for doc in module_documents(module, tree, max_doc_chars, stats):
            if doc.code in seen_code:
                stats["duplicates_skipped"] += 1
                continue
            seen_code.add(doc.code)
            seen_ids[doc.doc_id] += 1
            if seen_ids[doc.doc_id] > 1:            # same name redefined (property setters, if/else)
                doc.doc_id = f"{doc.doc_id}#{seen_ids[doc.doc_id]}"
            (test_docs if heldout else train_docs).append(doc)

    # ---- test split: queries grouped by text (identical first lines share their documents) ----
    rng = random.Random(seed)
    groups: dict[str, list[CodeDoc]] = {}
    for doc in test_docs:
        if doc.query is not None:
            groups.setdefault(doc.query, []).append(doc)
    chosen_texts = set(_capped_sample(sorted(groups), max_test_queries, rng))
    positives = {d.doc_id for text in chosen_texts for d in groups[text]}
    distractor_pool = [d for d in test_docs if d.doc_id not in positives]
    room = None if max_test_docs is None else max(0, max_test_docs - len(positives))
    distractors = {d.doc_id for d in _capped_sample(distractor_pool, room, rng)}
    test_corpus = [d for d in test_docs if d.doc_id in positives or d.doc_id in distractors]
    queries, qrels = [], []
    for text in sorted(chosen_texts, key=lambda t: groups[t][0].doc_id):
        qid = f"q:{groups[text][0].doc_id}"
        queries.append({"_id": qid, "text": text})
        qrels.extend(f"{qid}\t{d.doc_id}\t1\n" for d in groups[text])

    # ---- train split: generation should see the kind of function the test queries describe ----
    # Documented functions first (in seeded random order), then the rest, up to the cap.
    order = list(range(len(train_docs)))
    rng.shuffle(order)
    order.sort(key=lambda i: train_docs[i].query is None)
    keep = set(order if max_train_docs is None else order[:max_train_docs])
    train_corpus = [d for i, d in enumerate(train_docs) if i in keep]

    # ---- write files; the summary goes last and marks the build complete ----
    write_text_atomic(out / "train" / "corpus.jsonl", _jsonl(_corpus_rows(train_corpus)))
    write_text_atomic(out / "test" / "corpus.jsonl", _jsonl(_corpus_rows(test_corpus)))
    write_text_atomic(out / "test" / "queries.jsonl", _jsonl(queries))
    write_text_atomic(out / "test" / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n" + "".join(qrels))
    summary = {
        "params": params_dict,
        "python_version": sys.version,
        "stdlib": str(root),
        "modules_seen": len(heldout_modules) + len(train_modules) + len(parse_failures),
        "modules_heldout": len(heldout_modules),
        "modules_train": len(train_modules),
        "parse_failures": len(parse_failures),
        "parse_failure_files": parse_failures,
        "docs_extracted": len(train_docs) + len(test_docs),
        **{k: stats[k] for k in sorted(stats)},
        "duplicates_skipped": stats["duplicates_skipped"],
        "train_docs_available": len(train_docs),
        "train_docs": len(train_corpus),
        "test_docs_available": len(test_docs),
        "test_queries_available": len(groups),
        "test_queries": len(queries),
        "test_docs": len(test_corpus),
        "test_distractors": len(distractors),
        "qrels": len(qrels),
    }
    write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
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
    args = vars(parser.parse_args(argv))
    summary = build_stdlib_code_search(args.pop("out_dir"), **args)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
