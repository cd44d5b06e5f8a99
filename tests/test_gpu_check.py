"""bench/gpu_check.sh works before a GPU is at hand: its dry run covers every part on CPU, and its
pieces (the FLOP count behind MFU, the time limit, the part statuses) do what the report claims."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

PART_NAMES = ["a_bf16_throughput", "b_fp16_t4_recipe", "c_decoder_lora_gradcache", "d_exact_topk_search",
              "e_deepspeed_zero2"]


def numbers(value):
    """Every int/float inside a JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)


@pytest.mark.slow
def test_dry_run_reports_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    log = (tmp_path / "out" / "gpu_check.log").read_text()

    assert report["mode"] == "dry" and report["date"] and report["versions"]["torch"]
    assert list(report["parts"]) == PART_NAMES
    for name, entry in report["parts"].items():
        assert entry["status"] in ("ok", "skipped"), (name, entry)
        assert entry["results"] or entry["skipped"], name
        assert not entry.get("failed_checks"), (name, entry.get("failed_checks"))
        assert all(math.isfinite(x) for x in numbers(entry["results"])), name
        assert f"] {name} (" in log
    assert set(report["summary"]) == set(PART_NAMES)

    a = report["parts"]["a_bf16_throughput"]["results"]
    assert a["matmul_ceiling"]["tflops"] > 0 and "6*N*S + 12*L*H*S^2" in a["flops_formula"]
    for variant in ("eager_autocast", "compiled_autocast", "compiled_autocast_no_dropout", "compiled_bf16_weights"):
        assert a[variant]["losses_finite"] and a[variant]["sequences_per_s"] > 0, variant
        assert 0 < a[variant]["mfu_vs_measured_matmul"]
    assert a["compiled_autocast"]["dynamo_unique_graphs"] == 1  # one graph serves every layer
    assert a["best"]["variant"] in a and a["best"]["variant"] != "compiled_bf16_weights"  # the training path only
    assert a["compiled_autocast_no_dropout"]["settings"]["dropout"] == 0.0
    assert a["checks"] == {"mfu_at_least_40pct_of_measured_matmul": None, "losses_finite": True}  # no GPU MFU on a CPU

    b = report["parts"]["b_fp16_t4_recipe"]["results"]
    assert b["gradcache"]["finite"] and b["checkpointing_only"]["finite"]
    assert len(b["gradcache"]["losses"]) == b["gradcache"]["steps"] and b["gradcache"]["settings"]["temperature"] == 0.02

    c = report["parts"]["c_decoder_lora_gradcache"]["results"]
    assert c["bidirectional"]["all_ok"] and len(c["bidirectional"]["cases"]) == 6
    assert c["lora"]["losses_finite"] and c["lora"]["steps_per_s"] > 0
    assert c["qlora"]["skipped"]  # CPU: bitsandbytes 4-bit needs CUDA
    assert c["checks"]["bidirectional_all_ok"] and c["checks"]["lora_within_14gb"] is None  # no GPU memory on CPU

    d = report["parts"]["d_exact_topk_search"]["results"]
    assert d["torch"]["recall_at_k_vs_fp32"] == 1.0 and d["torch"]["queries_per_s"] > 0 and d["checks"]["torch_exact"]
    assert "skipped" in d["faiss"] or d["faiss"]["recall_at_k_vs_fp32"] == 1.0

    e = report["parts"]["e_deepspeed_zero2"]
    assert e.get("skipped") == "deepspeed is not importable here" or e["results"]["zero2"]["losses_finite"]


def test_flops_per_sequence_of_bge_base():
    import torch
    from gpu_common import BGE_BASE
    from gpu_throughput import datasheet_tflops, training_flops_per_sequence
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig(**BGE_BASE), add_pooling_layer=False)
    layer_params = sum(p.numel() for p in model.encoder.parameters())
    assert layer_params == 12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 2 * 2 * 768)  # 85,054,464
    # 6 * 85,054,464 * 256 + 12 * 12 * 768 * 256^2
    assert training_flops_per_sequence(layer_params, 12, 768, 256) == 130_643_656_704 + 7_247_757_312
    assert datasheet_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert datasheet_tflops("NVIDIA H100 PCIe") == 756.0
    assert datasheet_tflops("Some future GPU") is None


def test_a_part_past_its_time_limit_is_killed(tmp_path):
    from gpu_check import part_entry, run_part

    start = time.monotonic()
    log = tmp_path / "out.log"
    returncode, seconds = run_part([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"],
                                   5.0, log, dict(os.environ))
    assert returncode is None and seconds < 30 and time.monotonic() - start < 30
    assert "started" in log.read_text()
    entry = part_entry(None, seconds, 1.0, {"results": {"first": {"x": 1}}}, "tail")
    assert entry["status"] == "timeout" and entry["results"] == {"first": {"x": 1}}  # what it finished is kept


def test_part_statuses():
    from gpu_check import part_entry

    assert part_entry(0, 1, 10, {"results": {"x": {"y": 1}}}, "")["status"] == "ok"
    assert part_entry(0, 1, 10, {"results": {}, "skipped": "no deepspeed"}, "")["skipped"] == "no deepspeed"
    partial = part_entry(0, 1, 10, {"results": {"x": {"error": "OutOfMemoryError: ..."}, "y": {"z": 1}}}, "tail")
    assert partial["status"] == "partial" and partial["failed"] == ["x"] and partial["output_tail"] == "tail"
    crashed = part_entry(1, 1, 10, {"results": {}, "error": "ImportError: x"}, "")
    assert crashed["status"] == "error" and crashed["error"] == "ImportError: x"
    assert part_entry(0, 1, 10, {}, "")["status"] == "error"  # nothing written is not a success


FAKE_PART = """
import json, sys, time
result = sys.argv[sys.argv.index("--result") + 1]
json.dump({{"results": {{"first": {{"value": 1.5}}}}}}, open(result, "w"))
print("fake part running", flush=True)
{action}
"""


def test_a_crashing_or_hanging_part_loses_only_itself(tmp_path, monkeypatch, capsys):
    import gpu_check

    scripts = {}
    for letter, action in {"x": "raise RuntimeError('boom')", "y": "time.sleep(60)", "z": "pass"}.items():
        scripts[letter] = tmp_path / f"{letter}.py"
        scripts[letter].write_text(FAKE_PART.format(action=action))
    monkeypatch.setattr(gpu_check, "PARTS", [gpu_check.PartSpec(letter, f"{letter}_part", str(path), 5, 1)
                                             for letter, path in scripts.items()])
    monkeypatch.setattr(gpu_check, "DRY_LIMIT_S", 5)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path / "out"), "--dry", "--parts", "xyz"])
    assert gpu_check.main() == 1  # a part failed
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    crashed, hung, fine = (report["parts"][f"{letter}_part"] for letter in "xyz")
    assert crashed["status"] == "error" and "RuntimeError: boom" in crashed["output_tail"]
    assert hung["status"] == "timeout" and hung["results"] == {"first": {"value": 1.5}}
    assert fine["status"] == "ok" and fine["results"] == {"first": {"value": 1.5}}
    assert "fake part running" in (tmp_path / "out" / "gpu_check.log").read_text()
    assert "x_part" in capsys.readouterr().out  # the summary is printed
