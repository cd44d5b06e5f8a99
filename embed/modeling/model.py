"""The embedding model: a Hugging Face backbone + a pooling module + optional L2 normalisation.

Saved in the sentence-transformers layout (modules.json, pooling folder, prompts in
config_sentence_transformers.json), so `SentenceTransformer(path)` and `mteb.get_model(path)`
reproduce `EmbeddingModel.encode` exactly, query instruction included. Tokenisation mirrors
sentence-transformers (prompt prepended to the text; prompt length measured the same way)
for the same reason.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from embed.errors import ModelLoadError
from embed.modeling.pooling import (
    ST_MODE_TO_NAME,
    build_pooling,
    exclude_prompt,
    pooling_class,
)
from embed.runtime import resolve_model


def enable_gradient_checkpointing(backbone: nn.Module) -> None:
    """Gradient checkpointing that still trains adapters on a frozen backbone.

    With every base weight frozen the embedding output does not require grad, and a checkpointed
    block whose inputs need no grad would give its adapters none: `enable_input_require_grads`
    makes the embedding output require grad. Non-reentrant checkpointing is the variant that works
    with DDP and frozen parameters.
    """
    options = {"use_reentrant": False}
    enable = getattr(backbone, "activation_checkpointing_enable", None)  # transformers >= 5.2x; older: the alias
    if enable is not None:
        enable(activation_checkpointing_kwargs=options)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    backbone.enable_input_require_grads()
    backbone.config.use_cache = False

ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
LATENT_ATTENTION_ST = "embed.modeling.latent_attention.LatentAttentionST"
LEXICAL_CHANNEL_ST = "embed.modeling.lexical.LexicalChannelST"
LEXICAL_INPUT_ST = "embed.modeling.lexical.LexicalInputTransformer"  # module 0 when the channel has its own cut
# module paths of models saved before embed/ was grouped by stage: they still load
LEGACY_MODULE_TYPES = {"embed.latent_attention.LatentAttentionST": LATENT_ATTENTION_ST,
                       "embed.lexical.LexicalChannelST": LEXICAL_CHANNEL_ST}
EXTRA_CONFIG = "embed_config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class EncoderSettings:
    """How text becomes a vector, beyond the weights. Saved with the model."""

    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 256
    query_max_length: int = 128
    query_prompt: str = ""
    document_prompt: str = ""
    pool_prompt_tokens: bool = True
    bidirectional: bool = False


# ---------------------------------------------------------------- reading the ST layout
def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _st_pooling_mode(config: dict) -> str:
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        return mode if isinstance(mode, str) else mode[0]
    for legacy, mode in (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                         ("pooling_mode_lasttoken", "lasttoken")):
        if config.get(legacy):
            return mode
    return "mean"


def read_modules(folder: Path) -> list[dict]:
    """modules.json of a sentence-transformers folder ([] for a plain HF folder), legacy types renamed."""
    modules = _read_json(folder / "modules.json") or []
    return [{**m, "type": LEGACY_MODULE_TYPES.get(m["type"], m["type"])} for m in modules]


def read_saved_settings(folder: Path) -> tuple[EncoderSettings, Optional[tuple[str, Path]]]:
    """Settings stored with a sentence-transformers folder (or defaults for a plain HF folder).

    Returns the settings and, for a custom pooling module, its (registry name, folder).
    """
    settings = EncoderSettings()
    custom_pooling = None
    modules = read_modules(folder)
    settings.normalize = any(m["type"].endswith("Normalize") for m in modules) if modules else True
    for m in modules:
        mdir = folder / m["path"]
        if m["type"].endswith("models.Pooling"):
            cfg = _read_json(mdir / "config.json")
            mode = _st_pooling_mode(cfg)
            if mode not in ST_MODE_TO_NAME:
                raise ModelLoadError(f"{mdir}: pooling mode '{mode}' is not supported here")
            settings.pooling = ST_MODE_TO_NAME[mode]
            settings.pool_prompt_tokens = cfg.get("include_prompt", True)
        elif m["type"] == LATENT_ATTENTION_ST:
            custom_pooling = ("latent_attention", mdir)
            settings.pool_prompt_tokens = _read_json(mdir / "latent_attention_st.json").get("include_prompt", True)
        elif not m["type"].startswith("sentence_transformers.") and m["type"] not in (LEXICAL_CHANNEL_ST, LEXICAL_INPUT_ST):
            raise ModelLoadError(f"{folder}/modules.json: module type '{m['type']}' is not supported")
    st_cfg = _read_json(folder / "sentence_bert_config.json")
    settings.max_length = st_cfg.get("max_seq_length") or settings.max_length
    prompts = _read_json(folder / "config_sentence_transformers.json").get("prompts", {})
    settings.query_prompt = prompts.get("query", "")
    settings.document_prompt = prompts.get("document", "")
    extra = _read_json(folder / EXTRA_CONFIG)
    for key, value in extra.get("settings", {}).items():
        if hasattr(settings, key):
            setattr(settings, key, value)
    return settings, custom_pooling


def saved_lexical_channel(folder: Path):
    """The lexical channel (embed.modeling.lexical) a saved model's modules.json names, else None."""
    from embed.modeling.lexical import load_lexical_channel

    modules = read_modules(folder)
    dirs = [folder / m["path"] for m in modules if m["type"] == LEXICAL_CHANNEL_ST]
    return load_lexical_channel(dirs[0]) if dirs else None


# ---------------------------------------------------------------- the model
class EmbeddingModel(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer, pooling: nn.Module, settings: EncoderSettings, lexical=None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.settings = settings
        self.lexical = lexical  # embed.modeling.lexical.LexicalChannel appended after normalisation, or None
        self._prompt_lengths: dict[str, int] = {}

    # convenience views of the settings
    query_prompt = property(lambda self: self.settings.query_prompt)
    document_prompt = property(lambda self: self.settings.document_prompt)
    normalize = property(lambda self: self.settings.normalize)
    # what scores two embeddings: a cosine needs unit-norm vectors, which a BM25 channel's are not
    similarity_fn_name = property(lambda self: "cosine" if self.settings.normalize and (
        self.lexical is None or self.lexical.unit_norm) else "dot")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    # ------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, attn_implementation: str = "sdpa", dtype: str = "float32",
                        trust_remote_code: bool = False, latent_attention: Optional[dict] = None,
                        load_in_4bit: bool = False, **overrides: Any) -> "EmbeddingModel":
        """Load a base or trained model; keyword overrides (None = keep saved) win over saved settings."""
        path = resolve_model(name_or_path)
        folder = Path(path)
        lexical = None
        if folder.is_dir():
            settings, custom_pooling = read_saved_settings(folder)
            lexical = saved_lexical_channel(folder)
        elif path.startswith((".", "/", "~")) or path.endswith(("/", ".json", ".safetensors")):
            raise ModelLoadError(f"model path '{name_or_path}' does not exist")
        else:
            settings, custom_pooling = EncoderSettings(), None
        for key, value in overrides.items():
            if not hasattr(settings, key):
                raise TypeError(f"unknown model setting '{key}'")
            if value is not None:
                setattr(settings, key, value)
        kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            backbone = _load_backbone(path, kwargs, load_in_4bit)
        except (OSError, ValueError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"cannot load model '{name_or_path}': {first_line}") from None
        if tokenizer.pad_token is None:  # decoder LLMs ship without one
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"  # left padding shifts decoder position ids: embeddings would change
        if settings.bidirectional:
            from embed.modeling.bidirectional import make_bidirectional

            make_bidirectional(backbone)
        hidden = backbone.config.hidden_size
        if custom_pooling and overrides.get("pooling") in (None, custom_pooling[0]):
            pooling = pooling_class(custom_pooling[0]).load(str(custom_pooling[1]))
            settings.pooling = custom_pooling[0]
        else:
            pooling = build_pooling(settings.pooling, hidden, **(latent_attention or {}))
        return cls(backbone, tokenizer, pooling, settings, lexical=lexical)

    # ------------------------------------------------------------ tokenisation
    def _prompt_length(self, prompt: str) -> int:
        """Tokens of the prompt, minus a trailing special token: sentence-transformers' rule."""
        if prompt not in self._prompt_lengths:
            ids = self.tokenizer(prompt)["input_ids"]
            n = len(ids)
            if ids and ids[-1] in set(self.tokenizer.all_special_ids):
                n -= 1
            self._prompt_lengths[prompt] = n
        return self._prompt_lengths[prompt]

    def _kind_prompt(self, kind: str) -> str:
        return self.settings.query_prompt if kind == "query" else self.settings.document_prompt

    def _kind_max_length(self, kind: str) -> int:
        return self.settings.query_max_length if kind == "query" else self.settings.max_length

    def tokenize(self, texts: list[str], kind: str = "document", max_length: Optional[int] = None,
                 prompt: Optional[str] = None) -> dict[str, torch.Tensor]:
        """Tokenise with the kind's prompt prepended; adds `pooling_mask` (prompt tokens zeroed if excluded)."""
        if kind not in ("query", "document"):
            raise ValueError(f"kind must be 'query' or 'document', got {kind!r}")
        prompt = self._kind_prompt(kind) if prompt is None else prompt
        max_length = max_length or self._kind_max_length(kind)
        features = self.tokenizer([prompt + t for t in texts], padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt")
        attention_mask = features["attention_mask"]
        content_mask = exclude_prompt(attention_mask, self._prompt_length(prompt)) if prompt else attention_mask
        features["pooling_mask"] = attention_mask.clone() if self.settings.pool_prompt_tokens else content_mask
        if self.lexical is not None:
            features.update(self.lexical_tokens(texts, kind, prompt, dense=(features["input_ids"], content_mask)))
        return dict(features)

    def lexical_tokens(self, texts: list[str], kind: str, prompt: Optional[str] = None,
                       dense: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """What the lexical channel reads: the texts cut at its own `max_length` (a channel without one
        reads the dense half's cut: `dense`, the dense half's (input_ids, content mask), is then reused
        instead of tokenising again), the prompt masked out (a prompt's words are in every query: they
        must not match documents), and a per-row query flag (per row, so chunking a batch by rows, as
        GradCache does, keeps it aligned). With its own cut a text is tokenised twice, once per half:
        the dense half's ids must end where its model's special tokens say, and a fast tokenizer's
        second pass is small next to the forward pass (bench/README.md)."""
        prompt = self._kind_prompt(kind) if prompt is None else prompt
        if dense is not None and self.lexical.max_length is None:
            input_ids, mask = dense
        else:
            cut = self.tokenizer([prompt + t for t in texts], padding=True, truncation=True,
                                 max_length=self.lexical.max_length or self._kind_max_length(kind), return_tensors="pt")
            input_ids, mask = cut["input_ids"], cut["attention_mask"]
            mask = exclude_prompt(mask, self._prompt_length(prompt)) if prompt else mask
        return {"lexical_input_ids": input_ids, "lexical_mask": mask,
                "lexical_query": torch.full((len(texts),), kind == "query", dtype=torch.bool)}

    # ------------------------------------------------------------ forward
    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings [B, D] for tokenised features; differentiable."""
        inputs = {k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in features}
        token_embeddings = self.backbone(**inputs).last_hidden_state              # [B, T, H]
        head = next(self.pooling.parameters(), None)
        if head is not None and head.dtype != token_embeddings.dtype:  # an fp32 head on a bf16 backbone
            token_embeddings = token_embeddings.to(head.dtype)
        pooling_mask = features.get("pooling_mask", features["attention_mask"])
        embeddings = self.pooling(token_embeddings, features["attention_mask"], pooling_mask)  # [B, H]
        if self.settings.normalize:
            embeddings = nn.functional.normalize(embeddings.float(), dim=-1).to(embeddings.dtype)
        if self.lexical is not None:
            embeddings = self.lexical(embeddings, features["lexical_input_ids"], features["lexical_mask"],
                                      features["lexical_query"])
        return embeddings

    @torch.inference_mode()
    def encode(self, texts: Iterable[str], kind: str = "document", batch_size: int = 64,
               show_progress: bool = False, max_length: Optional[int] = None) -> np.ndarray:
        """float32 embeddings [N, D] in input order; batches sorted by length to minimise padding."""
        texts = list(texts)
        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self._output_dim()), dtype=np.float32)
        batches = range(0, len(texts), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode queries" if kind == "query" else f"encode {kind}s", unit="batch")
        device = self.device
        for start in batches:
            idx = order[start:start + batch_size]
            features = self.tokenize([texts[i] for i in idx], kind=kind, max_length=max_length)
            features = {k: v.to(device) for k, v in features.items()}
            out[idx] = self(features).float().cpu().numpy()
        self.train(was_training)
        return out

    def _output_dim(self) -> int:
        dense = getattr(self.pooling, "output_dim", self.hidden_size)
        return dense + (self.lexical.dim if self.lexical is not None else 0)

    # ------------------------------------------------------------ saving
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the sentence-transformers layout (weights as safetensors); with a lexical channel, also
        its dense and sparse halves as plain folders `dense/` and `sparse/` (embed.modeling.sparse_export)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        s = self.settings
        # a bidirectional decoder needs no custom module: config.json carries is_causal=false
        own_cut = self.lexical is not None and self.lexical.max_length is not None
        modules = [{"idx": 0, "name": "0", "path": "", "type": LEXICAL_INPUT_ST if own_cut else ST_TRANSFORMER}]
        if getattr(type(self.pooling), "st_mode", None):
            pool_dir = "1_Pooling"
            (path / pool_dir).mkdir(exist_ok=True)
            (path / pool_dir / "config.json").write_text(json.dumps({
                "embedding_dimension": self.hidden_size, "pooling_mode": type(self.pooling).st_mode,
                "include_prompt": s.pool_prompt_tokens}, indent=2))
            modules.append({"idx": 1, "name": "1", "path": pool_dir, "type": ST_POOLING})
        else:  # latent attention: this package's ST module. Our loader reads it directly; SentenceTransformer
            # imports it only if the user passes trust_remote_code=True (never set here; the model card says so)
            from embed.modeling.latent_attention import LatentAttentionST

            pool_dir = "1_LatentAttention"
            LatentAttentionST(self.pooling, include_prompt=s.pool_prompt_tokens).save(str(path / pool_dir))
            modules.append({"idx": 1, "name": "1", "path": pool_dir, "type": LATENT_ATTENTION_ST})
        if s.normalize:
            (path / "2_Normalize").mkdir(exist_ok=True)
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_NORMALIZE})
        if self.lexical is not None:  # this package's ST module, like the latent-attention head
            from embed.modeling.lexical import LexicalChannelST

            LexicalChannelST(self.lexical, dense_dim=getattr(self.pooling, "output_dim", self.hidden_size)).save(
                str(path / "3_LexicalChannel"))
            modules.append({"idx": 3, "name": "3", "path": "3_LexicalChannel", "type": LEXICAL_CHANNEL_ST})
        (path / "modules.json").write_text(json.dumps(modules, indent=2))
        transformer_config = {"max_seq_length": s.max_length, "do_lower_case": False}
        if own_cut:
            transformer_config["lexical_max_length"] = self.lexical.max_length
        (path / "sentence_bert_config.json").write_text(json.dumps(transformer_config, indent=2))
        prompts = {"query": s.query_prompt, "document": s.document_prompt}
        (path / "config_sentence_transformers.json").write_text(json.dumps({
            "prompts": prompts, "default_prompt_name": None, "similarity_fn_name": self.similarity_fn_name,
            "model_type": "SentenceTransformer"}, indent=2))
        (path / EXTRA_CONFIG).write_text(json.dumps({"settings": dataclasses.asdict(s)}, indent=2))
        if self.lexical is not None:  # the halves as plain folders, for a vector database (dense + sparse)
            from embed.modeling.sparse_export import (
                export_dense_half,
                export_sparse_half,
            )

            export_dense_half(path)
            if self.lexical.scheme == "tfidf":  # BM25 is served by the database's own BM25 (see the card)
                export_sparse_half(path, self.tokenizer, self.lexical, self.lexical.max_length or s.max_length)


def dense_view(model: EmbeddingModel) -> EmbeddingModel:
    """The same network without its lexical channel: shares the weights (no copy), changes nothing."""
    return EmbeddingModel(model.backbone, model.tokenizer, model.pooling, model.settings)


def package_modules(folder: str | os.PathLike) -> tuple[str, ...]:
    """The module classes of this package a saved model's modules.json names (the latent-attention
    head): loading them through sentence-transformers takes an explicit trust_remote_code=True."""
    modules = _read_json(Path(folder) / "modules.json")
    return tuple(m["type"] for m in modules if m["type"].startswith("embed."))


def _load_backbone(path: str, kwargs: dict, load_in_4bit: bool):
    """AutoModel, except nemotron's bidirectional Llama (no remote code needed) and QLoRA 4-bit."""
    from embed.modeling.nemotron import (
        is_llama_bidirectional_checkpoint,
        load_nemotron_backbone,
    )

    if load_in_4bit:
        from embed.modeling.peft import load_in_4bit as load_4bit

        return load_4bit(path, attn_implementation=kwargs.get("attn_implementation", "sdpa"))
    if Path(path).is_dir() and is_llama_bidirectional_checkpoint(path) and not kwargs["trust_remote_code"]:
        return load_nemotron_backbone(path, dtype=kwargs["dtype"], attn_implementation=kwargs.get("attn_implementation", "sdpa"))
    return AutoModel.from_pretrained(path, **kwargs)


def load_from_config(model_cfg, name_or_path: Optional[str] = None) -> EmbeddingModel:
    """Load `name_or_path` (default: the recipe's base model) with the recipe's model settings."""
    la = model_cfg.latent_attention
    return EmbeddingModel.from_pretrained(
        name_or_path or model_cfg.name_or_path,
        attn_implementation=model_cfg.attn_implementation, dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        latent_attention={"num_latents": la.num_latents, "num_heads": la.num_heads, "head_dim": la.head_dim,
                          "mlp_ratio": la.mlp_ratio},
        load_in_4bit=model_cfg.lora.enabled and model_cfg.lora.load_in_4bit,
        pooling=model_cfg.pooling, normalize=model_cfg.normalize, max_length=model_cfg.max_length,
        query_max_length=model_cfg.query_max_length, query_prompt=model_cfg.query_prompt,
        document_prompt=model_cfg.document_prompt, pool_prompt_tokens=model_cfg.pool_prompt_tokens,
        bidirectional=model_cfg.bidirectional or None)
