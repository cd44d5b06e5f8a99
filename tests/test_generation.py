"""The generation stage: backends (transformers for real, openai against a local server, vLLM's
request/response handling against a stand-in engine), retries and rows, and the script's
kill-and-rerun guarantee (no duplicate, no gap, same rows as an uninterrupted run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from embed.data import load_corpus
from embed.errors import ConfigError
from embed.generation.backends import (
    STOP_STRINGS,
    OpenAIBackend,
    Sampling,
    TransformersBackend,
    VllmBackend,
    shard_bounds,
    shared_prefix,
    vllm_dtype,
)
from embed.generation.filters import BM25RoundTrip, FilterSettings, QueryFilter
from embed.generation.generator import (
    QueryGenerator,
    block_seed,
    check_resume,
    plan_units,
    resolve_task,
    row_key,
    summarise,
)
from embed.generation.prompts import (
    ANSWER_PREFIX,
    ANSWER_SCHEMA,
    DEFAULT_TASK,
    EXAMPLE_DOCUMENT,
    PromptBuilder,
    example_texts,
    parse_answer,
    render_chat,
)
from embed.io import JsonlAppender, read_jsonl

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOPICS = ["vitamin D and bone density in older women", "aspirin after a first heart attack",
          "sleep and memory of motor skills", "statins and muscle pain", "solar panel tax credits",
          "river ecology after dam removal", "graph colouring algorithms", "contract law in online sales",
          "quantum dots in solar cells", "immune response to flu vaccines", "protein folding with chaperones",
          "gene expression in yeast under heat"]


def chat_tokenizer():
    from transformers import AutoTokenizer

    from embed.runtime import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random Llama with the bundled MiniLM tokenizer and a chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama") / "model"
    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
                         bos_token_id=tokenizer.cls_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("beir")
    with open(path / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, topic in enumerate(TOPICS):
            f.write(json.dumps({"_id": f"doc{i}", "title": topic.capitalize(),
                                "text": f"A study of {topic}. Results on {topic} were measured in detail."}) + "\n")
    return path


# ---------------------------------------------------------------- plan
def test_plan_is_seeded_and_rotates_query_types(corpus_dir):
    corpus = load_corpus(str(corpus_dir))
    types = ["claim", "question", "keywords"]
    units = plan_units(corpus, max_docs=5, queries_per_doc=2, query_types=types, word_limits=[8, 24], seed=3)
    assert units == plan_units(corpus, 5, 2, types, [8, 24], seed=3)
    assert units != plan_units(corpus, 5, 2, types, [8, 24], seed=4)
    assert len(units) == 10 and len({u.doc_id for u in units}) == 5
    assert [u.sample for u in units[:4]] == [0, 1, 0, 1]
    # a document's samples share one prompt (one prefill); types rotate over documents, lengths over rounds
    assert [(u.query_type, u.word_limit) for u in units[::2]] == [
        ("claim", 8), ("question", 8), ("keywords", 8), ("claim", 24), ("question", 24)]
    assert all(units[i].query_type == units[i + 1].query_type and units[i].word_limit == units[i + 1].word_limit
               for i in range(0, 10, 2))
    assert len(plan_units(corpus, 0, 1, ["claim"], [24], seed=0)) == len(corpus)  # 0 = all documents
    assert plan_units(corpus, 8, 1, types, [24], seed=3)[:5] == plan_units(corpus, 5, 1, types, [24], seed=3)
    assert block_seed(1, 2, 0) != block_seed(1, 2, 1) != block_seed(1, 3, 0)


# ---------------------------------------------------------------- transformers, for real
def test_transformers_backend_left_pads_and_is_deterministic(tiny_generator):
    backend = TransformersBackend(str(tiny_generator), Sampling(max_new_tokens=6, temperature=0.0, top_p=1.0))
    assert backend.tokenizer.padding_side == "left"
    builder = PromptBuilder(max_doc_words=40)
    prompts = [builder.build("short document about bones", "claim"),
               builder.build(" ".join(TOPICS), "claim"),
               builder.build("a middle sized document about aspirin and hearts", "keywords"),
               builder.build("another document", "claim")]
    batched = backend.generate(prompts, seed=0)
    assert len(batched) == 4 and all(a.startswith(ANSWER_PREFIX) for a in batched)
    # greedy: a prompt's answer inside a padded batch equals its answer alone
    assert batched == [backend.generate([p], seed=0)[0] for p in prompts]
    # and equals plain left-padded generation without the shared-prefix cache
    tok, model = backend.tokenizer, backend.model
    texts = [render_chat(tok, p) for p in prompts]
    pieces = [tok([shared_prefix(p, t), t[len(shared_prefix(p, t)):]], add_special_tokens=False)["input_ids"]
              for p, t in zip(prompts, texts)]  # the backend tokenizes prefix and rest apart
    ids = [a + b for a, b in pieces]
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    plain = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                           stop_strings=STOP_STRINGS, tokenizer=tok)
    reference = tok.batch_decode(plain[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert batched == [ANSWER_PREFIX + r for r in reference]

    sampler = TransformersBackend(str(tiny_generator), Sampling(max_new_tokens=6, temperature=1.0, top_p=1.0))
    assert sampler.generate(prompts, seed=5) == sampler.generate(prompts, seed=5)
    assert sampler.generate(prompts, seed=5) != sampler.generate(prompts, seed=6)


def test_shared_prefix_is_the_chat_before_the_document(tiny_generator):
    tok = chat_tokenizer()
    prompt = PromptBuilder().build("the document text", "claim")
    text = render_chat(tok, prompt)
    prefix = shared_prefix(prompt, text)
    assert text.startswith(prefix) and prefix.endswith("<|user|>") and "the document text" not in prefix
    assert prefix == shared_prefix(PromptBuilder().build("another text", "claim"), render_chat(
        tok, PromptBuilder().build("another text", "claim")))


def test_a_generator_without_chat_template_is_prompted_with_a_transcript(tiny_generator, tmp_path):
    """A pretrained model without a chat template generates (it raised from apply_chat_template
    before), and its worked example is still a prefix computed once for every document."""
    import shutil

    pretrained = tmp_path / "pretrained"
    shutil.copytree(tiny_generator, pretrained)
    (pretrained / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((pretrained / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (pretrained / "tokenizer_config.json").write_text(json.dumps(config))
    backend = TransformersBackend(str(pretrained), Sampling(max_new_tokens=6, temperature=0.0, top_p=1.0))
    assert not backend.tokenizer.chat_template
    prompts = [PromptBuilder().build(doc, "claim") for doc in ("the document text", "another text")]
    texts = [render_chat(backend.tokenizer, p) for p in prompts]
    prefixes = {shared_prefix(p, t) for p, t in zip(prompts, texts)}
    assert len(prefixes) == 1 and EXAMPLE_DOCUMENT in prefixes.pop()
    answers = backend.generate(prompts, seed=0)
    assert answers == [backend.generate([p], seed=0)[0] for p in prompts]
    assert all(a.startswith(ANSWER_PREFIX) for a in answers)


def test_transformers_backend_missing_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="gen.model"):
        TransformersBackend(str(tmp_path / "nope"), Sampling())


# ---------------------------------------------------------------- openai, against a local server
class FakeChatServer:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 that records requests and can fail on cue."""

    def __init__(self, failures=(), delay_s=0.05):
        self.requests, self.failures, self.delay_s = [], list(failures), delay_s
        self.lock, self.in_flight, self.max_in_flight = threading.Lock(), 0, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    status = server.failures.pop(0) if server.failures else 200
                time.sleep(server.delay_s)
                with server.lock:
                    server.in_flight -= 1
                if status != 200:
                    self.send_response(status)
                    self.end_headers()
                    self.wfile.write(b'{"error": "nope"}')
                    return
                document = body["messages"][-1]["content"].split("\n")[0]
                reply = {"choices": [{"message": {"role": "assistant",
                                                  "content": json.dumps({"query": f"about {document[10:30]}"})}}]}
                payload = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def openai_backend(url, logs=None, **kw):
    kw.setdefault("backoff_s", 0.01)
    return OpenAIBackend("served-model", Sampling(32, 0.5, 0.9), api_base=url, api_key_env="TEST_GEN_KEY",
                         log=(logs.append if logs is not None else print), **kw)


def test_openai_backend_requests_order_and_concurrency(monkeypatch):
    monkeypatch.setenv("TEST_GEN_KEY", "sekrit-123")
    builder = PromptBuilder()
    prompts = [builder.build(f"{topic}. More text.", "claim") for topic in TOPICS[:6]]
    with FakeChatServer(delay_s=0.1) as server:
        backend = openai_backend(server.url, concurrency=2)
        answers = backend.generate(prompts, seed=100)
        backend.close()
    assert [parse_answer(a).query for a in answers] == [f"about {t[:20]}".strip() for t in TOPICS[:6]]
    assert server.max_in_flight == 2
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sekrit-123"
    assert first["body"]["model"] == "served-model" and first["body"]["max_tokens"] == 32
    assert first["body"]["response_format"]["json_schema"]["schema"] == ANSWER_SCHEMA
    assert sorted(r["body"]["seed"] for r in server.requests) == list(range(100, 106))


def test_openai_backend_retries_with_backoff_and_never_logs_the_key(monkeypatch):
    monkeypatch.setenv("TEST_GEN_KEY", "sekrit-123")
    logs = []
    with FakeChatServer(failures=[500, 429]) as server:
        backend = openai_backend(server.url, logs=logs, concurrency=1, max_retries=3)
        answers = backend.generate([PromptBuilder().build("Document on bones", "claim")], seed=0)
        backend.close()
    assert parse_answer(answers[0]).query is not None
    assert len(server.requests) == 3
    assert [line.split(";")[0] for line in logs] == ["openai: HTTP 500", "openai: HTTP 429"]
    assert not any("sekrit" in line for line in logs)


def test_openai_backend_errors_are_one_line_config_errors(monkeypatch):
    monkeypatch.setenv("TEST_GEN_KEY", "sekrit-123")
    prompt = PromptBuilder().build("Document", "claim")
    with FakeChatServer(failures=[401]) as server:
        with pytest.raises(ConfigError, match="HTTP 401") as err:
            openai_backend(server.url).generate([prompt], seed=0)
    assert "sekrit" not in str(err.value)
    with FakeChatServer(failures=[503] * 3) as server:
        with pytest.raises(ConfigError, match=r"failed 3 times \(last: HTTP 503\)"):
            openai_backend(server.url, max_retries=2).generate([prompt], seed=0)
    monkeypatch.delenv("TEST_GEN_KEY")
    with pytest.raises(ConfigError, match="TEST_GEN_KEY is not set"):
        openai_backend("http://127.0.0.1:9/v1")


# ---------------------------------------------------------------- vLLM, against a stand-in engine
class StandInSamplingParams:
    """Keyword names as in vllm 0.33 `SamplingParams` (unknown names raise TypeError, as there)."""

    def __init__(self, *, temperature=1.0, top_p=1.0, max_tokens=16, seed=None, stop=None, structured_outputs=None):
        self.__dict__.update(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, stop=stop,
                             structured_outputs=structured_outputs)


class StandInStructuredOutputsParams:
    def __init__(self, *, json=None, regex=None, choice=None, grammar=None, json_object=None):
        self.json = json


class StandInLLM:
    """Answers each prompt with a scripted continuation, as `LLM.generate` returns `RequestOutput`s."""

    def __init__(self, continuation):
        self.continuation, self.calls, self.tokenizer = continuation, [], chat_tokenizer()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params, use_tqdm))
        return [SimpleNamespace(outputs=[SimpleNamespace(text=self.continuation(i), finish_reason="stop")])
                for i in range(len(prompts))]


VLLM_API = SimpleNamespace(SamplingParams=StandInSamplingParams, StructuredOutputsParams=StandInStructuredOutputsParams)


def test_vllm_structured_requests_and_responses():
    engine = StandInLLM(lambda i: json.dumps({"query": f"query {i}"}))
    backend = VllmBackend("m", Sampling(40, 0.7, 0.9), structured_output=True, engine=engine, api=VLLM_API)
    prompts = [PromptBuilder().build(f"doc {i}", "claim") for i in range(3)]
    answers = backend.generate(prompts, seed=10)
    requests, params, use_tqdm = engine.calls[0]
    assert use_tqdm is False
    # token ids of the chat text, no special tokens added; the grammar starts the JSON, not the prompt
    assert requests == [{"prompt_token_ids": engine.tokenizer(render_chat(engine.tokenizer, p, with_prefix=False),
                                                               add_special_tokens=False)["input_ids"]} for p in prompts]
    assert [p.seed for p in params] == [10, 11, 12]  # per request: an answer does not depend on its batch
    assert all(p.structured_outputs.json == ANSWER_SCHEMA and p.stop is None for p in params)
    assert (params[0].temperature, params[0].top_p, params[0].max_tokens) == (0.7, 0.9, 40)
    assert [parse_answer(a).query for a in answers] == ["query 0", "query 1", "query 2"]


def test_vllm_unstructured_requests_start_the_answer():
    engine = StandInLLM(lambda i: f'claim number {i}"')  # the stop string '"}' is not returned by vLLM
    backend = VllmBackend("m", Sampling(), structured_output=False, engine=engine, api=VLLM_API)
    prompt = PromptBuilder().build("doc", "question")
    answers = backend.generate([prompt] * 2, seed=0)
    requests, params, _ = engine.calls[0]
    expected = engine.tokenizer(render_chat(engine.tokenizer, prompt), add_special_tokens=False)["input_ids"]
    assert requests == [{"prompt_token_ids": expected}] * 2  # the answer is started in the prompt
    assert all(p.stop == STOP_STRINGS and p.structured_outputs is None for p in params)
    assert [parse_answer(a).query for a in answers] == ["claim number 0", "claim number 1"]
    backend.generate([prompt], seed=0, temperature=1.3)  # a retry's temperature reaches the request
    assert engine.calls[1][1][0].temperature == 1.3


def test_vllm_output_count_mismatch_is_an_error():
    engine = StandInLLM(lambda i: "{}")
    engine.generate = lambda prompts, params, use_tqdm=True: []
    backend = VllmBackend("m", Sampling(), engine=engine, api=VLLM_API)
    with pytest.raises(RuntimeError, match="0 outputs for 1 prompts"):
        backend.generate([PromptBuilder().build("doc", "claim")], seed=0)


def test_vllm_dtype_and_data_parallel_shards():
    assert vllm_dtype("auto", native_bf16=False) == "half" and vllm_dtype("auto", native_bf16=True) == "auto"
    assert vllm_dtype("float16", True) == "half" and vllm_dtype("bfloat16", True) == "bfloat16"
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_vllm_missing_is_a_config_error():
    pytest.importorskip("torch")
    if "vllm" in sys.modules or _importable("vllm"):
        pytest.skip("vllm is installed here")
    with pytest.raises(ConfigError, match="vllm is not importable"):
        VllmBackend("m", Sampling())


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------- retries, rows, summary
class ScriptedBackend:
    """Answers by (attempt, document): exercises retry and row logic without a model.
    (The real backends are tested above.)"""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, seed, temperature=None):
        self.calls.append((len(prompts), seed, temperature))
        return [self.script(len(self.calls) - 1, p.messages[-1]["content"]) for p in prompts]


def test_unusable_answers_are_retried_and_rows_record_everything(corpus_dir, tmp_path):
    corpus = load_corpus(str(corpus_dir))

    def script(call, content):
        topic = next(t for t in TOPICS if t.capitalize() in content)
        if call == 0 and "bone" in topic:
            return '{"query": "unfinished'  # truncated: retried
        if call == 0 and "aspirin" in topic:
            return json.dumps({"query": example_texts()[1]})  # copies the worked example: retried
        if call == 0 and "sleep" in topic:
            return json.dumps({"query": "This study looks at sleep"})  # meta-text: retried, fails again
        if "sleep" in topic:
            return json.dumps({"query": "This paper is about sleep"})
        if call == 0 and "statins" in topic:
            return json.dumps({"query": "which tax credits raised solar panel installations"})  # fails the round trip
        return json.dumps({"query": f"what is known about {topic.split()[0]} {topic.split()[-1]}"})

    units = [u for u in plan_units(corpus, 0, 1, ["question"], [24], seed=0) if u.doc_id in ("doc0", "doc1", "doc2", "doc3")]
    qfilter = QueryFilter(FilterSettings(round_trip="bm25", round_trip_k=3), [BM25RoundTrip(
        [corpus.doc_text(i) for i in range(len(corpus))])], prompt_texts=example_texts())
    backend = ScriptedBackend(script)
    gen = QueryGenerator(backend, PromptBuilder(), qfilter, corpus, batch_size=4, max_retries=1, retry_temperature=0.9,
                         seed=0, log=lambda m: None)
    with JsonlAppender(tmp_path / "queries.jsonl", row_key) as out:
        stats = gen.run(units, out)
    rows = {r["doc_id"]: r for _, r in read_jsonl(tmp_path / "queries.jsonl")}
    # one batch at the recipe's temperature, then the four unusable answers at the retry temperature
    assert [(n, t) for n, _, t in backend.calls] == [(4, None), (4, 0.9)]
    assert stats["retried_answers"] == 4 and stats["generated_units"] == 4
    assert rows["doc0"]["attempts"] == 2 and rows["doc0"]["kept"] and rows["doc0"]["bm25_rank"] == 1
    assert rows["doc2"] | {"raw": None} == {
        "query_id": "doc2#0", "doc_id": "doc2", "sample": 0, "query_type": "question", "word_limit": 24,
        "query": "This paper is about sleep", "kept": False, "reject_reason": "meta_text", "attempts": 2, "raw": None}
    assert rows["doc1"]["attempts"] == 2 and rows["doc1"]["kept"]
    assert rows["doc3"]["attempts"] == 2 and rows["doc3"]["kept"] and rows["doc3"]["bm25_rank"] <= 3

    summary = summarise(tmp_path / "queries.jsonl", units, corpus)
    assert summary["queries_written"] == 4 and summary["queries_kept"] == 3
    assert summary["rejected"]["meta_text"] == 1 and sum(summary["rejected"].values()) == 1
    assert summary["share_documents_with_kept_query"] == 0.75
    assert {s["doc_id"] for s in summary["samples"]} <= {"doc0", "doc1", "doc3"}


def test_echoes_of_the_worked_example_are_rejected_and_counted(corpus_dir, tmp_path):
    """The generator answers about the example's topic (walking, sleep) for every document: only the
    document that is about sleep keeps its query; the others are counted as example echoes."""
    corpus = load_corpus(str(corpus_dir))
    units = [u for u in plan_units(corpus, 0, 1, ["question"], [24], seed=0) if u.doc_id in ("doc1", "doc2", "doc6")]
    gen = QueryGenerator(ScriptedBackend(lambda call, content: '{"query": "does sleep improve memory of skills"}'),
                         PromptBuilder(), QueryFilter(FilterSettings(round_trip="none"), prompt_texts=example_texts()),
                         corpus, batch_size=4, max_retries=0, retry_temperature=1.0, seed=0)
    with JsonlAppender(tmp_path / "q.jsonl", row_key) as out:
        gen.run(units, out)
    rows = {r["doc_id"]: r for _, r in read_jsonl(tmp_path / "q.jsonl")}
    assert {d: r["reject_reason"] for d, r in rows.items()} == {"doc1": "example_echo", "doc2": None, "doc6": "example_echo"}
    summary = summarise(tmp_path / "q.jsonl", units, corpus)
    assert summary["rejected"]["example_echo"] == 2 and summary["queries_kept"] == 1


def test_unparseable_final_answers_keep_their_raw_text(corpus_dir, tmp_path):
    corpus = load_corpus(str(corpus_dir))
    units = plan_units(corpus, 2, 1, ["claim"], [24], seed=0)
    gen = QueryGenerator(ScriptedBackend(lambda call, content: "no json here"), PromptBuilder(),
                         QueryFilter(FilterSettings(round_trip="none")), corpus, batch_size=8, max_retries=2,
                         retry_temperature=1.0, seed=0)
    with JsonlAppender(tmp_path / "q.jsonl", row_key) as out:
        gen.run(units, out)
    rows = [r for _, r in read_jsonl(tmp_path / "q.jsonl")]
    assert [(r["reject_reason"], r["parse_error"], r["raw"], r["attempts"]) for r in rows] == [
        ("malformed", "no_json", "no json here", 3)] * 2


def test_auto_task_is_brainstormed_once_and_saved(corpus_dir, tmp_path):
    corpus = load_corpus(str(corpus_dir))
    backend = ScriptedBackend(lambda call, content: '{"task": "Given a health question, retrieve studies that answer it."}')
    path = tmp_path / "gen_task.json"
    task = resolve_task("auto", backend, corpus, seed=0, path=path, log=print)
    assert task == "Given a health question, retrieve studies that answer it." and len(backend.calls) == 1
    assert resolve_task("auto", None, corpus, seed=0, path=path, log=print) == task  # reused, no generator needed
    assert json.loads(path.read_text())["brainstormed"] is True

    logs = []
    garbage = ScriptedBackend(lambda call, content: "no idea")
    assert resolve_task("auto", garbage, corpus, 0, tmp_path / "other.json", logs.append) == DEFAULT_TASK
    assert "unusable" in logs[0]
    assert resolve_task("", None, corpus, 0, path, print) == DEFAULT_TASK
    assert resolve_task("Given X, find Y.", None, corpus, 0, path, print) == "Given X, find Y."


# ---------------------------------------------------------------- the script: kill, rerun
KILL_AFTER_ONE_BLOCK = """
import os, runpy, signal, sys
from embed import io as data
original, calls = data.JsonlAppender.write, [0]
def write_then_die(self, rows):
    calls[0] += 1
    if calls[0] == 2:  # second block: half its rows reach the disk, then a torn line, then SIGKILL
        rows = list(rows)
        original(self, rows[: len(rows) // 2])
        self._file.write('{"doc_id": "torn')
        self._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, rows)
data.JsonlAppender.write = write_then_die
sys.argv = ["gen_vllm.py", *sys.argv[1:]]
runpy.run_path("scripts/gen_vllm.py", run_name="__main__")
"""


def write_recipe(path: Path, corpus_dir: Path, generator: Path, run_dir: Path, base_model: Path) -> Path:
    path.write_text(f"""run_dir: {run_dir}
seed: 7
model:
  name_or_path: {base_model}
data:
  corpus: {corpus_dir}
mine:
  cache_dir: {run_dir.parent / "cache"}
gen:
  model: {generator}
  max_docs: 10
  queries_per_doc: 1
  batch_size: 4
  max_new_tokens: 8
  temperature: 1.0
  max_retries: 1
  round_trip: either
""", encoding="utf-8")
    return path


def run_script(args, script=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "scripts/gen_vllm.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_kill_mid_run_then_rerun_equals_an_uninterrupted_run(tiny_generator, tiny_bert_dir, corpus_dir, tmp_path):
    whole = write_recipe(tmp_path / "whole.yaml", corpus_dir, tiny_generator, tmp_path / "whole", tiny_bert_dir)
    killed = write_recipe(tmp_path / "killed.yaml", corpus_dir, tiny_generator, tmp_path / "killed", tiny_bert_dir)

    first = run_script([str(killed)], KILL_AFTER_ONE_BLOCK)
    assert first.returncode == -9, first.stderr[-2000:]
    on_disk = (tmp_path / "killed" / "queries.jsonl").read_text()
    assert on_disk.endswith('{"doc_id": "torn') and on_disk.count("\n") == 6  # block 1 (4) + half of block 2 (2)

    rerun = run_script([str(killed)])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "6 already done" in rerun.stdout
    uninterrupted = run_script([str(whole)])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

    resumed_rows = [r for _, r in read_jsonl(tmp_path / "killed" / "queries.jsonl")]
    whole_rows = [r for _, r in read_jsonl(tmp_path / "whole" / "queries.jsonl")]
    keys = [row_key(r) for r in resumed_rows]
    assert len(keys) == len(set(keys)) == 10  # no duplicate, no gap
    assert resumed_rows == whole_rows  # deterministic under the seed, killed or not

    summary = json.loads((tmp_path / "killed" / "gen_summary.json").read_text())
    assert summary["queries_written"] == 10 and summary["documents_planned"] == 10
    assert sum(summary["rejected"].values()) + summary["queries_kept"] == 10
    assert summary["throughput"]["generated_units"] == 4  # only what the rerun generated
    assert summary["peak_rss_gb"] > 0 and "docs_per_s" in summary["throughput"]
    assert (tmp_path / "killed" / "gen_config.yaml").is_file()
    # round trip 'either': BM25 and the base model, whose corpus embeddings sit in the mining stage's cache
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 1


def test_rerun_with_other_settings_is_refused(corpus_dir, tmp_path):
    import shutil

    from embed.recipe import GenConfig
    from embed.retrieval.embedding_cache import corpus_fingerprint

    def key(folder):
        corpus = load_corpus(str(folder))
        return corpus_fingerprint(corpus.ids, [corpus.doc_text(i) for i in range(len(corpus))])

    corpus = key(corpus_dir)
    check_resume(tmp_path, GenConfig(), 1, corpus)
    (tmp_path / "queries.jsonl").write_text("")
    check_resume(tmp_path, GenConfig(max_docs=500), 1, corpus)  # more documents extend a run
    check_resume(tmp_path, GenConfig(cloze_queries=True), 1, corpus)  # cloze queries have their own file
    copied = tmp_path / "copy"  # the same documents elsewhere, with new file times, still resume
    shutil.copytree(corpus_dir, copied)
    check_resume(tmp_path, GenConfig(), 1, key(copied))
    with pytest.raises(ConfigError, match=r"other settings \(seed, gen.temperature changed\)"):
        check_resume(tmp_path, GenConfig(temperature=0.1), 2, corpus)
    rows = (copied / "corpus.jsonl").read_text().splitlines()
    (copied / "corpus.jsonl").write_text("\n".join(rows[:-1]) + "\n")  # one document fewer
    with pytest.raises(ConfigError, match=r"\(corpus changed\)"):
        check_resume(tmp_path, GenConfig(), 1, key(copied))
    # a run from before a key existed (here: few_shot) resumes while the key keeps its default
    saved = json.loads((tmp_path / "gen_resume.json").read_text())
    saved.pop("few_shot")
    (tmp_path / "gen_resume.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"\(gen.few_shot changed\)"):
        check_resume(tmp_path, GenConfig(few_shot=False), 1, corpus)
    (tmp_path / "gen_resume.json").write_text(json.dumps(saved))
    check_resume(tmp_path, GenConfig(), 1, corpus)


def test_gen_config_checks():
    import importlib.util

    from embed.recipe import GenConfig

    spec = importlib.util.spec_from_file_location("gen_vllm", REPO / "scripts" / "gen_vllm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.check_gen_config(GenConfig())
    for bad, key in [(dict(query_lengths=[40]), "gen.query_lengths"), (dict(query_lengths=[]), "gen.query_lengths"),
                     (dict(query_types=["claims"]), "gen.query_types"), (dict(batch_size=0), "gen.batch_size"),
                     (dict(round_trip_k=101), "gen.round_trip_k"), (dict(top_p=0.0), "gen.top_p")]:
        with pytest.raises(ConfigError, match=key):
            script.check_gen_config(GenConfig(**bad))


def test_script_user_errors_are_one_line(tiny_generator, tiny_bert_dir, corpus_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", corpus_dir, tiny_generator, tmp_path / "run", tiny_bert_dir)
    bad_type = run_script([str(recipe), "--gen.query_types", "[claims]"])
    assert bad_type.returncode == 2 and bad_type.stderr.strip().splitlines()[-1].startswith(
        "error: key 'gen.query_types': unknown type 'claims'")
    bad_model = run_script([str(recipe), "--gen.model", str(tmp_path / "missing")])
    assert bad_model.returncode == 2 and "error: key 'gen.model'" in bad_model.stderr


def test_cloze_file_is_written_once_and_left_alone_when_unchanged(tmp_path):
    """gen.cloze_queries: one row per usable document with its own positive text; a rerun with the
    same corpus and seed leaves the file untouched, so the mining stage's resume key holds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_vllm", Path(__file__).resolve().parents[1] / "scripts" / "gen_vllm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path / "beir"
    folder.mkdir()
    text = "Statins lower LDL cholesterol in most adults. Muscle pain was reported by one in ten patients overall."
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "s1", "title": "Statins", "text": text}) + "\n"
                                         + json.dumps({"_id": "s2", "title": "Short", "text": "One sentence only."}) + "\n")
    gen = SimpleNamespace(min_words=3, max_words=32, cloze_keep_sentence=0.0)
    path = tmp_path / "cloze_queries.jsonl"
    assert module.write_cloze_queries(path, load_corpus(str(folder)), gen, seed=0) == 1
    (row,) = [r for _, r in read_jsonl(path)]
    assert row["doc_id"] == "s1" and row["query_type"] == "cloze" and row["kept"]
    assert row["query"] in text and row["query"] not in row["positive_text"] and row["positive_text"].startswith("Statins ")
    mtime = path.stat().st_mtime_ns
    time.sleep(0.01)
    assert module.write_cloze_queries(path, load_corpus(str(folder)), gen, seed=0) == 1
    assert path.stat().st_mtime_ns == mtime


def test_samples_of_one_prompt_share_its_prefill_and_answer_as_if_alone(tiny_generator):
    """Equal prompts in one call are prefilled once (the model sees each distinct prompt's tokens once)
    and each gets its own answer: greedy, the answer the prompt gets alone."""
    backend = TransformersBackend(str(tiny_generator), Sampling(max_new_tokens=6, temperature=0.0, top_p=1.0))
    builder = PromptBuilder(max_doc_words=40)
    a, b = builder.build("short document about bones", "claim"), builder.build(" ".join(TOPICS), "claim")
    alone = {id(p): backend.generate([p], seed=0)[0] for p in (a, b)}
    widths = []
    hook = backend.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        answers = backend.generate([a, b, a, a, b], seed=0)
    finally:
        hook.remove()
    assert answers == [alone[id(p)] for p in (a, b, a, a, b)]
    prefill = [w for w in widths if w[1] > 1]
    assert len(prefill) == 1 and prefill[0][0] == 2  # two distinct prompts, one prefill of both
    sampler = TransformersBackend(str(tiny_generator), Sampling(max_new_tokens=6, temperature=1.0, top_p=1.0))
    samples = sampler.generate([a] * 6, seed=1)
    assert len(set(samples)) > 1 and samples == sampler.generate([a] * 6, seed=1)
