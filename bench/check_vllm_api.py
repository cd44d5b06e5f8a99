"""Our vLLM backend's calls checked against the real vLLM API, on a machine without a GPU.

The unit tests (tests/test_generation.py) drive `VllmBackend` with stand-in classes written to an
assumed API; this script runs the same backend code with the real `SamplingParams` and
`StructuredOutputsParams` (constructed for real) and an `LLM` recorder that binds every call
against the real `LLM.__init__` / `LLM.get_tokenizer` / `LLM.generate` signatures (an `LLM` itself
needs a GPU) and answers with real `RequestOutput` / `CompletionOutput` objects, so the attributes
we read from them are read from the real classes.

Run it with the interpreter of vLLM's own environment (vLLM pins its own torch):

    PYTHONPATH=. /opt/vllm-venv/bin/python bench/check_vllm_api.py

Prints one JSON object {"vllm": version, "backend_module": ..., "checks": {name: "ok" | error},
"ok": bool} on stdout (vLLM's own logging goes to stderr). Exit status: 0 every check ok, 1 some
check failed, 3 vllm is not installed in this interpreter.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import re
import sys
import tempfile
import traceback
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import embed` without installation

BACKEND_MODULE = "embed.generation.backends"
MODEL = "org/generator-7b"  # never loaded: the LLM is a recorder
# What a recipe's gen.vllm section passes, with values away from LLM's defaults.
BACKEND_KWARGS = dict(seed=11, dtype="auto", tensor_parallel_size=2, data_parallel_size=1, gpu_memory_utilization=0.85,
                      max_model_len=2048, enable_prefix_caching=True, trust_remote_code=False)


class CheckFailed(Exception):
    pass


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def bind(func, name: str, *args, **kwargs) -> inspect.BoundArguments:
    """`func`'s real signature bound with our call; a TypeError names the call and the real signature."""
    sig = inspect.signature(func)
    try:
        return sig.bind(*args, **kwargs)
    except TypeError as e:
        params = ", ".join(str(p).split(":")[0].split("=")[0] for p in sig.parameters.values())
        raise CheckFailed(f"{name}({params}) rejects our call ({e})") from None


def var_keyword(sig: inspect.Signature) -> str | None:
    return next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)


def init_fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls) if f.init}
    return set(inspect.signature(cls).parameters)


UNION = (typing.Union, types.UnionType)


def literal_values(annotation):
    """The values a `Literal[...]` (possibly inside a Union) allows; None when any str is allowed."""
    if isinstance(annotation, str):  # unevaluated: read the Literal's items from the text
        found = re.findall(r"Literal\[([^\]]*)\]", annotation)
        return {ast.literal_eval(v.strip()) for f in found for v in f.split(",")} if found else None
    if annotation is str:
        return None
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    if typing.get_origin(annotation) in UNION:
        values = set()
        for arg in typing.get_args(annotation):
            sub = literal_values(arg)
            if sub is None:
                return None
            values |= sub
        return values
    return None


def build_output(cls, name: str, values: dict):
    """A real `cls` built from `values` for the parameters it requires (plus those it accepts)."""
    sig = inspect.signature(cls)
    kwargs = {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "self":
            continue
        if p.name in values:
            kwargs[p.name] = values[p.name]
        elif p.default is p.empty:
            raise CheckFailed(f"{name}{sig}: required parameter {p.name!r} is unknown to this check")
    return cls(**kwargs)


class CharTokenizer:
    """What `LLM.get_tokenizer()` gives: a chat template and `__call__`; calls are bound against the
    real tokenizer type(s) `LLM.get_tokenizer` is annotated to return."""

    def __init__(self, real_types):
        self.real_types = real_types

    def apply_chat_template(self, messages, *args, **kwargs):
        for t in self.real_types:
            bind(t.apply_chat_template, f"{t.__name__}.apply_chat_template", self, messages, *args, **kwargs)
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if kwargs.get("add_generation_prompt") else "")

    def __call__(self, text, *args, **kwargs):
        for t in self.real_types:
            bind(t.__call__, f"{t.__name__}.__call__", self, text, *args, **kwargs)
        texts = [text] if isinstance(text, str) else text
        return {"input_ids": [[ord(c) % 997 for c in t] for t in texts]}


def tokenizer_types(LLM) -> list[type]:
    """The class(es) `LLM.get_tokenizer` is annotated to return that define both methods we call."""
    try:
        ret = typing.get_type_hints(LLM.get_tokenizer).get("return")
    except Exception:  # an unresolvable forward reference: nothing to bind against
        return []
    members = typing.get_args(ret) if typing.get_origin(ret) in UNION else (ret,)
    return [t for t in members if isinstance(t, type) and hasattr(t, "apply_chat_template")
            and any("__call__" in vars(k) for k in t.__mro__ if k is not object)]


def make_recorder(vllm, record: dict):
    """A class standing in for `vllm.LLM` that binds every call against the real one."""
    LLM = vllm.LLM
    init_sig = inspect.signature(LLM.__init__)
    extra = var_keyword(init_sig)
    from vllm.engine.arg_utils import EngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.outputs import CompletionOutput, RequestOutput

    engine_fields = init_fields(EngineArgs)
    tokens_keys = set(TokensPrompt.__annotations__)
    tokens_required = set(getattr(TokensPrompt, "__required_keys__", {"prompt_token_ids"}))

    class RecordingLLM:
        def __init__(self, *args, **kwargs):
            bound = bind(LLM.__init__, "LLM.__init__", self, *args, **kwargs)
            # LLM passes what its signature does not name on to EngineArgs(**kwargs)
            passed_on = bound.arguments.get(extra, {}) if extra else {}
            unknown = sorted(set(passed_on) - engine_fields)
            require(not unknown, f"LLM(**kwargs) passes {unknown} to EngineArgs, which has no such field")
            record.setdefault("llm_kwargs", []).append(dict(bound.arguments, **passed_on))
            record["llm_call"] = (args, kwargs)
            self.tokenizer = CharTokenizer(tokenizer_types(LLM))

        def get_tokenizer(self, *args, **kwargs):
            bind(LLM.get_tokenizer, "LLM.get_tokenizer", self, *args, **kwargs)
            return self.tokenizer

        def generate(self, *args, **kwargs):
            bound = bind(LLM.generate, "LLM.generate", self, *args, **kwargs)
            prompts = bound.arguments["prompts"]
            params = bound.arguments.get("sampling_params")
            require(isinstance(prompts, list) and isinstance(params, list) and len(prompts) == len(params),
                    f"LLM.generate: expected a list of prompts and one SamplingParams per prompt, got "
                    f"{type(prompts).__name__}[{len(prompts)}] and {type(params).__name__}")
            for p in prompts:
                require(isinstance(p, dict), f"LLM.generate: prompt {type(p).__name__} is not a TokensPrompt dict")
                unknown, missing = set(p) - tokens_keys, tokens_required - set(p)
                require(not unknown and not missing,
                        f"LLM.generate: prompt keys {sorted(p)} vs TokensPrompt {sorted(tokens_keys)} "
                        f"(unknown {sorted(unknown)}, missing {sorted(missing)})")
            for sp in params:
                require(isinstance(sp, vllm.SamplingParams), f"LLM.generate: {type(sp).__name__} is not a SamplingParams")
            record.setdefault("generate_calls", []).append((prompts, params, bound.arguments))
            outputs = []
            for i, prompt in enumerate(prompts):
                completion = build_output(CompletionOutput, "CompletionOutput", dict(
                    index=0, text=json.dumps({"query": f"answer {i}"}), token_ids=[1, 2, 3],
                    cumulative_logprob=None, logprobs=None, finish_reason="stop"))
                outputs.append(build_output(RequestOutput, "RequestOutput", dict(
                    request_id=str(i), prompt=None, prompt_token_ids=prompt["prompt_token_ids"],
                    prompt_logprobs=None, outputs=[completion], finished=True)))
            return outputs

    return RecordingLLM


@contextmanager
def device_capability(major: int):
    """`torch.cuda.get_device_capability` as on an sm_{major}0 GPU (there is none here)."""
    import torch

    real = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda *a, **k: (major, 0)
    try:
        yield
    finally:
        torch.cuda.get_device_capability = real


class PipeEnd:
    """The worker's end of a multiprocessing Pipe, scripted."""

    def __init__(self, messages):
        self.inbox, self.sent = list(messages), []

    def recv(self):
        return self.inbox.pop(0)

    def send(self, obj):
        self.sent.append(obj)


def run_checks(vllm, backends) -> dict:
    checks: dict[str, str] = {}

    def check(name):
        def run(fn):
            try:
                fn()
                checks[name] = "ok"
            except CheckFailed as e:
                checks[name] = str(e)
            except Exception as e:  # a real class raising on our values is a finding too
                where = traceback.extract_tb(e.__traceback__)[-1]
                checks[name] = f"{type(e).__name__}: {e} (at {where.filename}:{where.lineno})"
            return fn
        return run

    Sampling, VllmBackend = backends.Sampling, backends.VllmBackend
    schema, stop = backends.ANSWER_SCHEMA, list(backends.STOP_STRINGS)
    sampling = Sampling(max_new_tokens=48, temperature=0.7, top_p=0.9)
    record: dict = {}
    state: dict = {}

    @check("import_vllm() returns the real classes")
    def _():
        api = backends.import_vllm()
        from vllm.sampling_params import StructuredOutputsParams

        require((api.LLM, api.SamplingParams, api.StructuredOutputsParams)
                == (vllm.LLM, vllm.SamplingParams, StructuredOutputsParams), f"import_vllm() gave {api}")
        state["api"] = SimpleNamespace(LLM=make_recorder(vllm, record), SamplingParams=api.SamplingParams,
                                       StructuredOutputsParams=api.StructuredOutputsParams)

    def backend(structured: bool, major: int = 8):
        with device_capability(major):
            return VllmBackend(MODEL, sampling, structured_output=structured, api=state["api"], **BACKEND_KWARGS)

    @check("LLM(**llm_kwargs) binds LLM.__init__ (extra kwargs are EngineArgs fields)")
    def _():
        require("api" in state, "needs import_vllm()")
        state["structured"] = backend(True, major=8)
        state["unstructured"] = backend(False, major=7)
        args, kwargs = record["llm_call"]
        expected = {"model": MODEL, **{k: v for k, v in BACKEND_KWARGS.items() if k not in ("dtype", "data_parallel_size")}}
        got = record["llm_kwargs"][0]
        wrong = {k: got.get(k) for k, v in expected.items() if got.get(k) != v}
        require(not wrong and not args, f"LLM got {args} {kwargs}; differs from the backend's settings at {wrong}")
        dtypes = [k["dtype"] for k in record["llm_kwargs"]]
        require(dtypes == ["auto", "half"], f"dtype on sm_80 and sm_70: {dtypes}, wanted ['auto', 'half']")

    @check("EngineArgs(**llm_kwargs) accepts the values (what LLM.__init__ builds)")
    def _():
        require("llm_call" in record, "needs LLM(**llm_kwargs)")
        from vllm.engine.arg_utils import EngineArgs

        _, kwargs = record["llm_call"]
        # a local folder as the model: with HF_HUB_OFFLINE=1 (the Makefile's, the tests') EngineArgs
        # resolves a hub id to a cached snapshot, which this machine need not have
        with tempfile.TemporaryDirectory() as model_dir:
            args = EngineArgs(**dict(kwargs, model=model_dir))
        for key in ("max_model_len", "enable_prefix_caching", "gpu_memory_utilization", "tensor_parallel_size", "seed"):
            require(getattr(args, key) == kwargs[key], f"EngineArgs.{key} = {getattr(args, key)!r}, passed {kwargs[key]!r}")

    @check("vllm_dtype() values are LLM's dtype choices")
    def _():
        try:
            annotation = inspect.signature(vllm.LLM.__init__, eval_str=True).parameters["dtype"].annotation
        except NameError:  # a name only imported for type checking
            annotation = inspect.signature(vllm.LLM.__init__).parameters["dtype"].annotation
        allowed = literal_values(annotation)
        ours = {backends.vllm_dtype(r, native) for r in ("auto", "float32", "bfloat16", "float16") for native in (False, True)}
        ours |= {k["dtype"] for k in record.get("llm_kwargs", [])}  # what the backend passed on sm_70 and sm_80
        require(allowed is None or ours <= allowed, f"vllm_dtype gives {sorted(ours - allowed)}, LLM takes {sorted(allowed)}")

    @check("SamplingParams(**kwargs) with StructuredOutputsParams(json=ANSWER_SCHEMA)")
    def _():
        require("structured" in state, "needs the backend")
        from vllm.sampling_params import StructuredOutputsParams

        sp = state["structured"].sampling_params(seed=5, temperature=0.3)
        require(isinstance(sp, vllm.SamplingParams), f"got {type(sp).__name__}")
        got = (sp.temperature, sp.top_p, sp.max_tokens, sp.seed)
        require(got == (0.3, 0.9, 48, 5), f"(temperature, top_p, max_tokens, seed) = {got}, wanted (0.3, 0.9, 48, 5)")
        require(isinstance(sp.structured_outputs, StructuredOutputsParams) and sp.structured_outputs.json == schema,
                f"structured_outputs = {sp.structured_outputs!r}")
        require(not sp.stop, f"stop = {sp.stop!r} with structured output")

    @check("SamplingParams(**kwargs) with stop strings")
    def _():
        require("unstructured" in state, "needs the backend")
        sp = state["unstructured"].sampling_params(seed=6, temperature=1.3)
        require(list(sp.stop) == stop and sp.structured_outputs is None and (sp.temperature, sp.seed) == (1.3, 6),
                f"stop = {sp.stop!r}, structured_outputs = {sp.structured_outputs!r}, temperature/seed = {sp.temperature}/{sp.seed}")

    @check("LLM.generate(prompts, params, use_tqdm=False) binds; answers read from real RequestOutputs")
    def _():
        require("structured" in state, "needs the backend")
        prompts = [backends.Prompt([{"role": "system", "content": "You write search queries."},
                                    {"role": "user", "content": f"document {i}"}]) for i in range(3)]
        answers = state["structured"].generate(prompts, seed=20)
        require(answers == [json.dumps({"query": f"answer {i}"}) for i in range(3)], f"answers {answers}")
        _, params, arguments = record["generate_calls"][-1]
        require(arguments.get("use_tqdm") is False, f"use_tqdm = {arguments.get('use_tqdm')!r}")
        require([p.seed for p in params] == [20, 21, 22], f"seeds {[p.seed for p in params]}")
        answers = state["unstructured"].generate(prompts[:1], seed=0)
        require(answers == [prompts[0].answer_prefix + json.dumps({"query": "answer 0"})], f"answers {answers}")

    @check("tokenizer.apply_chat_template(...) and tokenizer(texts, ...) bind LLM.get_tokenizer()'s type")
    def _():
        types_found = tokenizer_types(vllm.LLM)
        require(types_found, "LLM.get_tokenizer's return annotation names no tokenizer class to bind against, "
                             "so the tokenizer calls above went unchecked")
        require("generate_calls" in record, "needs LLM.generate")  # where the calls were bound

    @check("CompletionOutput has .text and .finish_reason, RequestOutput has .outputs")
    def _():
        from vllm.outputs import CompletionOutput, RequestOutput

        missing = [f"CompletionOutput.{a}" for a in ("text", "finish_reason") if a not in init_fields(CompletionOutput)]
        missing += [] if "outputs" in inspect.signature(RequestOutput).parameters else ["RequestOutput.outputs"]
        require(not missing, f"not in the real classes: {missing}")

    @check("data-parallel worker: LLM(**llm_kwargs), generate, outputs[0].text/.finish_reason")
    def _():
        require("llm_call" in record and "generate_calls" in record, "needs the backend checks")
        _, llm_kwargs = record["llm_call"]
        prompts, params, _ = record["generate_calls"][0]
        conn = PipeEnd([(prompts[:2], params[:2]), ([], []), None])
        real_llm, visible = vllm.LLM, os.environ.get("CUDA_VISIBLE_DEVICES")
        vllm.LLM = state["api"].LLM  # the worker does `from vllm import LLM`
        try:
            backends._dp_worker(conn, "0,1", dict(llm_kwargs))
        finally:
            vllm.LLM = real_llm
            if visible is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
        expected = ["ready", [(json.dumps({"query": f"answer {i}"}), "stop") for i in range(2)], []]
        require(conn.sent == expected, f"worker sent {conn.sent}")

    return checks


def main() -> int:
    # vLLM logs to stdout: keep fd 1 for the JSON alone
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    report: dict = {"vllm": None, "backend_module": BACKEND_MODULE, "checks": {}}
    try:
        import vllm
    except ModuleNotFoundError as e:
        if e.name != "vllm":
            raise
        report["checks"]["import vllm"] = f"vllm is not installed in {sys.executable}"
        print(json.dumps(report), file=json_out, flush=True)
        return 3
    import importlib

    report["vllm"] = vllm.__version__
    backends = importlib.import_module(BACKEND_MODULE)
    report["checks"] = run_checks(vllm, backends)
    report["ok"] = all(v == "ok" for v in report["checks"].values())
    print(json.dumps(report, indent=1), file=json_out, flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
