"""The precision rules of embed.runtime, on every kind of machine: the capability probes are replaced
by stated facts (a CPU with or without native bf16, a T4, an A100), so each rule is checked against
a literal answer here, whatever hardware runs the test."""
import pytest
import torch

from embed.errors import ConfigError
from embed.runtime import (
    choose_precision,
    cpu_has_native_bf16,
    encode_autocast,
    has_native_bf16,
)


@pytest.fixture
def cpu(monkeypatch):
    """A machine without CUDA whose CPU has native bf16 or not: call the returned setter."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def with_native_bf16(native: bool):
        monkeypatch.setattr("embed.runtime.cpu_has_native_bf16", lambda: native)
    return with_native_bf16


@pytest.fixture
def gpu(monkeypatch):
    """A machine with one CUDA device of the given compute capability."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def with_capability(major: int, minor: int):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    return with_capability


# ---------------------------------------------------------------- the CPU probe
@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, True), (False, True, True), (False, False, False)])
def test_cpu_probe_is_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert cpu_has_native_bf16() is expected


def test_cpu_probe_without_the_torch_probes_is_false(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert cpu_has_native_bf16() is False


# ---------------------------------------------------------------- choose_precision on a CPU
def test_auto_on_cpu_with_native_bf16_is_bf16(cpu):
    cpu(True)
    precision, why = choose_precision("auto")
    assert precision == "bf16" and "native bf16" in why


def test_auto_on_cpu_without_native_bf16_is_fp32(cpu):
    cpu(False)
    precision, why = choose_precision("auto")
    assert precision == "no" and why.startswith("fp32")


def test_requested_precisions_on_cpu(cpu):
    cpu(True)
    assert choose_precision("bf16") == ("bf16", "bf16: requested by the recipe")
    assert choose_precision("fp32") == ("no", "fp32: requested by the recipe")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        choose_precision("fp16")
    cpu(False)
    with pytest.raises(ConfigError, match="native bf16"):
        choose_precision("bf16")


def test_auto_follows_the_accelerate_config(cpu, monkeypatch):
    cpu(True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert choose_precision("auto") == ("bf16", "bf16: set by the accelerate config")


# ---------------------------------------------------------------- choose_precision on a GPU
def test_auto_on_a100_is_bf16_and_on_t4_is_fp16(gpu):
    gpu(8, 0)
    assert choose_precision("auto")[0] == "bf16"
    gpu(7, 5)
    precision, why = choose_precision("auto")
    assert precision == "fp16" and "sm_7" in why and "loss scaling" in why


def test_bf16_on_t4_is_a_user_error_fp16_is_not(gpu):
    gpu(7, 5)
    with pytest.raises(ConfigError, match="needs sm_80"):
        choose_precision("bf16")
    assert choose_precision("fp16") == ("fp16", "fp16: requested by the recipe")


def test_has_native_bf16_per_device(gpu, cpu):
    gpu(8, 6)
    assert has_native_bf16(torch.device("cuda")) is True
    gpu(7, 0)
    assert has_native_bf16(torch.device("cuda")) is False
    cpu(False)
    assert has_native_bf16(torch.device("cpu")) is False


# ---------------------------------------------------------------- encoding autocast
def test_encode_autocast_auto_follows_the_cpu(cpu):
    cpu(True)
    assert encode_autocast(torch.device("cpu"), "auto")[1] == "bf16"
    cpu(False)
    assert encode_autocast(torch.device("cpu"), "auto")[1] == "fp32"
    assert encode_autocast(torch.device("cpu"), "fp32")[1] == "fp32"


def test_encode_autocast_bf16_casts_matmuls():
    context, name = encode_autocast(torch.device("cpu"), "bf16")
    with context:
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert name == "bf16" and product.dtype == torch.bfloat16
