"""NV-Embed latent-attention pooling (Lee et al. 2025, arXiv 2405.17428), sized for 1B backbones.

Each token state is a *query* into a small trainable latent array (the keys and values), so the
head learns a dictionary the tokens are re-expressed in; a GEGLU MLP follows; both blocks are
pre-LayerNorm with a residual; a masked mean over the pooling mask gives the embedding.

Differences from NV-Embed, on purpose:
- the attention width is `num_heads x head_dim` (NV-Embed: 8 x 4096 on a 4096 model, ~0.7B
  parameters in the head); at hidden 2048 the defaults (8 x 64, 512 latents, MLP x4) cost 55.6M
  parameters, 50.3M of them in the MLP (mlp_ratio=2: 30.4M in all);
- the two residual branches end in zero-initialised layers, so a fresh head is the identity and
  the model starts as plain mean pooling of the backbone: a pretrained mean-pooled backbone
  (llama-nemotron-embed-1b-v2) keeps its quality at step 0 and the head learns from there.

The head is per token (tokens never attend to each other inside it), so padding positions and
tokens left out of the pooling mask cannot change the other tokens' outputs.

`LatentAttentionPooling` follows the pooling contract of embed/modeling/pooling.py. `LatentAttentionST`
wraps it as a sentence-transformers 6.2 module so `SentenceTransformer(path)` can load it from
modules.json. sentence-transformers >= 6.0 imports module classes outside its own package only
with `trust_remote_code=True`: the user must pass it explicitly (this project never does, and the
model card written by scripts/eval_mteb.py says so); `EmbeddingModel.from_pretrained` needs no flag.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from embed.modeling.pooling import exclude_prompt
from embed.modeling.st_module import PackageModule

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class LatentAttentionPooling(nn.Module):
    """token_embeddings [B,T,H] -> embedding [B,H]; see the module docstring for the design."""

    def __init__(self, hidden_size: int, num_latents: int = 512, num_heads: int = 8, head_dim: int = 64,
                 mlp_ratio: int = 4, latent_dim: int | None = None):
        super().__init__()
        self.config = {"hidden_size": hidden_size, "num_latents": num_latents, "num_heads": num_heads,
                       "head_dim": head_dim, "mlp_ratio": mlp_ratio, "latent_dim": latent_dim or hidden_size}
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        latent_dim, inner = self.config["latent_dim"], num_heads * head_dim

        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))
        self.norm_tokens = nn.LayerNorm(hidden_size)
        self.norm_latents = nn.LayerNorm(latent_dim)
        self.to_q = nn.Linear(hidden_size, inner, bias=False)
        self.to_kv = nn.Linear(latent_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, hidden_size, bias=False)
        self.norm_mlp = nn.LayerNorm(hidden_size)
        self.mlp_in = nn.Linear(hidden_size, 2 * mlp_ratio * hidden_size)  # GEGLU: value and gate halves
        self.mlp_out = nn.Linear(mlp_ratio * hidden_size, hidden_size)
        for last_layer in (self.to_out, self.mlp_out):  # identity at init (module docstring)
            nn.init.zeros_(last_layer.weight)
        nn.init.zeros_(self.mlp_out.bias)

    def token_states(self, token_embeddings: Tensor) -> Tensor:
        """Per-token output of the attention and MLP blocks, [B,T,H] -> [B,T,H]."""
        x = token_embeddings.to(self.latents.dtype)
        batch, length, _ = x.shape
        q = self.to_q(self.norm_tokens(x)).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(self.norm_latents(self.latents)).chunk(2, dim=-1)
        k, v = (t.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
                for t in (k, v))
        attended = F.scaled_dot_product_attention(q, k, v)  # every token sees every latent: no mask
        x = x + self.to_out(attended.transpose(1, 2).reshape(batch, length, -1))
        value, gate = self.mlp_in(self.norm_mlp(x)).chunk(2, dim=-1)
        return x + self.mlp_out(value * F.gelu(gate))

    def forward(self, token_embeddings: Tensor, attention_mask: Tensor, pooling_mask: Tensor | None = None) -> Tensor:
        """Mean of the token states over tokens that are real (attention_mask) and pooled (pooling_mask)."""
        mask = attention_mask if pooling_mask is None else attention_mask * pooling_mask
        states = self.token_states(token_embeddings)
        weights = mask.unsqueeze(-1).to(torch.float32)
        summed = (states.to(torch.float32) * weights).sum(dim=1)
        return (summed / weights.sum(dim=1).clamp(min=1e-9)).to(states.dtype)

    def save(self, path: str) -> None:
        """`config.json` + `model.safetensors` in `path`."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.config, f, indent=2)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(path, WEIGHTS_NAME))

    @classmethod
    def load(cls, path: str) -> "LatentAttentionPooling":
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
            head = cls(**json.load(f))
        head.load_state_dict(load_file(os.path.join(path, WEIGHTS_NAME)), strict=True)
        return head


class LatentAttentionST(PackageModule):
    """sentence-transformers module: features {token_embeddings, attention_mask} -> sentence_embedding.

    Instruction exclusion mirrors ST's `Pooling(include_prompt=False)`: with `include_prompt`
    false, the first `features["prompt_length"]` real tokens are left out of the mean. A
    `pooling_mask` feature, when present (EmbeddingModel.tokenize), takes precedence.
    """

    config_file_name = "latent_attention_st.json"
    config_keys = ["include_prompt"]

    def __init__(self, head: LatentAttentionPooling, include_prompt: bool = True):
        super().__init__()
        self.head = head
        self.include_prompt = include_prompt

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        token_embeddings, attention_mask = _padded_inputs(features)
        pooling_mask = features.get("pooling_mask")
        if pooling_mask is None and not self.include_prompt and "prompt_length" in features:
            length = features["prompt_length"]
            length = int(length.reshape(-1)[0]) if isinstance(length, Tensor) else int(length)
            pooling_mask = exclude_prompt(attention_mask, length)
        features["sentence_embedding"] = self.head(token_embeddings, attention_mask, pooling_mask)
        return features

    def get_embedding_dimension(self) -> int:
        return self.head.hidden_size

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.head.save(output_path)
        self.save_config(output_path)

    @classmethod
    def from_folder(cls, folder: str, **config) -> "LatentAttentionST":
        return cls(LatentAttentionPooling.load(folder), **config)


def _padded_inputs(features: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(token_embeddings [B,T,H], attention_mask [B,T]); re-pads ST's flash-attention flat layout."""
    token_embeddings = features["token_embeddings"]
    if "cu_seq_lens_q" not in features:
        return token_embeddings, features["attention_mask"]
    flat = token_embeddings.reshape(-1, token_embeddings.shape[-1])  # (1, total_tokens, H) -> (total, H)
    lengths = features["cu_seq_lens_q"].diff()
    mask = torch.arange(int(lengths.max()), device=flat.device) < lengths.unsqueeze(1)
    padded = flat.new_zeros(*mask.shape, flat.shape[-1])
    padded[mask] = flat
    return padded, mask.to(torch.long)
