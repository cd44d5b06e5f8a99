"""Pooling against hand-computed values, under right and left padding, and the whole registry."""
import pytest
import torch

from embed.modeling.pooling import POOLING_REGISTRY, build_pooling, pooling_class

# two sequences, hidden 2: seq0 has 3 real tokens, seq1 has 2
TOKENS = torch.tensor([[[1., 2.], [3., 4.], [5., 6.], [9., 9.]],
                       [[7., 8.], [1., 1.], [9., 9.], [9., 9.]]])
RIGHT = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def left_padded():
    """The same sequences, left padded: real tokens shifted to the end."""
    tokens = torch.tensor([[[9., 9.], [1., 2.], [3., 4.], [5., 6.]],
                           [[9., 9.], [9., 9.], [7., 8.], [1., 1.]]])
    return tokens, torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])


@pytest.mark.parametrize("side", ["right", "left"])
def test_mean_cls_last_by_hand(side):
    tokens, mask = (TOKENS, RIGHT) if side == "right" else left_padded()
    mean = build_pooling("mean", 2)(tokens, mask, mask)
    cls = build_pooling("cls", 2)(tokens, mask, mask)
    last = build_pooling("last", 2)(tokens, mask, mask)
    assert torch.allclose(mean, torch.tensor([[3., 4.], [4., 4.5]]))
    assert torch.allclose(cls, torch.tensor([[1., 2.], [7., 8.]]))
    assert torch.allclose(last, torch.tensor([[5., 6.], [1., 1.]]))


def test_mean_respects_pooling_mask():
    pooling_mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])  # instruction token excluded
    mean = build_pooling("mean", 2)(TOKENS, RIGHT, pooling_mask)
    assert torch.allclose(mean, torch.tensor([[4., 5.], [1., 1.]]))


@pytest.mark.parametrize("name", list(POOLING_REGISTRY))
def test_registry_entry_builds_and_pools(name):
    cls = pooling_class(name)
    module = build_pooling(name, 8, **({} if getattr(cls, "st_mode", None) else {"num_latents": 4, "num_heads": 2, "head_dim": 4}))
    out = module(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long))
    assert out.shape == (3, 8)


def test_unknown_pooling_is_named():
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        build_pooling("max", 8)
