"""The lexical channel: a lexical retrieval score appended to the dense embedding, in one vector.

Why: a small dense model misses the rare terms a specialised domain is searched by. On SciFact's
train pairs (a dev set the recipes never read) all-MiniLM-L6-v2 ranks at nDCG@10 66.02, this
channel's BM25 alone at 67.32, and the two mixed at 72.98: their errors differ. SPAR (Chen et al. 2022, arXiv 2110.06918)
concatenates a dense retriever with a dense imitation of a lexical one, so that one inner product
scores both. Here the lexical half is exact and feature-hashed into `dim` signed buckets, so the
vector stays fixed-size whatever the vocabulary, with statistics fitted on the domain corpus
(data.corpus: unlabeled, the corpus generation reads):

    embedding = [sqrt(1 - w) * dense ; sqrt(w) * lexical]            (dense unit-norm)
    query . document = (1 - w) * cosine_dense + w * lexical_score

Two schemes (`model.lexical_scheme`):
- `bm25` (BM25Channel): Lucene BM25 of stemmed words (bm25s' tokenizer, English stopwords and
  Snowball stemmer), divided by the query's best possible score (the sum of its terms' IDF), so the
  lexical score lies in [0, 1] like a cosine. Queries and documents get different vectors (binary
  query terms x 1/bound; BM25 term weights for documents), so the one vector is scored by dot product.
  Whole words keep a rare term rare, where its word pieces are common ones. Dev sets, untrained base
  MiniLM, 16,384 buckets, best weight (bench/lexical_dev.py), both reading the dense half's 256
  tokens: SciFact's train pairs 72.98 against 71.67 for word-piece TF-IDF, CACM 52.65 against 46.38;
  BM25 reading 4,096 tokens 73.79 and 53.71.
- `tfidf` (LexicalChannel): sublinear TF-IDF of the model's own word pieces, both sides unit-norm
  (the cosine is a cosine), exportable as a standard SparseEncoder (embed.modeling.sparse_export).

The channel has no trainable weights; the dense half is trained as before. `LexicalChannelST` is
either scheme as a sentence-transformers module (loading it takes trust_remote_code=True, as for the
latent-attention head); it tells queries from documents by the `task` that `encode_query` /
`encode_document` pass. A channel with its own cut (`max_length`, model.lexical_max_length) reads
more of a text than the dense half; `LexicalInputTransformer`, the saved model's first module, then
tokenises each text a second time for it. A saved model also holds its dense half as a plain folder
(embed.modeling.sparse_export).
"""
from __future__ import annotations

import functools
import json
import math
import os
from collections import Counter
from typing import Any, Iterable, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers.models import Transformer
from torch import Tensor, nn

from embed.modeling.pooling import exclude_prompt
from embed.modeling.st_module import PackageModule

CONFIG_NAME = "lexical_channel.json"
WEIGHTS_NAME = "lexical_channel.safetensors"


class HashedChannel(nn.Module):
    """What both schemes share: `lexical(input_ids, mask, is_query)` [B, dim] appended to the dense
    embedding with weight w, and the config and tables (idf, bucket, sign) written the same way.

    `max_length` is how many tokens of each text the channel reads. BM25 scores a whole document,
    while the dense half reads only its first `model.max_length` tokens; a term the dense half never
    sees still matches here (on SciFact's train pairs the BM25 channel alone ranks 68.96 reading
    4,096 tokens against 67.32 reading 256: bench/README.md). None: the dense half's cut, as
    channels saved before the key read."""

    max_length: Optional[int] = None

    def forward(self, dense: Tensor, input_ids: Tensor, mask: Tensor, is_query: Optional[Tensor] = None) -> Tensor:
        return concatenate(dense, self.lexical(input_ids, mask, is_query), self.weight)

    def save_tables(self, folder: str | os.PathLike, config: dict) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump({"scheme": self.scheme, "dim": self.dim, "weight": self.weight, "seed": self.seed,
                       "max_length": self.max_length, **config}, f, indent=2)
        save_file({name: getattr(self, name).cpu().contiguous() for name in ("idf", "bucket", "sign")},
                  os.path.join(folder, WEIGHTS_NAME))


class LexicalChannel(HashedChannel):
    """Hashed sublinear TF-IDF of token ids, concatenated to a unit-norm dense embedding with weight w."""

    scheme = "tfidf"
    unit_norm = True  # both halves unit-norm: the concatenation is too, and its dot product a cosine

    def __init__(self, idf: Tensor, dim: int, weight: float, seed: int = 0,
                 bucket: Tensor | None = None, sign: Tensor | None = None):
        """`bucket` / `sign`: the hashing tables (token id -> bucket, +-1); drawn from `seed` when not
        given. A saved channel stores them, so it never depends on torch's random stream."""
        super().__init__()
        if not 0.0 < weight < 1.0:
            raise ValueError(f"lexical weight must be in (0, 1), got {weight}")
        if dim < 1:
            raise ValueError(f"lexical dim must be >= 1, got {dim}")
        self.dim, self.weight, self.seed = dim, weight, seed
        if bucket is None or sign is None:
            bucket, sign = hashing_tables(len(idf), dim, seed)
        if bucket.shape != idf.shape or sign.shape != idf.shape or int(bucket.max()) >= dim:
            raise ValueError(f"lexical tables do not fit: idf {tuple(idf.shape)}, bucket {tuple(bucket.shape)} "
                             f"(max {int(bucket.max())}, dim {dim}), sign {tuple(sign.shape)}")
        self.register_buffer("idf", idf.float())
        self.register_buffer("bucket", bucket.long())
        self.register_buffer("sign", sign.float())

    @classmethod
    def fit(cls, token_ids: Iterable[list[int]], vocab_size: int, ignore_ids: Iterable[int], dim: int,
            weight: float, seed: int = 0) -> "LexicalChannel":
        """IDF from the documents' token ids (smoothed as scikit-learn's: log((1 + N) / (1 + df)) + 1);
        `ignore_ids` (special tokens) get 0 and never count."""
        df = torch.zeros(vocab_size, dtype=torch.float64)
        n = 0
        for ids in token_ids:
            df[torch.tensor(sorted(set(ids)), dtype=torch.long)] += 1
            n += 1
        if n == 0:
            raise ValueError("lexical channel: no documents to fit the IDF on")
        idf = torch.log((1 + n) / (1 + df)) + 1
        idf[torch.tensor(sorted(set(ignore_ids)), dtype=torch.long)] = 0
        return cls(idf, dim, weight, seed)

    def lexical(self, input_ids: Tensor, mask: Tensor, is_query: Optional[Tensor] = None) -> Tensor:
        """Unit-norm hashed TF-IDF [B, dim] of each row's tokens where mask is 1 (the same for queries
        and documents: `is_query` is ignored)."""
        counts = torch.zeros(input_ids.shape[0], len(self.idf), device=input_ids.device)
        counts.scatter_add_(1, input_ids, mask.float())
        tf_idf = torch.where(counts > 0, 1 + torch.log(counts.clamp(min=1)), counts) * self.idf
        hashed = torch.zeros(input_ids.shape[0], self.dim, device=input_ids.device)
        hashed.index_add_(1, self.bucket, tf_idf * self.sign)
        return nn.functional.normalize(hashed, dim=-1)

    def save(self, folder: str | os.PathLike) -> None:
        self.save_tables(folder, {"vocab_size": len(self.idf)})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "LexicalChannel":
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            config = json.load(f)
        tables = load_file(os.path.join(folder, WEIGHTS_NAME))
        idf = tables["idf"]
        if len(idf) != config["vocab_size"]:
            raise ValueError(f"{folder}: {len(idf)} IDF entries for a vocabulary of {config['vocab_size']}")
        # channels saved before the tables were stored: drawn again from the seed, as they were then
        channel = cls(idf, config["dim"], config["weight"], config["seed"], tables.get("bucket"), tables.get("sign"))
        channel.max_length = config.get("max_length")
        return channel


def concatenate(dense: Tensor, lexical: Tensor, weight: float) -> Tensor:
    """[sqrt(1 - w) * dense ; sqrt(w) * lexical]; `dense` is expected unit-norm."""
    return torch.cat([math.sqrt(1 - weight) * dense, math.sqrt(weight) * lexical.to(dense.dtype)], dim=-1)


def hashing_tables(size: int, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """(bucket [size] in [0, dim), sign [size] of +-1) for `size` terms, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    bucket = torch.randint(0, dim, (size,), generator=generator)
    sign = torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1
    return bucket, sign


@functools.lru_cache(maxsize=1)
def _english_stemmer():
    """One Snowball stemmer per process: words() runs on every batch the model encodes."""
    import Stemmer

    return Stemmer.Stemmer("english")


# Robertson's textbook BM25 parameters (also Lucene's b); not tuned on any benchmark. On the dev sets,
# k1 in {0.9, 1.2, 1.5} and b in {0.4, 0.75} move the mixed score by less than 0.3 on SciFact.
BM25_K1, BM25_B = 1.2, 0.75
TERMS_NAME = "lexical_terms.json"


class BM25Channel(HashedChannel):
    """Hashed BM25 of stemmed words over the bound of the query's score; see the module docstring.

    Words come from token ids (decoded with the model's tokenizer, so every path, ours, MTEB's and
    sentence-transformers', reads the same text, cut at the channel's `max_length`), cut and stemmed by bm25s as
    embed.retrieval.bm25_index does. A document's vector holds Lucene's BM25 term weight
    idf * tf / (tf + k1 * (1 - b + b * length / mean length)) per term, a query's vector 1 / (sum of
    its terms' idf) per distinct term, so their dot product is the document's BM25 score for the
    query divided by the best score any document could reach, in [0, 1]. Terms the fitting corpus
    never holds are dropped (no document of that corpus can match them); they still count in a
    document's length. The statistics are frozen at fitting: documents added later are weighed with
    the corpus' IDF and mean length.
    """

    scheme = "bm25"
    unit_norm = False  # a document's BM25 vector has no fixed length: score by dot product

    def __init__(self, tokenizer, terms: list[str], idf: Tensor, mean_length: float, dim: int, weight: float,
                 seed: int = 0, bucket: Tensor | None = None, sign: Tensor | None = None,
                 k1: float = BM25_K1, b: float = BM25_B):
        super().__init__()
        if not 0.0 < weight < 1.0:
            raise ValueError(f"lexical weight must be in (0, 1), got {weight}")
        if dim < 1 or not terms or len(terms) != len(idf):
            raise ValueError(f"BM25 channel: dim {dim} must be >= 1 and {len(terms)} terms need as many IDF "
                             f"values ({len(idf)}), at least one")
        if bucket is None or sign is None:
            bucket, sign = hashing_tables(len(terms), dim, seed)
        self.tokenizer, self.terms = tokenizer, list(terms)
        self.term_index = {t: i for i, t in enumerate(self.terms)}
        self.dim, self.weight, self.seed, self.mean_length, self.k1, self.b = dim, weight, seed, mean_length, k1, b
        self.register_buffer("idf", idf.float())
        self.register_buffer("bucket", bucket.long())
        self.register_buffer("sign", sign.float())

    @staticmethod
    def words(tokenizer, rows: list[list[int]]) -> list[list[str]]:
        """Each row of token ids as bm25s' stemmed words, English stopwords dropped."""
        import bm25s

        texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
        return bm25s.tokenize(texts, stopwords="en", stemmer=_english_stemmer(), return_ids=False, show_progress=False)

    @classmethod
    def fit(cls, tokenizer, token_ids: Iterable[list[int]], dim: int, weight: float, seed: int = 0,
            batch_size: int = 1024) -> "BM25Channel":
        """Document frequencies and mean length over the documents' token ids (Lucene's IDF,
        log(1 + (N - df + 0.5) / (df + 0.5)), as bm25s computes it)."""
        df, n, total = Counter(), 0, 0
        batch: list[list[int]] = []

        def count(rows):
            nonlocal n, total
            for words in cls.words(tokenizer, rows):
                df.update(set(words))
                n, total = n + 1, total + len(words)

        for ids in token_ids:
            batch.append(ids)
            if len(batch) == batch_size:
                count(batch)
                batch = []
        if batch:
            count(batch)
        if not df:
            raise ValueError("lexical channel: no words in the documents to fit BM25 on")
        terms = sorted(df)
        freq = torch.tensor([df[t] for t in terms], dtype=torch.float64)
        idf = torch.log(1 + (n - freq + 0.5) / (freq + 0.5))
        return cls(tokenizer, terms, idf, total / n, dim, weight, seed)

    def lexical(self, input_ids: Tensor, mask: Tensor, is_query: Optional[Tensor] = None) -> Tensor:
        """[B, dim]: BM25 term weights for documents, 1 / score bound per term for queries (rows where
        `is_query` is true; None = all documents)."""
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), mask.cpu())]
        queries = [False] * len(rows) if is_query is None else [bool(q) for q in is_query.reshape(-1).tolist()]
        out = torch.zeros(len(rows), self.dim)
        for r, (words, query) in enumerate(zip(self.words(self.tokenizer, rows), queries)):
            counts = Counter(self.term_index[w] for w in words if w in self.term_index)
            if not counts:
                continue
            index = torch.tensor(list(counts), dtype=torch.long)
            idf = self.idf[index].cpu()
            if query:
                values = torch.full_like(idf, 1.0 / float(idf.sum())) if float(idf.sum()) > 0 else torch.zeros_like(idf)
            else:
                tf = torch.tensor(list(counts.values()), dtype=torch.float32)
                norm = self.k1 * (1 - self.b + self.b * len(words) / self.mean_length)
                values = idf * tf / (tf + norm)
            out[r].index_add_(0, self.bucket[index].cpu(), values * self.sign[index].cpu())
        return out.to(input_ids.device)

    def save(self, folder: str | os.PathLike) -> None:
        self.save_tables(folder, {"k1": self.k1, "b": self.b, "mean_length": self.mean_length,
                                  "terms": len(self.terms), "stopwords": "en", "stemmer": "english"})
        with open(os.path.join(folder, TERMS_NAME), "w", encoding="utf-8") as f:
            json.dump(self.terms, f, ensure_ascii=False)
        self.tokenizer.save_pretrained(folder)  # the decoder of the token ids, so the folder stands alone

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "BM25Channel":
        from transformers import AutoTokenizer

        with open(os.path.join(folder, CONFIG_NAME)) as f:
            config = json.load(f)
        with open(os.path.join(folder, TERMS_NAME), encoding="utf-8") as f:
            terms = json.load(f)
        if len(terms) != config["terms"]:
            raise ValueError(f"{folder}: {len(terms)} terms, its config says {config['terms']}")
        tables = load_file(os.path.join(folder, WEIGHTS_NAME))
        channel = cls(AutoTokenizer.from_pretrained(folder), terms, tables["idf"], config["mean_length"], config["dim"],
                      config["weight"], config["seed"], tables["bucket"], tables["sign"], config["k1"], config["b"])
        channel.max_length = config.get("max_length")
        return channel


LEXICAL_SCHEMES = {"tfidf": LexicalChannel, "bm25": BM25Channel}


def load_lexical_channel(folder: str | os.PathLike):
    """The channel saved in `folder`, of the scheme its config names (channels saved before schemes
    existed are TF-IDF)."""
    with open(os.path.join(folder, CONFIG_NAME)) as f:
        scheme = json.load(f).get("scheme", "tfidf")
    return LEXICAL_SCHEMES[scheme].load(folder)


class LexicalChannelST(PackageModule):
    """sentence-transformers module, after Normalize: sentence_embedding -> [dense ; lexical]."""

    config_file_name = "lexical_channel_st.json"
    config_keys = ["dense_dim"]
    forward_kwargs = {"task"}  # "query" from encode_query, "document" from encode_document

    def __init__(self, channel, dense_dim: int):
        super().__init__()
        self.channel, self.dense_dim = channel, dense_dim

    def forward(self, features: dict[str, Any], task: Optional[str] = None, **kwargs) -> dict[str, Any]:
        """`task` None (plain `encode`) encodes documents: a BM25 channel's queries need `encode_query`."""
        # a prompt's words are in every query: they must not match documents that happen to hold them
        length = features.get("prompt_length", 0)
        length = int(length.reshape(-1)[0]) if isinstance(length, Tensor) else int(length)
        # the channel's own cut (LexicalInputTransformer), else the dense half's tokens (channels saved before)
        ids = features.get("lexical_input_ids", features["input_ids"])
        mask = features.get("lexical_attention_mask", features["attention_mask"])
        mask = exclude_prompt(mask, length) if length else mask
        is_query = torch.full((mask.shape[0],), task == "query", dtype=torch.bool)
        features["sentence_embedding"] = self.channel(features["sentence_embedding"], ids, mask, is_query)
        return features

    def get_embedding_dimension(self) -> int:
        return self.dense_dim + self.channel.dim

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.channel.save(output_path)
        self.save_config(output_path)

    @classmethod
    def from_folder(cls, folder: str, **config) -> "LexicalChannelST":
        return cls(load_lexical_channel(folder), **config)


class LexicalInputTransformer(Transformer):
    """sentence-transformers' Transformer module that also tokenises each text at the lexical channel's
    own cut: modules after the first see token ids only, and the dense half's stop at max_seq_length.
    Loads, like LexicalChannelST, with trust_remote_code=True; the exported dense half uses the plain
    Transformer (embed.modeling.sparse_export)."""

    config_keys = [*Transformer.config_keys, "lexical_max_length"]
    LEXICAL_KEYS = ("lexical_input_ids", "lexical_attention_mask")

    def __init__(self, model_name_or_path: str, *, lexical_max_length: int, **kwargs):
        super().__init__(model_name_or_path, **kwargs)
        self.lexical_max_length = lexical_max_length

    def preprocess(self, inputs, prompt: Optional[str] = None, **kwargs) -> dict[str, Any]:
        features = super().preprocess(inputs, prompt=prompt, **kwargs)
        if not all(isinstance(text, str) for text in inputs):
            raise ValueError("a model with a lexical channel encodes texts only (one string per input)")
        cut = self.tokenizer([(prompt or "") + text for text in inputs], padding=True, truncation=True,
                             max_length=self.lexical_max_length, return_tensors="pt")
        features["lexical_input_ids"], features["lexical_attention_mask"] = cut["input_ids"], cut["attention_mask"]
        return features

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        lexical = {key: features.pop(key) for key in self.LEXICAL_KEYS if key in features}  # not the network's
        features = super().forward(features, **kwargs)
        features.update(lexical)
        return features


def append_channel(model, texts: list[str], dense: Tensor, kind: str, batch_size: int) -> Iterator[Tensor]:
    """[dense ; lexical] rows of `texts`, batch by batch in input order, from dense embeddings
    computed elsewhere: the channel needs token ids only, so no network runs here. `model` is an
    EmbeddingModel carrying the channel: its tokenisation keeps a prompt out of lexical matching."""
    device = model.lexical.idf.device
    for start in range(0, len(texts), batch_size):
        features = model.lexical_tokens(texts[start:start + batch_size], kind=kind)  # no dense tokens: no network
        yield model.lexical(dense[start:start + batch_size].to(device), features["lexical_input_ids"].to(device),
                            features["lexical_mask"].to(device), features["lexical_query"].to(device))


def fit_lexical_channel(model, texts: list[str], dim: int, weight: float, seed: int = 0, scheme: str = "tfidf",
                        batch_size: int = 1024, max_length: Optional[int] = None):
    """The channel of `scheme` for `model` (an EmbeddingModel), its statistics over `texts` as the
    channel will read them: their first `max_length` tokens (0 or None: the model's document cut,
    as model.lexical_max_length says), streamed in batches."""
    tokenizer = model.tokenizer

    def token_ids():
        for start in range(0, len(texts), batch_size):
            yield from tokenizer(texts[start:start + batch_size], truncation=True,
                                 max_length=max_length or model.settings.max_length)["input_ids"]

    if scheme == "bm25":
        channel = BM25Channel.fit(tokenizer, token_ids(), dim, weight, seed, batch_size)
    else:
        channel = LexicalChannel.fit(token_ids(), len(tokenizer), tokenizer.all_special_ids, dim, weight, seed)
    channel.max_length = max_length or None
    return channel
