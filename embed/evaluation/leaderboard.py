"""What an evaluation publishes: the comparison table and chart, the model card, the results PR folder.

The table puts our base and trained scores next to published MTEB figures with their source, so a
reader sees at a glance what training bought and where that sits among known models. The model
card carries mteb metadata (tags, model-index) and the results folder mirrors the public
results repository (embeddings-benchmark/results), so submitting is a copy and a pull request.
Nothing is uploaded unless the caller passes an explicit repository AND a token.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

from embed.errors import ConfigError
from embed.evaluation.mteb_eval import is_local_task, task_label
from embed.io import save_figure

# Published nDCG@10 x 100 on the MTEB tasks (test split), keyed by lower-case dataset name.
PUBLISHED_SOURCE = "MTEB leaderboard results (embeddings-benchmark/results), as collected in ../shared/FIELD.md"
PUBLISHED_MODELS = ["BM25s", "all-MiniLM-L6-v2", "bge-small-en-v1.5", "bge-base-en-v1.5",
                    "e5-mistral-7b-instruct", "NV-Embed-v2"]
PUBLISHED_NOTES = {"NV-Embed-v2": "not zero-shot (trained on these datasets' training splits)"}
PUBLISHED_NDCG10 = {
    "scifact": dict(zip(PUBLISHED_MODELS, [68.7, 64.5, 71.3, 74.4, 76.4, 80.1])),
    "nfcorpus": dict(zip(PUBLISHED_MODELS, [32.1, 31.6, 34.3, 37.4, 38.6, 45.0])),
}
OFFICIAL_RESULTS_REPO = "https://github.com/embeddings-benchmark/results"


def published_scores(dataset: str) -> dict[str, float]:
    return PUBLISHED_NDCG10.get(dataset.lower(), {})


def _pct(value: Optional[float]) -> str:
    return "" if value is None or math.isnan(value) else f"{100 * value:.2f}"


# ---------------------------------------------------------------- table and charts
# what training adds, as columns: (header, minuend role, subtrahend role)
DELTAS = [("Δ", "trained", "base"), ("Δ vs untrained_hybrid", "trained", "untrained_hybrid")]
# what a column is, where its name does not say it
ROLE_NOTES = {"sparse": "the lexical half exported with the model (`model/sparse`, a SparseEncoder): binary "
                        "presence x IDF over data.corpus, untrained, the same for the base and the trained model"}


def results_table(scores: dict[str, dict[str, float]], roles: dict[str, str], splits: dict[str, str]) -> str:
    """Markdown table: one row per dataset, one column per evaluated model, deltas, published figures.

    `scores` is {role: {dataset: main score (0-1)}}, `roles` is {role: model name}, in column order,
    `splits` is {dataset: evaluated split(s)}. Each of `DELTAS` whose two roles were scored follows
    them: trained - base, and trained - untrained_hybrid (what generation and training add to the
    lexical channel alone).
    """
    datasets = list(dict.fromkeys(d for role in roles for d in scores.get(role, {})))
    refs = [m for m in PUBLISHED_MODELS if any(m in published_scores(d) for d in datasets)]
    deltas = [(header, a, b) for header, a, b in DELTAS if a in roles and b in roles]
    header = ["dataset", "split", *roles, *[h for h, _, _ in deltas],
              *[m + (" †" if m in PUBLISHED_NOTES else "") for m in refs]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for d in datasets:
        row = [d, splits.get(d, ""), *[_pct(scores.get(role, {}).get(d)) for role in roles]]
        for _, a, b in deltas:
            high, low = scores[a].get(d), scores[b].get(d)
            row.append("" if high is None or low is None else f"{100 * (high - low):+.2f}")
        row += [f"{published_scores(d)[m]:.1f}" if m in published_scores(d) else "" for m in refs]
        lines.append("| " + " | ".join(row) + " |")
    notes = ["", "Main score x 100 (nDCG@10 for retrieval). " +
             "; ".join(f"{role} = `{name}`" + (f" ({ROLE_NOTES[role]})" if role in ROLE_NOTES else "")
                       for role, name in roles.items()) + "."]
    if refs:
        notes.append(f"Published columns: {PUBLISHED_SOURCE}.")
        notes += [f"† {m}: {PUBLISHED_NOTES[m]}." for m in refs if m in PUBLISHED_NOTES]
    return "\n".join(lines + notes) + "\n"


def bar_chart(scores: dict[str, dict[str, float]], roles: dict[str, str], path: str | Path) -> None:
    """Grouped bars per dataset (our models), the trained - base delta written over each group,
    published figures as black markers; the legend is one short row above the axes (the model
    names are in results.md)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(d for role in roles for d in scores.get(role, {})))
    width = 0.75 / max(len(roles), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.8 * len(datasets) + 1.5), 4))
    handles = []
    for i, role in enumerate(roles):
        xs = [j + (i - (len(roles) - 1) / 2) * width - 0.05 for j in range(len(datasets))]
        values = [100 * scores.get(role, {}).get(d, float("nan")) for d in datasets]
        bars = ax.bar(xs, values, width, label=role)
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
        handles.append(bars)
    markers = "os^vDP"
    for k, model in enumerate(PUBLISHED_MODELS):  # a column of markers right of each group of bars
        points = [(j + 0.42, published_scores(d)[model]) for j, d in enumerate(datasets) if model in published_scores(d)]
        if points:
            handles.append(ax.scatter(*zip(*points), marker=markers[k % len(markers)], color="black", s=12,
                                      zorder=3, label=model))
    top = max([100 * v for by_d in scores.values() for v in by_d.values() if not math.isnan(v)] + [1.0])
    if {"base", "trained"} <= set(roles):
        for j, d in enumerate(datasets):
            base, trained = scores["base"].get(d), scores["trained"].get(d)
            if base is not None and trained is not None:
                delta = 100 * (trained - base)
                ax.text(j, 1.1 * top, f"Δ {delta:+.2f}", ha="center", fontsize=9, fontweight="bold",
                        color="tab:green" if delta >= 0 else "tab:red")
    ax.set_ylim(0, 1.22 * top)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("main score x 100 (nDCG@10)")
    ax.legend(handles=handles, fontsize=6, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False,
              handlelength=1.0, columnspacing=0.8)
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def per_query_chart(per_query: dict[str, dict[str, dict[str, float]]], path: str | Path,
                    before: str = "base", after: str = "trained") -> bool:
    """Per dataset, each judged query's nDCG@10 change `before` -> `after`, sorted: how many queries
    training helped or hurt, and by how much, which one mean hides. False (nothing written) when no
    dataset has per-query scores of both roles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d, by_role in per_query.items() if {before, after} <= set(by_role)]
    if not datasets:
        return False
    fig, axes = plt.subplots(len(datasets), 1, figsize=(6, 2.6 * len(datasets)), squeeze=False)
    for ax, d in zip(axes[:, 0], datasets):
        old, new = per_query[d][before], per_query[d][after]
        changes = sorted(100 * (new.get(q, 0.0) - old.get(q, 0.0)) for q in sorted(set(old) | set(new)))
        colors = ["tab:red" if c < 0 else "tab:green" for c in changes]
        ax.bar(range(len(changes)), changes, width=1.0, color=colors)
        ax.axhline(0, color="black", linewidth=0.6)
        up, down = sum(c > 0 for c in changes), sum(c < 0 for c in changes)
        mean = sum(changes) / max(len(changes), 1)
        ax.set_title(f"{d}: {up} queries better, {down} worse, {len(changes) - up - down} unchanged "
                     f"(mean {mean:+.2f})", fontsize=9)
        ax.set_ylabel(f"nDCG@10 x 100\n{after} - {before}", fontsize=8)
        ax.set_xlabel("judged queries, sorted by change", fontsize=8)
        ax.set_xlim(-0.5, max(len(changes), 1) - 0.5)
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    return True


# ---------------------------------------------------------------- model card
def model_card(name: str, base_name: str, scores: dict[str, dict], tasks: list, table: str, *,
               load_path: str, settings, package_modules: tuple[str, ...] = (),
               lexical=None, dense_package_modules: tuple[str, ...] = ()) -> str:
    """README.md for the trained model: hub metadata with an mteb model-index, usage and results.

    `load_path`: what the usage snippet loads, the model folder (or the hub id it is pushed to).
    `settings`: the model's EncoderSettings; the snippet applies its prompts and its two token
    limits (sentence-transformers keeps one `max_seq_length`, so the snippet sets the query limit
    before encoding queries, the document limit before documents).
    `package_modules`: sentence-transformers module classes of this project (latent-attention head,
    lexical channel). sentence-transformers imports such a class only with `trust_remote_code=True`;
    the card says so and why, since the flag stays off everywhere else and a user must opt in knowingly.
    `lexical`: the model's lexical channel (embed.modeling.lexical) when the folder holds its halves as
    plain folders (embed.modeling.sparse_export); the card then also shows them for a vector database:
    `dense/` + `sparse/` fused as (1 - w) * dense cosine + w * sparse dot for a TF-IDF channel,
    `dense/` + BM25 (bm25s) for a BM25 channel. `dense_package_modules`: package modules of `dense/`
    (a latent-attention head), as `package_modules`."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = []
    for task in tasks:
        label = task_label(task)
        metrics = scores.get(label)
        if metrics is None:
            continue
        local = is_local_task(task)
        results.append(EvalResult(
            task_type="text-retrieval" if task.metadata.type == "Retrieval" else task.metadata.type,
            task_name=task.metadata.type,
            dataset_type=f"local/{label}" if local else task.metadata.dataset["path"],
            dataset_name=f"{'BEIR folder' if local else 'MTEB'} {label}",
            dataset_split=",".join(task.eval_splits), dataset_revision=task.metadata.revision,
            metric_type=task.metadata.main_score, metric_value=round(100 * metrics["main_score"], 2),
            source_name="MTEB", source_url="https://github.com/embeddings-benchmark/mteb"))
    on_hub = "/" in base_name and not base_name.startswith("local/")
    data = ModelCardData(model_name=name, base_model=base_name if on_hub else None,
                         library_name="sentence-transformers", pipeline_tag="sentence-similarity",
                         tags=["mteb", "sentence-transformers", "feature-extraction", "sentence-similarity"],
                         eval_results=results or None)
    trust = ", trust_remote_code=True" if package_modules else ""
    usage_note = (f"This model uses `{', '.join(package_modules)}`, module class(es) of the "
                  "mteb-domain-embeddings package: install it first. sentence-transformers imports a module "
                  "class from outside its own package only with `trust_remote_code=True`, which also lets a "
                  "backbone config run code it names (this model's `config.json` names none). The project's own "
                  "loader, `embed.modeling.model.EmbeddingModel.from_pretrained`, needs no flag.\n\n") if package_modules else ""
    usage = (
        f"{usage_note}```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        f"model = SentenceTransformer({json.dumps(load_path)}{trust})\n"
        f"model.max_seq_length = {settings.query_max_length}  # the query token limit it was trained with\n"
        'queries = model.encode_query(["..."])  # the query prompt\n'
        f"model.max_seq_length = {settings.max_length}  # the document token limit\n"
        'documents = model.encode_document(["..."])\n'
        "scores = model.similarity(queries, documents)\n```\n")
    if lexical is not None:
        halves = (_dense_bm25_usage if lexical.scheme == "bm25" else _dense_sparse_usage)(
            load_path, settings, lexical, dense_package_modules)
        one_vector = ("### One vector: dense and lexical halves concatenated (what MTEB scores)\n\n" +
                      ("A query and a document get different lexical halves: encode with `encode_query` and "
                       "`encode_document` (plain `encode` encodes documents), and score by dot product (the "
                       "model's `similarity`).\n\n" if lexical.scheme == "bm25" else ""))
        usage = one_vector + usage + "\n" + halves
    body = (f"# {name}\n\nAn embedding model fine-tuned contrastively from `{base_name}` with "
            "mteb-domain-embeddings; the recipe it was trained with is saved in its run folder "
            "(`train_config.yaml`).\n\n## Usage\n\nThe query and document prompts are saved with the model and "
            f"applied by `prompt_name`:\n\n- query prompt: `{settings.query_prompt!r}`\n- document prompt: "
            f"`{settings.document_prompt!r}`\n\n{usage}\n## Evaluation (mteb)\n\n{table}")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").content  # no templating: prompts may hold braces


def _half_paths(load_path: str) -> tuple[str, str, str]:
    """(opening lines, dense/ path, sparse/ path) as the snippet spells them: a folder's subfolders, or a
    hub id's from a local copy (sentence-transformers takes no subfolder)."""
    if Path(load_path).is_dir():
        return "", json.dumps(f"{load_path}/dense"), json.dumps(f"{load_path}/sparse")
    opening = f"from huggingface_hub import snapshot_download\n\nfolder = snapshot_download({json.dumps(load_path)})\n"
    return opening, 'f"{folder}/dense"', 'f"{folder}/sparse"'


def _dense_trust(dense_package_modules: tuple[str, ...], needs_ending: str, plain_note: str) -> tuple[str, str]:
    """(the loading argument, the card's sentence) for `dense/`: a package module (latent-attention head)
    needs this package and the opt-in; otherwise `plain_note`."""
    if not dense_package_modules:
        return "", plain_note
    return ", trust_remote_code=True", (f" `dense/` uses `{', '.join(dense_package_modules)}` (see above): it needs "
                                        f"this package and `trust_remote_code=True`{needs_ending}")


def _dense_bm25_usage(load_path: str, settings, channel, dense_package_modules: tuple[str, ...]) -> str:
    """The card's second use for a BM25 channel: the dense half in a vector database, BM25 from the
    database's own BM25 (or bm25s, shown), fused as the one vector scores."""
    opening, dense_path, _ = _half_paths(load_path)
    trust, trust_note = _dense_trust(dense_package_modules, ".", " `dense/` needs neither this package nor "
                                     "`trust_remote_code`.")
    return (
        "### Dense + BM25, for a search engine with both\n\n"
        "The dense half is also saved as a plain sentence-transformers folder, `dense/` (same prompts), and "
        f"the lexical half is BM25 (Lucene's, k1 = {channel.k1}, b = {channel.b}, English stopwords and "
        "Snowball stemmer, as bm25s tokenises) divided by the query's best possible score, the sum of its "
        "terms' IDF: any engine with BM25 serves it." + trust_note +
        f" Fuse with the model's lexical weight w = {channel.weight}: `(1 - w) * dense_cosine + w * bm25 / "
        "bound`. This is the one-vector model's score up to hashing collisions and truncation (the model's "
        f"lexical half reads a text's first {channel.max_length or settings.max_length} tokens).\n\n"
        f"```python\n{opening}import bm25s\nimport numpy as np\nimport Stemmer\n"
        "from sentence_transformers import SentenceTransformer\n\n"
        'documents = ["..."]\nqueries = ["..."]\n'
        f"dense = SentenceTransformer({dense_path}{trust})\n"
        f"dense.max_seq_length = {settings.query_max_length}\n"
        "query_dense = dense.encode_query(queries)\n"
        f"dense.max_seq_length = {settings.max_length}\n"
        "document_dense = dense.encode_document(documents)\n\n"
        'stemmer = Stemmer.Stemmer("english")\n'
        'corpus_tokens = bm25s.tokenize(documents, stopwords="en", stemmer=stemmer)\n'
        f"bm25 = bm25s.BM25(k1={channel.k1}, b={channel.b})  # Lucene's BM25, bm25s' default\n"
        "bm25.index(corpus_tokens)\n"
        "document_frequency = np.zeros(len(corpus_tokens.vocab))\n"
        "for ids in corpus_tokens.ids:\n"
        "    document_frequency[np.unique(ids)] += 1\n"
        "idf = np.log(1 + (len(documents) - document_frequency + 0.5) / (document_frequency + 0.5))\n"
        "lexical = []\n"
        'for words in bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, return_ids=False):\n'
        "    terms = sorted({w for w in words if w in corpus_tokens.vocab})  # each known term once\n"
        "    bound = idf[[corpus_tokens.vocab[t] for t in terms]].sum()\n"
        "    lexical.append(bm25.get_scores(terms) / bound if terms else np.zeros(len(documents)))\n"
        f"w = {channel.weight}\n"
        "scores = (1 - w) * dense.similarity(query_dense, document_dense).numpy() + w * np.array(lexical)\n```\n")


def _dense_sparse_usage(load_path: str, settings, channel, dense_package_modules: tuple[str, ...]) -> str:
    """The card's second use for a TF-IDF channel: the exported halves in a vector database that stores a
    dense and a sparse vector per document and fuses their scores."""
    weight = channel.weight
    opening, dense_path, sparse_path = _half_paths(load_path)
    trust, trust_note = _dense_trust(dense_package_modules, "; `sparse/` needs neither.",
                                     " Neither folder needs this package or `trust_remote_code`.")
    return (
        "### Two vectors: dense + sparse, for a vector database\n\n"
        "The two halves are also saved as plain sentence-transformers folders inside this one: `dense/` (the "
        "dense half, same prompts) and `sparse/`, a `SparseEncoder` giving one weight per vocabulary token "
        "(the token's IDF over the domain corpus if the text holds it, L2-normalised; no prompt)." + trust_note +
        f" Store both vectors and fuse the scores with the model's lexical weight w = {weight}: "
        "`(1 - w) * dense_cosine + w * sparse_dot`. This is the one-vector model's score up to how the "
        "lexical half counts: the sparse vector weighs a repeated token once and has no hashing collisions, "
        "the one-vector model's lexical half counts repetitions (1 + log count) in hashed buckets.\n\n"
        f"```python\n{opening}from sentence_transformers import SentenceTransformer, SparseEncoder\n\n"
        f"dense = SentenceTransformer({dense_path}{trust})\n"
        f"sparse = SparseEncoder({sparse_path})\n"
        f"dense.max_seq_length = {settings.query_max_length}\n"
        'query_dense = dense.encode_query(["..."])\n'
        f"dense.max_seq_length = {settings.max_length}\n"
        'document_dense = dense.encode_document(["..."])\n'
        'query_sparse = sparse.encode_query(["..."])  # sparse tensors: the non-zero entries go to the database\n'
        'document_sparse = sparse.encode_document(["..."])\n'
        f"w = {weight}\n"
        "scores = ((1 - w) * dense.similarity(query_dense, document_dense)\n"
        "          + w * sparse.similarity(query_sparse, document_sparse))\n```\n")


# ---------------------------------------------------------------- results repository
def prepare_submission(results_root: str | Path, model_name: str, revision: str, out_dir: str | Path,
                       official_tasks: set[str]) -> list[Path]:
    """Copy the model's results on official MTEB tasks into `out_dir` in the results-repo layout.

    Local BEIR folders are not leaderboard tasks, so they are left out. Returns the copied files.
    """
    folder_name = model_name.replace("/", "__").replace(" ", "_")
    src = Path(results_root) / "results" / folder_name / revision
    dst = Path(out_dir) / "results" / folder_name / revision
    files = [p for p in sorted(src.glob("*.json")) if p.stem in official_tasks]
    if not files:
        return []
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in files + [src / "model_meta.json"]:
        shutil.copy2(path, dst / path.name)
        copied.append(dst / path.name)
    return copied


def push_to_hub(model_dir: str | Path, repo_id: str, token: Optional[str]) -> str:
    """Upload the model folder (weights, prompts, model card) to `repo_id`; needs an explicit token."""
    if not token:
        raise ConfigError("--push_to_hub needs a Hugging Face token in the HF_TOKEN environment variable")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    commit = api.upload_folder(folder_path=str(model_dir), repo_id=repo_id,
                               commit_message="Upload model and mteb results card")
    return commit.commit_url
