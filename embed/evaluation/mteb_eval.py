"""Evaluation through mteb's own retrieval evaluator, so our numbers are the leaderboard's numbers.

Three pieces:
- `LocalBEIRTask`: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) as an mteb
  retrieval task. Only the data loading is ours (validated by embed.data); search, tie-breaking and
  pytrec_eval scoring are mteb's, exactly as for the published `SciFact` task.
- `MTEBEncoder`: mteb's encoder protocol around `EmbeddingModel`. mteb says whether it is encoding
  queries or documents (`prompt_type`); we map that to the model's query or document prompt, the
  way the model was trained. Optionally truncates to a Matryoshka dimension and renormalises.
- `evaluate_model` / `evaluate_beir`: one code path for the eval script (with a results cache in
  mteb's folder layout) and for the periodic dev evaluation inside training (no cache).

mteb's cache trap (FIELD.md): results are cached by model name + revision, so a fine-tuned model
filed under its base model's name silently gets the base model's scores. Every model here is filed
under a revision that fingerprints its encoder settings and outputs (see `model_output_fingerprint`), so
two different models never share a cache entry, whatever their names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import mteb
import numpy as np
from datasets import Dataset
from datasets.exceptions import DatasetNotFoundError
from mteb.abstasks import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from embed import datasets
from embed.data import (
    load_qrels,
    read_beir_eval,
    resolve_data_path,
)
from embed.errors import ConfigError, DataError

# Hub names of the bundled aliases: results are filed (and compared with published ones) under them.
PUBLISHED_NAMES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
LOCAL_TASK_PREFIX = "local-"


# ---------------------------------------------------------------- a BEIR folder as an mteb task
def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def dataset_label(spec: str) -> str:
    """Short name of an eval target for tables and summaries: the folder name or the task name."""
    if datasets.is_builtin(spec):
        return datasets.label(spec)
    path = Path(spec)
    return path.resolve().name if path.exists() else spec


class LocalBEIRTask(AbsTaskRetrieval):
    """A BEIR folder evaluated by mteb's retrieval evaluator.

    The task's dataset revision is a hash of the three files it reads, so a changed folder is
    never answered from a cached result computed on the old one.
    """

    def __init__(self, folder: str, split: str = "test", label: Optional[str] = None):
        self.folder = Path(resolve_data_path(folder))
        self.split = split
        self.label = label or dataset_label(folder)
        files = [self.folder / "corpus.jsonl", self.folder / "queries.jsonl", self.qrels_path]
        for path in files:
            if not path.is_file():
                raise DataError(f"{path}: file not found (a BEIR folder needs corpus.jsonl, "
                                f"queries.jsonl and qrels/{split}.tsv)")
        self._metadata = TaskMetadata(
            name=LOCAL_TASK_PREFIX + self.label,
            dataset={"path": str(self.folder.resolve()), "revision": _sha256_files(files)},
            description=f"BEIR folder {self.folder}, qrels split '{split}'",
            type="Retrieval", category="t2t", modalities=["text"], eval_splits=[split],
            eval_langs=["eng-Latn"],  # a label only: scoring does not depend on it
            main_score="ndcg_at_10",
        )
        super().__init__()

    # mteb's unload_data() drops an instance attribute named `metadata`; a property survives it.
    @property
    def metadata(self):
        return self._metadata

    @property
    def qrels_path(self) -> Path:
        return self.folder / "qrels" / f"{self.split}.tsv"

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        """Read and validate the folder; unknown ids in the qrels are an error, not a skip.

        Documents with empty title and text stay in the corpus, as in MTEB's own tasks: qrels may
        judge them, and a model ranks them like any other (they are counted in a warning).
        """
        if self.data_loaded:
            return
        corpus, queries, qrels = read_beir_eval(str(self.folder), self.split)
        if corpus.skipped["empty_text"]:
            print(f"warning: {corpus.source}: {corpus.skipped['empty_text']} document(s) with empty title and "
                  "text, evaluated as empty documents (as MTEB does)")
        qids = [qid for qid in queries if qid in qrels]
        self.dataset = {"default": {self.split: {
            "corpus": Dataset.from_dict({"id": corpus.ids, "title": corpus.titles, "text": corpus.texts}),
            "queries": Dataset.from_dict({"id": qids, "text": [queries[q] for q in qids]}),
            "relevant_docs": qrels,
            "top_ranked": None,
        }}}
        self.data_loaded = True


def is_local_task(task) -> bool:
    return isinstance(task, LocalBEIRTask)


def task_label(task) -> str:
    return task.label if is_local_task(task) else task.metadata.name


def task_splits(task) -> str:
    return ",".join(task.eval_splits)


def resolve_eval_tasks(specs: list[str], split: str = "test") -> list:
    """mteb tasks for `data.eval`: BEIR folders (split `split`), MTEB task names or benchmark names.

    A benchmark expands to its tasks. MTEB tasks use their own evaluation splits. BEIR folders are
    read and validated here, so a bad line stops the run before any model is loaded.
    """
    tasks, seen = [], {}
    for spec in specs:
        if datasets.is_builtin(spec) or Path(spec).exists():
            found = [LocalBEIRTask(spec, split)]
        else:
            try:
                found = list(mteb.get_benchmark(spec).tasks)
            except KeyError:
                try:
                    found = [mteb.get_task(spec)]
                except KeyError as e:
                    hint = str(e.args[0]).removeprefix("KeyError: ")
                    raise DataError(f"eval target '{spec}' is neither a BEIR folder nor an MTEB task or "
                                    f"benchmark ({hint})") from None
        for task in found:
            label = task_label(task)
            if label in seen:
                raise ConfigError(f"eval targets '{seen[label]}' and '{spec}' both give the dataset name "
                                  f"'{label}'; rename one folder")
            seen[label] = spec
            tasks.append(task)
    for task in tasks:
        if is_local_task(task):
            task.load_data()
    return tasks


# ---------------------------------------------------------------- the encoder adapter
def truncate_and_normalize(embeddings: np.ndarray, dim: int) -> np.ndarray:
    """Matryoshka view of L2-normalised embeddings: the first `dim` coordinates, renormalised."""
    head = embeddings[:, :dim]
    return head / np.clip(np.linalg.norm(head, axis=1, keepdims=True), 1e-12, None)


class MTEBEncoder(AbsEncoder):
    """mteb's EncoderProtocol around an EmbeddingModel (or anything with its `encode`).

    Queries get the model's query prompt and query length limit, documents the document
    prompt: `prompt_type` from mteb picks which. Tasks without a prompt type (STS,
    clustering, classification) are encoded as documents, i.e. without the retrieval
    instruction, as mteb's own sentence-transformers wrapper does.
    """

    def __init__(self, model, meta, dim: Optional[int] = None):
        self.model = model
        self.mteb_model_meta = meta
        self.dim = dim

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]
        kind = "query" if prompt_type == PromptType.query else "document"
        embeddings = self.model.encode(texts, kind=kind, batch_size=kwargs.get("batch_size", 64),
                                       show_progress=bool(kwargs.get("show_progress_bar", False)))
        if self.dim:
            embeddings = truncate_and_normalize(embeddings, self.dim)
        return embeddings


# ---------------------------------------------------------------- model identity
def default_model_name(name_or_path: str) -> str:
    """Name results are filed under: the hub name of an alias, `local/<folder>` for a folder, else the id."""
    if name_or_path in PUBLISHED_NAMES:
        return PUBLISHED_NAMES[name_or_path]
    path = Path(name_or_path)
    if path.exists():
        path = path.resolve()
        return "local/" + (path.parent.name if path.name == "model" else path.name)
    return name_or_path


FINGERPRINT_PROBES = [
    "what causes the seasons on earth",
    "The tilt of Earth's axis, not its distance from the Sun, makes summer and winter.",
    "def add(a, b):\n    return a + b",
    "Die Katze schläft auf dem Sofa. 猫はソファで寝ている。",
]


def model_output_fingerprint(model) -> str:
    """The revision a model's results are filed under: a hash of its settings and of what it computes.

    Hashing the embeddings of fixed probe texts rather than the weights: two loads of one
    checkpoint can differ in weights that never reach the output (BERT's pooler is freshly,
    randomly initialised when a checkpoint lacks it), while any training step changes the
    outputs. Rounding to 4 decimals absorbs float noise; a rare flip only costs a re-evaluation.
    """
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.settings), sort_keys=True).encode())
    for kind in ("query", "document"):
        embeddings = model.encode(FINGERPRINT_PROBES, kind=kind)
        h.update((np.round(embeddings, 4) + 0.0).astype(np.float32).tobytes())  # + 0.0: no negative zeros
    return h.hexdigest()[:16]


def embedding_dim(model) -> int:
    return int(model.encode(["dimension probe"], kind="document").shape[1])


def similarity(model) -> str:
    """"cosine" or "dot": the model's own (a BM25 channel makes a normalised model's vectors "dot"),
    else cosine for normalised embeddings."""
    return getattr(model, "similarity_fn_name", None) or ("cosine" if model.normalize else "dot")


def build_model_meta(model, name: str, revision: str, dim: Optional[int] = None):
    """mteb's ModelMeta for our model: name, weight-fingerprint revision and what mteb records."""
    return ModelMeta.create_empty(overwrites=dict(
        name=name, revision=revision,
        n_parameters=sum(p.numel() for p in model.parameters()),
        embed_dim=dim or embedding_dim(model),
        max_tokens=model.settings.max_length,
        similarity_fn_name=ScoringFunction.COSINE if similarity(model) == "cosine" else ScoringFunction.DOT_PRODUCT,
        framework=["PyTorch", "Sentence Transformers"], open_weights=True,
        use_instructions=bool(model.query_prompt), modalities=["text"],
        experiment_kwargs={"dim": dim} if dim else None,
    ))


# ---------------------------------------------------------------- running mteb
def _flat_scores(task_result) -> dict[str, float]:
    """Every numeric metric of a TaskResult, averaged over its splits and subsets (0-1 scale)."""
    first = next(iter(task_result.scores.values()))[0]
    keys = [k for k, v in first.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: float(task_result.get_score(getter=lambda s, k=k: s.get(k, float("nan")))) for k in keys}


def _overwrite_strategy(cache, task, meta) -> str:
    """Reuse a cached result only if it was computed on this exact dataset revision."""
    if cache is None:
        return "always"
    cached = cache.load_task_result(task.metadata.name, meta)
    if cached is not None and cached.dataset_revision != task.metadata.revision:
        return "always"
    return "only-missing"


def _hub_error(task, error: BaseException) -> DataError:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return DataError(f"MTEB task '{task.metadata.name}' needs its data from the Hugging Face hub, which "
                     f"failed ({first}); evaluate a local BEIR folder instead (--data DIR)")


def evaluate_model(model, tasks: list, *, name: str, results_dir: Optional[str | Path] = None,
                   batch_size: int = 64, dim: Optional[int] = None, show_progress: bool = False,
                   revision: Optional[str] = None, prediction_folder: Optional[str | Path] = None,
                   ) -> dict[str, dict[str, float]]:
    """Evaluate `model` on mteb `tasks`; return {dataset label: {metric: value (0-1)}}.

    With `results_dir`, results are written (and reused on a rerun) in mteb's results layout
    `results_dir/results/<name>/<revision>/<task>.json`, revision = `model_output_fingerprint(model)`.
    With `prediction_folder`, mteb also writes each retrieval task's ranking there
    (`<task>_predictions.json`, see `per_query_ndcg_at_10`); a cached result without one is recomputed.
    """
    meta = build_model_meta(model, name, revision or model_output_fingerprint(model), dim)
    encoder = MTEBEncoder(model, meta, dim=dim)
    cache = mteb.ResultCache(cache_path=results_dir) if results_dir is not None else None
    scores = {}
    for task in tasks:
        strategy = _overwrite_strategy(cache, task, meta)
        if prediction_folder is not None and not predictions_path(prediction_folder, task).is_file():
            strategy = "always"
        try:
            result = mteb.evaluate(
                encoder, task, cache=cache, overwrite_strategy=strategy,
                encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress},
                prediction_folder=prediction_folder,
                co2_tracker=False, show_progress_bar=False, raise_error=True)
        except (ConnectionError, DatasetNotFoundError, OSError) as e:
            if is_local_task(task):
                raise
            raise _hub_error(task, e) from None
        if result.exceptions:  # mteb reports a private dataset it cannot load instead of raising
            raise _hub_error(task, RuntimeError(result.exceptions[0].exception))
        scores[task_label(task)] = _flat_scores(result.task_results[0])
    return scores


def evaluate_beir(model, beir_dir: str, split: str = "test", batch_size: int = 64) -> dict[str, float]:
    """Metrics of `model` on a BEIR folder (ndcg_at_10, recall_at_100, mrr_at_10, ...; 0-1 scale).

    The same mteb evaluator as scripts/eval_mteb.py, without a results cache: meant for the
    periodic dev evaluation during training.
    """
    task = LocalBEIRTask(beir_dir, split)
    return evaluate_model(model, [task], name="in-training", revision="not-cached",
                          batch_size=batch_size)[task.label]


# ---------------------------------------------------------------- per-query scores
def predictions_path(prediction_folder: str | Path, task) -> Path:
    """Where mteb writes a task's ranking when `evaluate_model` is given `prediction_folder`."""
    return Path(prediction_folder) / f"{task.metadata.name}_predictions.json"


def per_query_ndcg_at_10(prediction_folder: str | Path, task) -> dict[str, float]:
    """nDCG@10 of each judged query of a local BEIR task, from the ranking mteb saved (pytrec_eval,
    as mteb scores it), so two models can be compared query by query."""
    import pytrec_eval

    ranking = json.loads(predictions_path(prediction_folder, task).read_text(encoding="utf-8"))
    run = ranking["default"][task.split]
    qrels = load_qrels(str(task.qrels_path))
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"})
    return {qid: values["ndcg_cut_10"] for qid, values in evaluator.evaluate(run).items()}
