"""The precision choice: what `auto` picks on this machine, and the user errors for impossible asks."""
import pytest
import torch

from embed.config import ConfigError
from embed.hardware import choose_precision, cpu_has_native_bf16

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rules")


def test_auto_on_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    precision, why = choose_precision("auto")
    assert precision == ("bf16" if cpu_has_native_bf16() else "no") and why


def test_auto_on_cpu_without_native_bf16_is_fp32(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr("embed.hardware.cpu_has_native_bf16", lambda: False)
    assert choose_precision("auto")[0] == "no"
    with pytest.raises(ConfigError, match="native bf16"):
        choose_precision("bf16")


def test_fp16_on_cpu_is_a_user_error():
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        choose_precision("fp16")


def test_encode_autocast_resolves_auto_and_casts_matmuls():
    from embed.hardware import encode_autocast

    assert encode_autocast(torch.device("cpu"), "fp32")[1] == "fp32"
    assert encode_autocast(torch.device("cpu"), "auto")[1] == ("bf16" if cpu_has_native_bf16() else "fp32")
    context, name = encode_autocast(torch.device("cpu"), "bf16")
    with context:
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert name == "bf16" and product.dtype == torch.bfloat16
