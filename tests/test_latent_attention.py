"""Latent-attention pooling: shape, padding invariance, instruction exclusion, save/load (head and ST)."""
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

from embed.modeling.bidirectional import make_bidirectional
from embed.modeling.latent_attention import LatentAttentionPooling, LatentAttentionST
from embed.modeling.pooling import exclude_prompt
from embed.runtime import resolve_model

HIDDEN = 32


def trained_looking_head(seed: int = 0) -> LatentAttentionPooling:
    """A head whose zero-initialised layers are filled, so it is not the identity it starts as."""
    torch.manual_seed(seed)
    head = LatentAttentionPooling(HIDDEN, num_latents=16, num_heads=4, head_dim=8)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0.0, 0.3)
    return head.eval()


def token_batch(lengths=(5, 3), max_length=6):
    torch.manual_seed(1)
    states = torch.randn(len(lengths), max_length, HIDDEN)
    mask = torch.zeros(len(lengths), max_length, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return states, mask


def masked_mean(states, mask):
    weights = mask.unsqueeze(-1).float()
    return (states * weights).sum(1) / weights.sum(1)


def test_output_shape():
    states, mask = token_batch()
    assert trained_looking_head()(states, mask).shape == (2, HIDDEN)


def test_fresh_head_is_mean_pooling():
    states, mask = token_batch()
    fresh = LatentAttentionPooling(HIDDEN, num_latents=16, num_heads=4, head_dim=8)
    assert torch.allclose(fresh(states, mask), masked_mean(states, mask), atol=1e-6)


def test_appending_padding_leaves_embedding_unchanged():
    head = trained_looking_head()
    states, mask = token_batch()
    padded_states = torch.cat([states, 100 * torch.randn(2, 4, HIDDEN)], dim=1)  # garbage behind the mask
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    expected = head(states, mask)
    assert not torch.allclose(expected, masked_mean(states, mask), atol=1e-2)  # the head does something
    assert torch.allclose(head(padded_states, padded_mask), expected, atol=1e-6)


def test_instruction_tokens_excluded_by_pooling_mask():
    """Zeroing k instruction positions in the pooling mask == pooling the token states without them."""
    head = trained_looking_head()
    states, mask = token_batch(lengths=(6, 6))
    instruction_length = 2
    pooling_mask = exclude_prompt(mask, instruction_length)
    without_instruction = head(states[:, instruction_length:], mask[:, instruction_length:])
    assert torch.allclose(head(states, mask, pooling_mask), without_instruction, atol=1e-6)
    assert not torch.allclose(head(states, mask), without_instruction, atol=1e-3)


def test_exclude_prompt_counts_real_tokens_with_left_or_right_padding():
    right = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert exclude_prompt(right, 2).tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert exclude_prompt(left, 2).tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]


def test_head_save_load_gives_identical_embeddings(tmp_path):
    head = trained_looking_head()
    states, mask = token_batch()
    head.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = LatentAttentionPooling.load(str(tmp_path)).eval()
    assert reloaded.config == head.config
    assert torch.equal(reloaded(states, mask), head(states, mask))


def test_st_module_matches_head_on_padded_and_flattened_features():
    head = trained_looking_head()
    states, mask = token_batch()
    module = LatentAttentionST(head, include_prompt=False)
    expected = head(states, mask, exclude_prompt(mask, 1))
    padded = module({"token_embeddings": states, "attention_mask": mask, "prompt_length": 1})
    assert torch.allclose(padded["sentence_embedding"], expected, atol=1e-6)
    # sentence-transformers' flash-attention layout: all real tokens in one row, cu_seq_lens marks sequences
    flat = states[mask.bool()].unsqueeze(0)
    cu_seq_lens = torch.tensor([0, 5, 8], dtype=torch.int32)
    flattened = module({"token_embeddings": flat, "cu_seq_lens_q": cu_seq_lens, "prompt_length": torch.tensor([1])})
    assert torch.allclose(flattened["sentence_embedding"], expected, atol=1e-6)


# ---------------------------------------------------------------- through a bidirectional decoder
@pytest.fixture(scope="module")
def bidirectional_llama_dir(tmp_path_factory):
    """A tiny bidirectional Llama saved with the bundled MiniLM tokenizer (vocabulary sized to it)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=tokenizer.vocab_size)
    model = LlamaModel(config).eval()
    make_bidirectional(model)
    path = tmp_path_factory.mktemp("bidirectional_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_padding_in_a_batch_leaves_embeddings_unchanged_end_to_end(bidirectional_llama_dir):
    model = LlamaModel.from_pretrained(bidirectional_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(bidirectional_llama_dir)
    head = trained_looking_head()
    texts = ["a much longer text about latent attention pooling", "short"]

    def embed(batch_texts):
        features = tokenizer(batch_texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            return head(model(**features).last_hidden_state, features["attention_mask"])

    alone = torch.cat([embed([text]) for text in texts])
    assert torch.allclose(embed(texts), alone, atol=1e-5)


def test_sentence_transformer_round_trip(bidirectional_llama_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(bidirectional_llama_dir))
    texts = ["what is latent attention", "pooling of token states"]
    prompt = "Instruct: retrieve passages\nQuery: "

    # A fresh head is mean pooling: it must agree with sentence-transformers' own Pooling,
    # prompt tokens included or excluded.
    for include_prompt in (True, False):
        fresh = LatentAttentionST(LatentAttentionPooling(HIDDEN, num_latents=16, num_heads=4, head_dim=8),
                                  include_prompt=include_prompt)
        ours = SentenceTransformer(modules=[transformer, fresh]).encode(texts, prompt=prompt, convert_to_tensor=True)
        reference = SentenceTransformer(modules=[transformer, Pooling(HIDDEN, "mean", include_prompt=include_prompt)])
        assert torch.allclose(ours, reference.encode(texts, prompt=prompt, convert_to_tensor=True), atol=1e-5)

    model = SentenceTransformer(modules=[transformer, LatentAttentionST(trained_looking_head(), include_prompt=False)])
    expected = model.encode(texts, prompt=prompt, convert_to_tensor=True)
    model.save(str(tmp_path))
    # sentence-transformers >= 6.0 imports a module class outside its own package only when trusted.
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(tmp_path))
    reloaded = SentenceTransformer(str(tmp_path), trust_remote_code=True)
    assert reloaded[0].model.config.is_causal is False
    assert torch.equal(reloaded.encode(texts, prompt=prompt, convert_to_tensor=True), expected)
