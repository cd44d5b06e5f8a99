"""Recipe rehearsal: every file in recipes/ runs through scripts/pipeline.sh at toy scale.

A recipe added to recipes/ is covered without touching this file. Each case keeps the recipe's own
settings and swaps only:

- the model, for a tiny random-init model of the same family saved to a local folder: BERT for the
  encoders (minilm, bge), a llama-nemotron-embed shaped checkpoint (config `llama_bidirec`) for
  nemotron. The BERT's word embeddings are scaled up so that texts sharing words embed close
  (otherwise its position and token-type embeddings, shared by every text, dominate and map every
  text to about the same vector; the recipes' positive-aware mining margin would then drop every
  candidate negative);
- the data (data.corpus, data.eval and training stages that read a BEIR folder), for a 12-document
  BEIR fixture with train and test judgements;
- sizes: token limits, batch size, GradCache chunk, LoRA rank, lexical buckets, generated tokens, and
  Matryoshka dims scaled to the tiny width, so a recipe that lists the full size (nemotron: 2048)
  lists the tiny model's full size (32) and evaluation must accept it;
- the generator, for a tiny random Llama loaded by the recipe's own backend. It cannot write
  usable queries, so queries.jsonl is first given rows for all but the last two documents of the
  generation plan (the fixture's own queries); gen resumes from them and generates the rest;
- hardware keys this machine lacks, named in the test id: a precision it cannot run becomes `auto`
  (`precision-auto`), 4-bit QLoRA loads the base unquantised without CUDA (`no-4bit`), a vLLM
  generator becomes `transformers` without CUDA (`gen-transformers`). DeepSpeed is not a recipe
  key: the ZeRO-3 recipe runs under accelerate_configs/cpu.yaml like every other case.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from embed.config import pipeline_stages
from tests.conftest import REPO, make_tiny_bert, write_jsonl

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TINY_WIDTH = 32
WORKERS = 2  # pipelines run at once
# Embedding widths of the recipes' base models: Matryoshka dims are scaled by TINY_WIDTH / width.
FULL_WIDTH = {"minilm": 384, "BAAI/bge-base-en-v1.5": 768, "nvidia/llama-nemotron-embed-1b-v2": 2048}
DECODER_NAMES = ("llama", "nemotron", "mistral", "qwen", "gemma")

DOCUMENTS = [
    ("Protein folding", "Chaperones help yeast proteins fold; misfolded chains aggregate under heat stress.",
     "how do chaperones fold proteins"),
    ("Liver genes", "Hepatic transcription of cholesterol enzymes rises after fasting in mice.",
     "fasting cholesterol enzyme expression"),
    ("Mitosis", "Spindle checkpoints stop chromosome segregation until every kinetochore attaches.",
     "spindle checkpoint kinetochore"),
    ("Flu immunity", "Antibody titres against influenza wane within six months of vaccination.",
     "how long does flu vaccine protection last"),
    ("Image networks", "Convolutional layers learn edge detectors that classify photographs.",
     "convolutional networks edge detection"),
    ("Small firm taxes", "Deductions for equipment purchases lower what small businesses owe.",
     "equipment deduction small business"),
    ("Contract breach", "Courts award damages when a seller fails to deliver promised goods.",
     "damages for undelivered goods"),
    ("Salmon rivers", "Removing dams lets salmon swim upstream to spawn in gravel beds.",
     "salmon after dam removal"),
    ("Perovskite cells", "Perovskite photovoltaics convert sunlight efficiently but degrade in humidity.",
     "perovskite solar humidity"),
    ("Quantum dots", "Cadmium selenide nanocrystals emit pure colours for television screens.",
     "nanocrystal colours in displays"),
    ("Shortest paths", "Dijkstra's algorithm finds minimal routes in weighted graphs.",
     "minimal route weighted graph"),
    ("Sleep memory", "Deep sleep consolidates motor skills practised during the day.",
     "does sleep help motor learning"),
]
TRAIN_JUDGED = 8  # documents 0-7 are judged in qrels/train.tsv, 8-11 in qrels/test.tsv
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


# ---------------------------------------------------------------- fixtures: data and tiny models
@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rehearsal") / "toy_beir"
    write_jsonl(path / "corpus.jsonl",
                [{"_id": f"d{i}", "title": t, "text": x} for i, (t, x, _) in enumerate(DOCUMENTS)])
    write_jsonl(path / "queries.jsonl", [{"_id": f"q{i}", "text": q} for i, (_, _, q) in enumerate(DOCUMENTS)])
    for split, rows in (("train", range(TRAIN_JUDGED)), ("test", range(TRAIN_JUDGED, len(DOCUMENTS)))):
        (path / "qrels").mkdir(exist_ok=True)
        (path / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                                     + "".join(f"q{i}\td{i}\t1\n" for i in rows))
    return path


def scale_word_embeddings(weights_file: Path, name: str, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(weights_file))
    weights[name] = weights[name] * factor
    save_file(weights, str(weights_file), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """BERT-like base for minilm / bge recipes, in the sentence-transformers layout as they are."""
    path = make_tiny_bert(tmp_path_factory.mktemp("rehearsal_bert") / "model")
    scale_word_embeddings(path / "model.safetensors", "embeddings.word_embeddings.weight", 20.0)
    return path


def minilm_tokenizer(chat: bool = False):
    from transformers import AutoTokenizer

    from embed.runtime import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))  # any local tokenizer: ids are ids
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=TINY_WIDTH, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, **extra)


@pytest.fixture(scope="module")
def tiny_nemotron(tmp_path_factory) -> Path:
    """A plain Llama checkpoint whose config.json says `llama_bidirec`, as the nemotron hub repo's does."""
    import torch
    from transformers import LlamaModel

    from tests.test_nemotron import as_nemotron_checkpoint

    path = tmp_path_factory.mktemp("rehearsal_nemotron") / "model"
    tokenizer = minilm_tokenizer()
    torch.manual_seed(0)
    LlamaModel(tiny_llama_config(tokenizer, max_position_embeddings=128)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    as_nemotron_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory) -> Path:
    """A random causal Llama with a chat template: the recipe's generator backend loads it."""
    import torch
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("rehearsal_generator") / "model"
    tokenizer = minilm_tokenizer(chat=True)
    torch.manual_seed(0)
    config = tiny_llama_config(tokenizer, max_position_embeddings=1024, eos_token_id=tokenizer.sep_token_id,
                               bos_token_id=tokenizer.cls_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- what each recipe gets swapped
def load_recipe(path: Path):
    from embed.config import build_config
    from embed.recipe import Recipe

    return build_config(Recipe, [str(path)])


def hardware_overrides(cfg) -> dict[str, tuple[str, str]]:
    """{label: (key, value)} for recipe keys that need hardware this machine lacks."""
    import torch

    from embed.errors import ConfigError
    from embed.runtime import choose_precision

    swaps = {}
    try:
        choose_precision(cfg.train.precision)
    except ConfigError:  # fp16 without CUDA, bf16 on a CPU that emulates it
        swaps["precision-auto"] = ("--train.precision", "auto")
    if cfg.model.lora.enabled and cfg.model.lora.load_in_4bit and not torch.cuda.is_available():
        swaps["no-4bit"] = ("--model.lora.load_in_4bit", "false")
    if cfg.gen.backend == "vllm" and not torch.cuda.is_available():
        swaps["gen-transformers"] = ("--gen.backend", "transformers")
    return swaps


def is_decoder(name_or_path: str) -> bool:
    return any(word in name_or_path.lower() for word in DECODER_NAMES)


def scaled_dims(cfg) -> list[int]:
    """The recipe's Matryoshka dims at the tiny width; the recipe's full size maps to TINY_WIDTH."""
    dims = cfg.model.matryoshka_dims
    full = FULL_WIDTH.get(cfg.model.name_or_path, max(dims, default=TINY_WIDTH))
    return sorted({max(1, d * TINY_WIDTH // full) for d in dims})


def toy_overrides(cfg, run_dir: Path, model: Path, generator: Path, beir: Path) -> list[str]:
    args = ["--run_dir", str(run_dir), "--model.name_or_path", str(model),
            "--data.corpus", str(beir), "--data.eval", json.dumps([str(beir)]), "--data.eval_split", "test",
            "--gen.model", str(generator), "--gen.max_new_tokens", "8",
            "--model.max_length", "32", "--model.query_max_length", "16", "--train.per_device_batch_size", "4"]
    for i, stage in enumerate(cfg.train.stages):  # a stage reading a BEIR folder reads the fixture's judged pairs
        if any("{run_dir}" not in entry for entry in stage.data):
            args += [f"--train.stages.{i}.data", json.dumps([str(beir)]), f"--train.stages.{i}.split", "train"]
    if cfg.train.gradcache_chunk_size:
        args += ["--train.gradcache_chunk_size", "2"]
    if cfg.model.lexical_weight:
        args += ["--model.lexical_dim", "64"]
    if cfg.model.matryoshka_dims:
        args += ["--model.matryoshka_dims", json.dumps(scaled_dims(cfg))]
    if cfg.model.lora.enabled:
        args += ["--model.lora.r", "4", "--model.lora.alpha", "8"]
    if cfg.model.pooling == "latent_attention":
        args += ["--model.latent_attention.num_latents", "4", "--model.latent_attention.num_heads", "2",
                 "--model.latent_attention.head_dim", "8"]
    for key, value in hardware_overrides(cfg).values():
        args += [key, value]
    return args


def give_queries(cfg, run_dir: Path, beir: Path, generate_last: int = 2) -> int:
    """queries.jsonl rows for all but the last `generate_last` units of the recipe's generation plan,
    as gen writes them, each query the fixture's own query for that document. Returns rows written."""
    from embed.data import load_corpus
    from embed.generation.generator import plan_units

    g = cfg.gen
    units = plan_units(load_corpus(str(beir)), g.max_docs, g.queries_per_doc, g.query_types, g.query_lengths, cfg.seed)
    given = units[:-generate_last]
    write_jsonl(run_dir / "queries.jsonl", [
        {"query_id": f"{u.doc_id}#{u.sample}", "doc_id": u.doc_id, "sample": u.sample, "query_type": u.query_type,
         "word_limit": u.word_limit, "query": DOCUMENTS[int(u.doc_id[1:])][2], "kept": True,
         "reject_reason": None, "attempts": 1} for u in given])
    return len(given)


def recipe_param(path: Path):
    swaps = hardware_overrides(load_recipe(path))
    return pytest.param(path, id="+".join([path.stem, *swaps]))


# ---------------------------------------------------------------- the rehearsal
@dataclass
class Rehearsal:
    cfg: object
    run_dir: Path
    given: int
    cmd: list
    out: subprocess.CompletedProcess
    seconds: float


def rehearse(recipe: Path, work: Path, beir: Path, bert: Path, nemotron: Path, generator: Path) -> Rehearsal:
    cfg = load_recipe(recipe)
    model = nemotron if is_decoder(cfg.model.name_or_path) else bert
    run_dir = work / "run"
    given = give_queries(cfg, run_dir, beir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO), "EMBED_CACHE_DIR": str(work / "cache"), "EMBED_DEMO_DIR": str(work / "demo"),
           "ACCELERATE_CONFIG": "accelerate_configs/cpu.yaml", "NUM_CPU_THREADS_PER_PROCESS": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(REPO / "scripts" / "pipeline.sh"), str(recipe),
           *toy_overrides(cfg, run_dir, model, generator, beir)]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    return Rehearsal(cfg, run_dir, given, cmd, out, time.perf_counter() - start)


@pytest.fixture(scope="module")
def rehearsals(request, tmp_path_factory, beir_dir, tiny_bert, tiny_nemotron, tiny_generator):
    """Every selected recipe's pipeline, started here WORKERS at a time; each test waits for its own.
    A pipeline is mostly single-threaded process start-up (five Python processes importing torch), so
    two at once, each process on one thread, keep both cores of a small machine busy."""
    selected = [item.callspec.params["recipe"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    pool = ThreadPoolExecutor(WORKERS)
    runs = {recipe: pool.submit(rehearse, recipe, tmp_path_factory.mktemp(recipe.stem), beir_dir, tiny_bert,
                                tiny_nemotron, tiny_generator) for recipe in selected}
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [recipe_param(p) for p in RECIPES])
def test_recipe_runs_through_the_pipeline(recipe, rehearsals):
    run = rehearsals[recipe].result()
    cfg, run_dir = run.cfg, run.run_dir
    print(f"{recipe.name}: pipeline {run.seconds:.0f}s")
    assert run.out.returncode == 0, f"{' '.join(run.cmd)}\n{run.out.stdout[-4000:]}\n{run.out.stderr[-4000:]}"

    stages = pipeline_stages(cfg)  # a recipe whose training reads no generated queries skips generation
    if "gen" in stages:
        gen = json.loads((run_dir / "gen_summary.json").read_text())
        assert gen["queries_written"] == gen["queries_planned"] == run.given + 2  # the generator wrote the last two
    else:
        assert not (run_dir / "gen_summary.json").exists()
    assert (run_dir / "mine_summary.json").exists() == ("mine" in stages)
    train = json.loads((run_dir / "train_summary.json").read_text())
    assert [s["name"] for s in train["stages"]] == [s.name for s in cfg.train.stages]
    assert all(s["steps"] >= 1 for s in train["stages"]), train["stages"]  # every stage trained
    summary = json.loads((run_dir / "eval_summary.json").read_text())
    scores = summary["ndcg_at_10"]["toy_beir"]
    assert set(scores) >= {"base", "trained"}
    assert all(0.0 <= scores[role] <= 1.0 for role in ("base", "trained"))
    if cfg.model.matryoshka_dims:  # every trained dim is evaluated, the full size included (as itself)
        matryoshka = summary["matryoshka_main_score"]
        assert sorted(int(d) for d in matryoshka) == scaled_dims(cfg)
        if FULL_WIDTH.get(cfg.model.name_or_path) in cfg.model.matryoshka_dims:
            assert matryoshka[str(TINY_WIDTH)]["toy_beir"]["trained"] == pytest.approx(scores["trained"])

    from sentence_transformers import SentenceTransformer

    from embed.modeling.model import package_modules

    folder = run_dir / "model"
    modules = json.loads((folder / "modules.json").read_text())
    assert all((folder / m["path"]).is_dir() for m in modules if m["path"])
    st = SentenceTransformer(str(folder), device="cpu", trust_remote_code=bool(package_modules(folder)))
    assert st.encode(["a query"]).shape[0] == 1
