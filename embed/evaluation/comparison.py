"""The systems one evaluation compares, each network loaded and run over the data once.

Roles (columns of results.md, keys of eval_summary.json), for a trained run:
  base              the base model as published: its own saved settings (encoders.load_as_published)
  untrained_hybrid  base + the trained model's lexical channel (same scheme, size, weight and seed;
                    fitted on data.corpus), no generation and no training: what the channel alone gives
  trained           run_dir/model as saved, with its lexical channel if it has one
  trained_dense     the trained model's dense half alone, when it has a channel
  sparse            a TF-IDF channel's lexical half as exported with it (run_dir/model/sparse, a
                    SparseEncoder: binary presence x IDF over data.corpus, embed.modeling.sparse_export);
                    untrained, the same for the base and the trained model
and `model` for a one-model run (`--model`). Roles on the same network form one `Network`: the
dense half is encoded once and the hybrid appends the channel to it (encoders.HybridEncoder).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from embed.data import load_corpus
from embed.errors import ConfigError
from embed.evaluation.encoders import (
    CachedEncoder,
    HybridEncoder,
    SparseAsDense,
    load_as_published,
)
from embed.evaluation.mteb_eval import (
    default_model_name,
    embedding_dim,
    evaluate_model,
    is_local_task,
    model_output_fingerprint,
    per_query_ndcg_at_10,
    task_label,
)
from embed.modeling.lexical import fit_lexical_channel
from embed.modeling.model import (
    EmbeddingModel,
    dense_view,
    load_from_config,
    saved_lexical_channel,
)
from embed.modeling.sparse_export import SPARSE_DIR, has_sparse_half
from embed.runtime import on_terminal, resolve_model

COLUMN_ORDER = ("model", "base", "untrained_hybrid", "trained", "trained_dense", "sparse")
PER_QUERY_ROLES = ("base", "trained")  # the per-query plot: what training changed, query by query


@dataclass
class Network:
    """One network, loaded once, and the roles scored with it: alone (`dense`) and with a lexical
    channel (`hybrid`, the channel built from the loaded model by `channel`)."""

    load: Callable[[], tuple[EmbeddingModel | SparseAsDense, str]]  # the model, and where its settings came from
    dense: Optional[str] = None
    hybrid: Optional[str] = None
    channel: Optional[Callable[[EmbeddingModel], torch.nn.Module]] = None
    matryoshka_dims: list[int] = field(default_factory=list)


@dataclass
class Comparison:
    """Scores of every role: {role: {dataset: {metric: value (0-1)}}} and what goes with them."""

    names: dict[str, str]                                   # role -> name results are filed under
    identities: dict[str, dict] = field(default_factory=dict)
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    matryoshka: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # "dim" -> dataset -> role
    full_dim: dict[str, int] = field(default_factory=dict)   # role -> its embedding size (Matryoshka roles)
    settings: dict[str, Any] = field(default_factory=dict)   # role -> EncoderSettings it was scored with
    per_query: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)   # dataset -> role -> qid
    timings: dict[str, float] = field(default_factory=dict)

    def main_scores(self) -> dict[str, dict[str, float]]:
        return {role: {d: m["main_score"] for d, m in by_d.items()} for role, by_d in self.metrics.items()}


# ---------------------------------------------------------------- which systems
def plan_trained_run(cfg, model_dir: Path, trained_name: str, log=print) -> tuple[list[Network], dict[str, str]]:
    """Networks and role names for run_dir/model against its base model (see the module docstring)."""
    base_path = cfg.eval.base_model or cfg.model.name_or_path
    channel = saved_lexical_channel(model_dir)
    names = {"base": default_model_name(base_path)}

    def load_trained():
        return EmbeddingModel.from_pretrained(
            str(model_dir), attn_implementation=cfg.model.attn_implementation, dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code), "saved with the model"

    base = Network(load=lambda: load_as_published(base_path, cfg.model), dense="base")
    trained = Network(load=load_trained, matryoshka_dims=list(cfg.model.matryoshka_dims))
    if channel is None:
        trained.dense = "trained"
        names["trained"] = trained_name
        return [base, trained], names
    trained.dense, trained.hybrid, trained.channel = "trained_dense", "trained", lambda model: model.lexical
    if cfg.data.corpus:
        base.hybrid = "untrained_hybrid"
        base.channel = lambda model: untrained_channel(model, cfg.data.corpus, channel, log)
        names["untrained_hybrid"] = f"{names['base']}-untrained-hybrid"
    else:
        log("untrained_hybrid not scored: data.corpus is empty (the lexical channel's IDF is fitted on it)")
    names["trained"] = trained_name
    names["trained_dense"] = f"{trained_name}-dense-half"
    if not has_sparse_half(model_dir):
        log(f"sparse not scored: {model_dir} has no {SPARSE_DIR}/ (a {channel.scheme} channel"
            f"{': BM25 itself is its sparse form' if channel.scheme == 'bm25' else ', saved before the export'})")
        return [base, trained], names
    sparse = Network(load=lambda: (SparseAsDense(model_dir / SPARSE_DIR), "exported with the model"), dense="sparse")
    names["sparse"] = f"{trained_name}-sparse-half"
    return [base, trained, sparse], names


def untrained_channel(base: EmbeddingModel, corpus_spec: str, trained_channel, log=print):
    """The trained model's channel rebuilt for the base model: same scheme, buckets, weight, seed and cut,
    fitted on the corpus (what training fits, minus the training)."""
    corpus = load_corpus(corpus_spec)
    log(f"untrained_hybrid: {trained_channel.scheme} lexical channel of {trained_channel.dim} buckets, "
        f"weight {trained_channel.weight}, fitted on {len(corpus)} documents of {corpus_spec}")
    return fit_lexical_channel(base, [corpus.doc_text(i) for i in range(len(corpus))], trained_channel.dim,
                               trained_channel.weight, seed=trained_channel.seed, scheme=trained_channel.scheme,
                               max_length=trained_channel.max_length)


def plan_one_model(cfg) -> tuple[list[Network], dict[str, str]]:
    """One model (`--model`) under the recipe's settings, with its lexical channel if it has one."""
    path = cfg.model.name_or_path
    folder = Path(resolve_model(path))
    has_channel = folder.is_dir() and saved_lexical_channel(folder) is not None
    network = Network(load=lambda: (load_from_config(cfg.model), "recipe"),
                      matryoshka_dims=list(cfg.model.matryoshka_dims))
    if has_channel:
        network.hybrid, network.channel = "model", lambda model: model.lexical
    else:
        network.dense = "model"
    return [network], {"model": default_model_name(path)}


# ---------------------------------------------------------------- Matryoshka
def matryoshka_label(dim: int, full_dim: int) -> str:
    """Table label of a Matryoshka view: the full size is the untruncated embedding, and says so."""
    return f"{dim}d, full" if dim == full_dim else f"{dim}d"


def check_matryoshka_dims(dims: list[int], full_dim: int) -> None:
    """Training accepts dims up to the embedding size (the full size is the untruncated embedding);
    evaluation accepts the same, so a recipe's list is valid for both stages or for neither."""
    too_big = [d for d in dims if d > full_dim]
    if too_big:
        raise ConfigError(f"key 'model.matryoshka_dims': {too_big} above the embedding size {full_dim}")


# ---------------------------------------------------------------- scoring
def run_comparison(networks: list[Network], names: dict[str, str], tasks: list, *, eval_dir: Path,
                   batch_size: int, device: str, log=print) -> Comparison:
    """Score every role on every task, one network in memory at a time, its outputs shared by its roles."""
    result = Comparison(names=dict(names))
    for net in networks:
        model, settings_from = net.load()
        model = model.to(device)
        # an exported SparseEncoder is one role alone: nothing to share, so nothing kept
        dense = CachedEncoder(dense_view(model)) if isinstance(model, EmbeddingModel) else model
        encoders = {}
        if net.dense:
            encoders[net.dense] = dense
        if net.hybrid:
            encoders[net.hybrid] = HybridEncoder(dense, net.channel(model).to(device))
        full_dim = embedding_dim(dense) if net.matryoshka_dims else 0
        check_matryoshka_dims(net.matryoshka_dims, full_dim)
        revisions = {}
        for role, encoder in encoders.items():
            revisions[role] = model_output_fingerprint(encoder)
            s = result.settings[role] = encoder.settings
            result.identities[role] = {
                "name": names[role], "revision": revisions[role], "settings_from": settings_from,
                "query_prompt": s.query_prompt, "document_prompt": s.document_prompt,
                "max_length": s.max_length, "query_max_length": s.query_max_length}
            log(f"[{role}] {names[role]} (revision {revisions[role]}; settings {settings_from}: query prompt "
                f"{s.query_prompt!r}, query max length {s.query_max_length}, max length {s.max_length})")
        for task in tasks:
            label = task_label(task)
            for role, encoder in encoders.items():
                start = time.time()
                predictions = None
                if role in PER_QUERY_ROLES and is_local_task(task):
                    predictions = eval_dir / "predictions" / names[role].replace("/", "__") / revisions[role]
                metrics = evaluate_model(encoder, [task], name=names[role], revision=revisions[role],
                                         results_dir=eval_dir, batch_size=batch_size, show_progress=on_terminal(),
                                         prediction_folder=predictions)[label]
                result.metrics.setdefault(role, {})[label] = metrics
                if predictions is not None:
                    result.per_query.setdefault(label, {})[role] = per_query_ndcg_at_10(predictions, task)
                for dim in net.matryoshka_dims if role == (net.dense or net.hybrid) else []:
                    score = metrics["main_score"] if dim == full_dim else evaluate_model(
                        encoder, [task], name=names[role], revision=revisions[role], results_dir=eval_dir,
                        batch_size=batch_size, dim=dim, show_progress=on_terminal())[label]["main_score"]
                    result.matryoshka.setdefault(str(dim), {}).setdefault(label, {})[role] = score
                    result.full_dim[role] = full_dim
                result.timings[role] = round(result.timings.get(role, 0.0) + time.time() - start, 1)
                log(f"[{role}] {label}: nDCG@10 = {100 * metrics.get('ndcg_at_10', float('nan')):.2f} "
                    f"(main score {100 * metrics['main_score']:.2f})")
            if isinstance(dense, CachedEncoder):
                dense.clear()
        del model, dense, encoders
        if device == "cuda":
            torch.cuda.empty_cache()
    order = [role for role in COLUMN_ORDER if role in result.metrics]
    result.names = {role: names[role] for role in order}
    return result


# ---------------------------------------------------------------- table rows and eval_summary.json
def table_rows(result: Comparison, splits: dict[str, str]) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Main scores {role: {row: score}} and {row: split} for results.md: a row per dataset, then one per
    dataset and Matryoshka dimension ("scifact (256d)"; the embedding size itself "(1024d, full)")."""
    scores, rows = result.main_scores(), dict(splits)
    for dim, by_dataset in result.matryoshka.items():
        for d, by_role in by_dataset.items():
            for role, value in by_role.items():
                row = f"{d} ({matryoshka_label(int(dim), result.full_dim[role])})"
                scores[role][row] = value
                rows[row] = splits[d]
    return scores, rows


# ---------------------------------------------------------------- eval_summary.json
def summary(result: Comparison, labels: list[str], splits: dict[str, str], peak_rss_gb: float) -> dict:
    """eval_summary.json: `ndcg_at_10` per dataset for every role (the contract), and the rest."""
    roles = list(result.names)
    return {
        "datasets": labels, "splits": {d: splits[d] for d in labels},
        "models": {role: result.identities[role] for role in roles},
        "ndcg_at_10": {d: {role: result.metrics[role][d]["ndcg_at_10"] for role in roles
                           if "ndcg_at_10" in result.metrics[role][d]} for d in labels},
        "main_score": {d: {role: result.metrics[role][d]["main_score"] for role in roles} for d in labels},
        "matryoshka_main_score": result.matryoshka, "embedding_dim": result.full_dim,
        "per_query_ndcg_at_10": result.per_query,
        "metrics": {role: result.metrics[role] for role in roles},
        "timings_s": result.timings, "peak_rss_gb": peak_rss_gb,
        "outputs": {"results": "eval/results", "table": "eval/results.md", "chart": "eval/scores.png",
                    **({"per_query_chart": "eval/per_query.png", "predictions": "eval/predictions"}
                       if any(set(PER_QUERY_ROLES) <= set(by_role) for by_role in result.per_query.values())
                       else {})},
    }
