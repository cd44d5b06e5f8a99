"""The recipe schema: one dataclass per section, one field per key, each with a default and a help.

`python scripts/<any>.py --help` prints this schema. Stage scripts read only their own section
plus `model` and `data`, but every script accepts the whole recipe so one file drives the run.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from embed.errors import ConfigError


def opt(default: Any, help: str = ""):
    """A recipe key: its default (lists/dicts copied per instance) and its --help text."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return field(default_factory=lambda: dataclasses.replace(value) if dataclasses.is_dataclass(value)
                     else type(value)(value), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ---------------------------------------------------------------- model
@dataclass
class LatentAttentionConfig:
    num_latents: int = opt(512, "latent array rows (keys/values of the pooling attention)")
    num_heads: int = opt(8, "attention heads of the latent-attention pooling")
    head_dim: int = opt(64, "width of each head; keep small on 1B backbones")
    mlp_ratio: int = opt(4, "GEGLU MLP expansion (2 halves the head's parameters on a 1B backbone)")
    learning_rate: Optional[float] = opt(None, "own learning rate for the freshly initialised head (default: stage lr x 10)")


@dataclass
class LoraConfig:
    enabled: bool = opt(False, "train LoRA adapters instead of all backbone weights (peft)")
    r: int = opt(16, "LoRA rank")
    alpha: int = opt(32, "LoRA alpha")
    dropout: float = opt(0.1, "LoRA dropout")
    target: str = opt("attention+mlp", "which projections get adapters: attention | attention+mlp")
    load_in_4bit: bool = opt(False, "QLoRA: 4-bit base weights via bitsandbytes (CUDA only)")


@dataclass
class ModelConfig:
    name_or_path: str = opt("minilm", "base model: alias 'minilm', a local folder or a hub id (hub only if reachable)")
    pooling: Optional[Literal["mean", "cls", "last", "latent_attention"]] = opt(None, "pooling registry entry (null = the base model's own)")
    normalize: bool = opt(True, "L2-normalise embeddings (cosine similarity)")
    max_length: Optional[int] = opt(None, "document token limit (null = the base model's max_seq_length, else 256)")
    query_max_length: int = opt(128, "query token limit")
    query_prompt: Optional[str] = opt(None, "instruction prefix for queries, saved as the sentence-transformers 'query' prompt (null = the base model's)")
    document_prompt: Optional[str] = opt(None, "prefix for documents, e.g. 'passage: ' (null = the base model's)")
    pool_prompt_tokens: Optional[bool] = opt(None, "false: drop instruction tokens from the pooling mask, as NV-Embed (null = the base model's)")
    bidirectional: bool = opt(False, "make a decoder LLM attend bidirectionally (embed.modeling.bidirectional)")
    attn_implementation: str = opt("sdpa", "sdpa | eager | flash_attention_2")
    trust_remote_code: bool = opt(False, "run code shipped with a hub model; off unless the recipe says so")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "weight dtype at load (keep float32 for fp16 autocast)")
    latent_attention: LatentAttentionConfig = opt(LatentAttentionConfig(), "latent-attention pooling sizes")
    lora: LoraConfig = opt(LoraConfig(), "parameter-efficient fine-tuning")
    matryoshka_dims: list[int] = opt([], "train and evaluate at these truncated dimensions too")
    lexical_weight: float = opt(0.0, "w > 0: add a lexical channel to the model (embed.modeling.lexical), fitted on data.corpus and appended to the dense embedding so that the score is (1 - w) dense cosine + w lexical score; train.lexical_aware says whether it is attached before or after training")
    lexical_scheme: Literal["bm25", "tfidf"] = opt("bm25", "the lexical channel's score: bm25 = BM25 of stemmed words over the query's best possible score (dot-product model); tfidf = cosine of word-piece TF-IDF (its lexical half also exported as a SparseEncoder)")
    lexical_dim: int = opt(4096, "hashed buckets of the lexical channel (its share of the embedding's dimensions)")
    lexical_max_length: int = opt(4096, "tokens of each text the lexical channel reads (BM25 scores the whole document where the dense half reads model.max_length); 0 = model.max_length and model.query_max_length, the dense half's cut")
    lexical_weight_rule: Literal["fixed", "generated"] = opt("fixed", "how the lexical channel's weight is set: fixed = model.lexical_weight; generated = chosen by the mining stage from this domain's generated queries (embed.retrieval.channel_weight; 0 = no channel) and read by training from run_dir/mine_summary.json")


# ---------------------------------------------------------------- data
@dataclass
class DataConfig:
    corpus: str = opt("", "documents to generate queries for and mine negatives from: BEIR folder or HF dataset id")
    eval: list[str] = opt([], "evaluation targets: BEIR folders and/or MTEB task or benchmark names")
    eval_split: str = opt("test", "qrels split of the BEIR folders in data.eval")
    dev: str = opt("", "BEIR folder for periodic evaluation during training ('' = none)")
    dev_split: str = opt("dev", "qrels split of data.dev")


# ---------------------------------------------------------------- generation
@dataclass
class GenVllmConfig:
    tensor_parallel_size: int = opt(1, "GPUs per engine (tensor parallel)")
    data_parallel_size: int = opt(1, "independent engines, each on tensor_parallel_size GPUs")
    gpu_memory_utilization: float = opt(0.9, "share of each GPU's memory vLLM may take")
    max_model_len: int = opt(4096, "context length the engine reserves KV cache for")
    enable_prefix_caching: bool = opt(True, "reuse the KV cache of the shared prompt prefix")


@dataclass
class GenOpenAIConfig:
    api_base: str = opt("http://127.0.0.1:8000/v1", "OpenAI-compatible endpoint (a `vllm serve`, OpenRouter, ...)")
    api_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the key ('' = no key); never logged")
    concurrency: int = opt(8, "requests in flight at once")
    timeout_s: float = opt(60.0, "seconds per request")
    max_retries: int = opt(5, "retries of a failed request (HTTP 429/5xx, network errors)")
    backoff_s: float = opt(1.0, "first retry delay; doubles each retry")


@dataclass
class GenConfig:
    backend: Literal["transformers", "vllm", "openai"] = opt("transformers", "LLM backend")
    model: str = opt("smollm2", "generator: 'smollm2' (bundled GGUF), a .gguf file, a local folder or a hub id; one without a chat template (pretrained, not instruction-tuned) is prompted with plain text")
    max_docs: int = opt(0, "generate for at most this many documents, a seeded random sample (0 = all)")
    queries_per_doc: int = opt(1, "samples drawn per document")
    batch_size: int = opt(16, "prompts per generate call")
    max_new_tokens: int = opt(48, "generation budget per answer")
    temperature: float = opt(0.7, "sampling temperature (0 = greedy)")
    top_p: float = opt(0.95, "nucleus sampling")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "generator weights: auto = bf16 on sm_80+ and on CPUs with native bf16 (AVX512-BF16/AMX), fp16 on older GPUs, fp32 on other CPUs")
    trust_remote_code: bool = opt(False, "run code shipped with a hub generator")
    query_types: list[str] = opt(["claim", "question", "keywords"], "query types, rotated over documents and samples: claim | question | keywords")
    task: str = opt("", "retrieval task shown to the generator ('' = a generic one; 'auto' = brainstormed once by the generator, saved in run_dir/gen_task.json)")
    prompt_template: str = opt("", "user message template with {task} {document} {query_type} {max_words} ('' = embed.generation.prompts default)")
    few_shot: bool = opt(True, "show one worked example first (small generators need it)")
    max_doc_words: int = opt(160, "document words shown to the generator (prompt length drives CPU cost)")
    structured_output: bool = opt(True, "vllm/openai: force the JSON answer with a JSON schema")
    max_retries: int = opt(1, "regenerate answers failing a per-query filter (parse, length, meta-text, copy, round trip) this many times")
    retry_temperature: float = opt(0.8, "sampling temperature of those retries (a low one repeats the failure)")
    min_words: int = opt(3, "filter: shortest query kept")
    query_lengths: list[int] = opt([8, 16, 24], "word limits stated in the prompt, rotated over documents (E5 varies query length)")
    max_words: int = opt(32, "filter: longest query kept (limits are not always obeyed)")
    max_copy_overlap: float = opt(0.6, "filter: reject queries whose word n-grams are copied from the document above this share")
    copy_ngram: int = opt(3, "filter: n of the copy check")
    round_trip: Literal["none", "bm25", "model", "both", "either"] = opt("bm25", "filter: keep a query only if its document ranks in the top round_trip_k under BM25 / the base model (model.*)")
    round_trip_k: int = opt(10, "filter: rank the source document must reach (<= 100)")
    cloze_queries: bool = opt(False, "also an inverse-cloze query for every document, no LLM: one of its sentences (min_words..max_words + 8) is the query, the rest the positive (run_dir/cloze_queries.jsonl)")
    cloze_keep_sentence: float = opt(0.1, "share of cloze pairs whose positive keeps the query sentence (ORQA: 0.1)")
    vllm: GenVllmConfig = opt(GenVllmConfig(), "vllm backend")
    openai: GenOpenAIConfig = opt(GenOpenAIConfig(), "openai backend")


# ---------------------------------------------------------------- mining
@dataclass
class MineConfig:
    teacher: str = opt("", "embedding model that scores candidates ('' = model.name_or_path with the recipe's model settings)")
    generated: bool = opt(True, "mine the generation stage's run_dir/queries.jsonl (and cloze_queries.jsonl); false = mine.qrels and/or mine.unjudged_queries alone")
    qrels: str = opt("", "also mine judged pairs: a qrels TSV, or a split of data.corpus ('train' = <data.corpus>/qrels/train.tsv); their train.jsonl rows have source 'qrels:<path>'")
    queries: str = opt("", "query texts for mine.qrels: BEIR queries.jsonl or folder ('' = the BEIR folder holding the qrels)")
    unjudged_queries: str = opt("", "also mine real queries without judgments (a query log; BEIR queries.jsonl or folder): each one's positive is the teacher's best-scored candidate; their train.jsonl rows have source 'unjudged:<path>'")
    num_negatives: int = opt(4, "hard negatives kept per query")
    relative_margin: Optional[float] = opt(0.05, "TopK-PercPos: drop candidates the teacher scores above positive - |positive| x margin (null = off)")
    absolute_margin: Optional[float] = opt(None, "TopK-MarginPos: drop candidates scoring above positive - margin (null = off)")
    teacher_bm25_weight: float = opt(0.0, "hybrid teacher: score = (1 - w) x teacher cosine + w x BM25 / the query's best BM25; 0 = the dense teacher alone")
    teacher_candidates: int = opt(0, "also write the teacher's K best candidates of each query with its scores (train.jsonl cand_ids / cand_scores), the target of training stages with frozen_documents; 0 = none")
    retrievers: list[Literal["dense", "bm25"]] = opt(["dense", "bm25"], "retrievers that propose candidate negatives, fused by reciprocal rank")
    depth: int = opt(100, "candidates retrieved per retriever before fusion and filtering")
    rrf_k: int = opt(60, "reciprocal rank fusion constant k in 1 / (k + rank)")
    rank_min: int = opt(0, "skip the N best-ranked non-positive candidates (a guard against unjudged positives)")
    rank_max: int = opt(0, "consider only the first N non-positive candidates (0 = all of depth)")
    sampling: Literal["top", "random"] = opt("top", "keep the best-ranked surviving candidates, or a seeded random sample of them")
    index: str = opt("flat", "dense search: 'flat' (exact, streamed from the fp16 cache) or a faiss index_factory string, e.g. 'IVF4096,SQfp16' or 'HNSW32,SQfp16'")
    index_search_params: str = opt("", "faiss search-time parameters of an approximate index, e.g. 'nprobe=32' or 'efSearch=128'")
    batch_size: int = opt(1024, "queries encoded, searched and written per step (the resume granularity)")
    encode_batch_size: int = opt(64, "texts per forward pass when encoding corpus and queries")
    encode_precision: Literal["auto", "fp32", "bf16"] = opt("auto", "teacher encoding: auto = bf16 autocast where the hardware has native bf16 (sm_80+ GPUs, AVX512-BF16/AMX CPUs), else fp32")
    cache_dir: str = opt("", "corpus-embedding cache root ('' = $EMBED_CACHE_DIR, else ~/.cache/mteb-domain-embeddings)")
    cache_chunk_size: int = opt(8192, "documents per cached chunk: the unit of encoding resume and of sharding over processes")


# ---------------------------------------------------------------- training
@dataclass
class StageConfig:
    name: str = opt("stage1", "stage name (logs, checkpoints)")
    data: list[str] = opt(["{run_dir}/train.jsonl"], "train.jsonl files or BEIR folders (pairs from qrels/<split>.tsv); {run_dir} is expanded")
    split: str = opt("train", "qrels split when a data entry is a BEIR folder")
    sources: list[str] = opt([], "keep only rows whose `source` is one of these: generated, cloze, qrels, unjudged (qrels and unjudged match '<kind>:<path>'); [] = all rows")
    epochs: float = opt(1.0, "passes over the stage's data")
    max_steps: int = opt(0, "stop the stage after this many optimizer steps (0 = epochs decide)")
    learning_rate: float = opt(2.0e-05, "peak learning rate")
    max_length: Optional[int] = opt(None, "document token limit in this stage (null = model.max_length)")
    query_max_length: Optional[int] = opt(None, "query token limit in this stage (null = model.query_max_length)")
    num_negatives: int = opt(1, "hard negatives per query in each batch (rows with fewer are skipped and counted)")
    in_batch_negatives: bool = opt(True, "false = NV-Embed stage 2: each query sees only its own documents")
    frozen_documents: bool = opt(False, "true = documents keep the base model's embeddings (the corpus is encoded once, before training) and each query learns the mining teacher's distribution over its candidates (cand_ids / cand_scores, from mine.teacher_candidates) as a softmax over the whole corpus: only queries pass through the network; negatives, in-batch negatives and distill_weight do not apply")
    distill_weight: float = opt(0.0, "add this x KL(teacher || student) over each query's own documents, the teacher being mining's scores (pos_scores / neg_scores; rows without them are skipped and counted); 0 = InfoNCE alone")
    instruction: Optional[str] = opt(None, "query instruction for this stage (default: model.query_prompt)")


@dataclass
class TrainConfig:
    stages: list[StageConfig] = opt([StageConfig()], "training stages, run in order")
    per_device_batch_size: int = opt(32, "queries per process per step; global batch = this x processes")
    temperature: float = opt(0.05, "InfoNCE temperature (0.05 = sentence-transformers' scale 20)")
    distill_temperature: float = opt(0.05, "temperature of the teacher's scores in the distillation term (stages.*.distill_weight)")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = opt("auto", "auto: the accelerate config's mixed_precision if set, else bf16 on sm_80+ GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), fp16 autocast on older GPUs, fp32 on other CPUs")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    warmup_ratio: float = opt(0.1, "fraction of a stage's steps spent warming up")
    scheduler: Literal["linear", "cosine", "constant"] = opt("linear", "decay after warmup")
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)")
    gradient_checkpointing: bool = opt(False, "trade compute for activation memory")
    gradcache_chunk_size: int = opt(0, "GradCache chunk (0 = off): big contrastive batches on small GPUs")
    compile: bool = opt(False, "torch.compile each transformer layer of the backbone")
    max_steps: int = opt(0, "cap on total optimizer steps over all stages (0 = none); for smoke runs")
    lexical_aware: bool = opt(True, "with model.lexical_weight: true = attach the lexical channel before training, so the dense half is trained against the mixed score and learns what the lexical half misses; false = append it to the saved model after training")
    save_steps: int = opt(200, "checkpoint every N steps (and at each stage end)")
    save_total_limit: int = opt(2, "checkpoints kept")
    eval_steps: int = opt(0, "evaluate on data.dev every N steps (0 = only at the end)")
    logging_steps: int = opt(10, "log every N steps")
    report_to: list[str] = opt(["tensorboard"], "trackers: tensorboard, wandb")


# ---------------------------------------------------------------- evaluation
@dataclass
class EvalConfig:
    batch_size: int = opt(64, "encoding batch size")
    base_model: str = opt("", "baseline to compare against ('' = model.name_or_path)")
    model_name: str = opt("", "name the trained model's results and card are filed under, e.g. its hub id ('' = local/<run_dir folder>)")


# ---------------------------------------------------------------- the recipe
@dataclass
class Recipe:
    run_dir: str = opt("runs/default", "everything of the run is written here")
    seed: int = opt(42, "seed for sampling, shuffling and initialisation")
    model: ModelConfig = opt(ModelConfig(), "the embedding model")
    data: DataConfig = opt(DataConfig(), "corpus and evaluation data")
    gen: GenConfig = opt(GenConfig(), "synthetic query generation (gen_vllm.py)")
    mine: MineConfig = opt(MineConfig(), "hard-negative mining (mine_faiss.py)")
    train: TrainConfig = opt(TrainConfig(), "contrastive training (train.py)")
    eval: EvalConfig = opt(EvalConfig(), "evaluation (eval_mteb.py)")

    def validate(self) -> None:
        """Cross-key checks that single-key types cannot express."""
        if not self.train.stages:
            raise ConfigError("key 'train.stages' must list at least one stage")
        for i, stage in enumerate(self.train.stages):
            if stage.num_negatives < 0:
                raise ConfigError(f"key 'train.stages.{i}.num_negatives' must be >= 0")
            if stage.frozen_documents:
                if stage.distill_weight:
                    raise ConfigError(f"key 'train.stages.{i}.distill_weight' must be 0 with frozen_documents: the "
                                      f"stage already learns the teacher's scores")
                if self.model.matryoshka_dims:
                    raise ConfigError(f"key 'train.stages.{i}.frozen_documents' needs no model.matryoshka_dims (the "
                                      f"frozen corpus has the full dimension only)")
                if not self.mine.teacher_candidates:
                    raise ConfigError(f"key 'train.stages.{i}.frozen_documents' needs mine.teacher_candidates > 0 "
                                      f"(the teacher's candidates are the stage's target)")
                if not self.mine.teacher and not self.mine.teacher_bm25_weight:
                    raise ConfigError(f"key 'train.stages.{i}.frozen_documents' needs a teacher other than the model "
                                      f"itself (mine.teacher_bm25_weight > 0 or mine.teacher): against its own frozen "
                                      f"documents the model already scores as its teacher, and would learn nothing")
            elif not stage.in_batch_negatives and stage.num_negatives == 0:
                raise ConfigError(f"key 'train.stages.{i}.num_negatives' must be >= 1 when in_batch_negatives is "
                                  f"false: a query that sees only its positive has a loss of 0 and learns nothing")
            if not (math.isfinite(stage.learning_rate) and stage.learning_rate > 0):
                raise ConfigError(f"key 'train.stages.{i}.learning_rate' must be a finite number > 0, "
                                  f"got {stage.learning_rate}")
            if not (math.isfinite(stage.epochs) and stage.epochs > 0):
                raise ConfigError(f"key 'train.stages.{i}.epochs' must be a finite number > 0, got {stage.epochs}")
            if stage.max_steps < 0:
                raise ConfigError(f"key 'train.stages.{i}.max_steps' must be >= 0, got {stage.max_steps}")
            if stage.distill_weight < 0:
                raise ConfigError(f"key 'train.stages.{i}.distill_weight' must be >= 0")
            if not stage.data:
                raise ConfigError(f"key 'train.stages.{i}.data' must name at least one file or folder")
        dims = self.model.matryoshka_dims
        if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            raise ConfigError(f"key 'model.matryoshka_dims' must list distinct dimensions >= 1, got {dims}")
        if self.model.lexical_weight_rule == "generated" and self.mine.teacher:
            raise ConfigError("key 'model.lexical_weight_rule: generated' needs mine.teacher: '' (the weight is chosen "
                              "with the recipe's own model, which mining then encodes the corpus with)")
        if self.model.lexical_weight or self.model.lexical_weight_rule == "generated":
            if self.model.lexical_weight and not 0.0 < self.model.lexical_weight < 1.0:
                raise ConfigError(f"key 'model.lexical_weight' must be 0 (off) or in (0, 1), got {self.model.lexical_weight}")
            if self.model.lexical_dim < 1:
                raise ConfigError("key 'model.lexical_dim' must be >= 1")
            if self.model.lexical_max_length < 0:
                raise ConfigError("key 'model.lexical_max_length' must be >= 0 (0 = the dense half's cut)")
            if not self.model.normalize or self.model.matryoshka_dims:
                raise ConfigError("key 'model.lexical_weight' needs model.normalize: true and no model.matryoshka_dims "
                                  "(the channel mixes two unit-norm halves)")
            if not self.data.corpus:
                raise ConfigError("key 'model.lexical_weight' needs data.corpus: the channel's IDF is fitted on it")
        if self.train.per_device_batch_size < 1:
            raise ConfigError("key 'train.per_device_batch_size' must be >= 1")
        for key in ("temperature", "distill_temperature"):
            value = getattr(self.train, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"key 'train.{key}' must be a finite number > 0, got {value}")
        for key, least in (("logging_steps", 1), ("save_total_limit", 1), ("save_steps", 0), ("eval_steps", 0),
                           ("max_steps", 0), ("gradcache_chunk_size", 0)):
            if getattr(self.train, key) < least:
                raise ConfigError(f"key 'train.{key}' must be >= {least}, got {getattr(self.train, key)}")
        for key in ("weight_decay", "warmup_ratio", "max_grad_norm"):
            value = getattr(self.train, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"key 'train.{key}' must be a finite number >= 0, got {value}")
