"""Prompt building (messages, worked example, template checks) and parsing of generator answers."""
from __future__ import annotations

import json

import pytest

from embed.errors import ConfigError
from embed.generation.prompts import (
    ANSWER_PREFIX,
    DEFAULT_TASK,
    EXAMPLE_DOCUMENT,
    QUERY_TYPES,
    PromptBuilder,
    example_texts,
    parse_answer,
    render_chat,
    render_transcript,
    task_prompt,
    truncate_words,
)

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
DOC = "Vitamin D and bone density. In 300 women, daily vitamin D raised hip bone density after two years."


@pytest.fixture(scope="module")
def tiny_chat_tokenizer():
    """The bundled MiniLM tokenizer with a minimal chat template (any local tokenizer will do)."""
    from transformers import AutoTokenizer

    from embed.runtime import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------- building
def test_build_has_system_example_turn_and_document_last():
    prompt = PromptBuilder(task="Given a claim, find evidence.").build(DOC, "claim")
    roles = [m["role"] for m in prompt.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert "Given a claim, find evidence." in prompt.messages[0]["content"]
    assert EXAMPLE_DOCUMENT in prompt.messages[1]["content"]
    assert json.loads(prompt.messages[2]["content"]) == {"query": QUERY_TYPES["claim"].example_answer}
    assert DOC in prompt.messages[3]["content"]
    assert QUERY_TYPES["claim"].description in prompt.messages[3]["content"]
    assert prompt.answer_prefix == ANSWER_PREFIX


def test_word_limit_varies_in_the_request_not_in_the_example():
    prompt = PromptBuilder(max_words=24).build(DOC, "claim", max_words=8)
    assert "at most 8 words" in prompt.messages[-1]["content"]
    assert "at most 24 words" in prompt.messages[1]["content"]  # the shared prefix stays the same


def test_without_few_shot_there_is_no_example_turn():
    prompt = PromptBuilder(few_shot=False).build(DOC, "keywords")
    assert [m["role"] for m in prompt.messages] == ["system", "user"]
    assert DEFAULT_TASK in prompt.messages[0]["content"]


@pytest.mark.parametrize("qtype", sorted(QUERY_TYPES))
def test_each_query_type_is_described_and_has_its_own_example(qtype):
    prompt = PromptBuilder().build(DOC, qtype)
    assert QUERY_TYPES[qtype].description in prompt.messages[-1]["content"]
    assert QUERY_TYPES[qtype].example_answer in prompt.messages[2]["content"]


def test_document_is_truncated_to_max_doc_words():
    long_doc = " ".join(f"w{i}" for i in range(500))
    content = PromptBuilder(max_doc_words=10).build(long_doc, "question").messages[-1]["content"]
    assert "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9\n" in content and "w10" not in content
    assert truncate_words("a  b\nc d", 3) == "a b c"
    assert truncate_words("a b", 0) == "a b"  # 0 = no limit


def test_custom_template_is_used_and_checked():
    prompt = PromptBuilder(template="Doc: {document} | {query_type} | {max_words}", max_words=7).build(DOC, "claim")
    assert prompt.messages[-1]["content"].startswith("Doc: Vitamin D") and prompt.messages[-1]["content"].endswith("| 7")
    with pytest.raises(ConfigError, match=r"unknown placeholder \{doc\}"):
        PromptBuilder(template="{doc}")
    with pytest.raises(ConfigError, match="must contain the {document}"):
        PromptBuilder(template="no document here")
    with pytest.raises(ConfigError, match="gen.prompt_template"):
        PromptBuilder(template="{document} {")


def test_unknown_query_type_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown query type 'claims'"):
        PromptBuilder().build(DOC, "claims")


def test_example_texts_cover_the_worked_example():
    texts = example_texts()
    assert EXAMPLE_DOCUMENT in texts
    assert all(t.example_answer in texts for t in QUERY_TYPES.values())


def test_render_chat_appends_the_answer_prefix(tiny_chat_tokenizer):
    prompt = PromptBuilder().build(DOC, "claim")
    text = render_chat(tiny_chat_tokenizer, prompt)
    assert text.endswith("<|assistant|>" + ANSWER_PREFIX)
    assert render_chat(tiny_chat_tokenizer, prompt, with_prefix=False).endswith("<|assistant|>")


def test_a_generator_without_chat_template_gets_a_plain_transcript():
    """A pretrained model (no chat template) continues text: the worked example's request with its
    answer on the next line, a blank line, the document's request, and the started answer."""
    from types import SimpleNamespace

    prompt = PromptBuilder(task="Given a claim, find evidence.").build(DOC, "claim")
    _, example_request, example_answer, request = (m["content"] for m in prompt.messages)
    pretrained = SimpleNamespace(chat_template=None, bos_token="<bos>")
    text = render_chat(pretrained, prompt)
    assert text == f"<bos>{example_request}\n{example_answer}\n\n{request}\n{ANSWER_PREFIX}"
    assert "Given a claim, find evidence." not in text  # the system message addresses an assistant
    assert render_chat(SimpleNamespace(chat_template=None, bos_token=None), prompt, with_prefix=False) \
        == render_transcript(prompt.messages) == text[len("<bos>"):-len(ANSWER_PREFIX)]


def test_task_prompt_shows_documents_and_starts_a_task_answer():
    prompt = task_prompt([DOC, "Second document about tax law."])
    assert "Second document about tax law." in prompt.messages[-1]["content"]
    assert prompt.answer_prefix == '{"task": "'


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, query", [
    ('{"query": "vitamin D raises bone density"}', "vitamin D raises bone density"),
    ('{"query": "  padded  "}', "padded"),
    ('{"query": "a \\"quoted\\" word"}', 'a "quoted" word'),
    ('Sure! {"query": "with preamble"} and more text', "with preamble"),
    ('{"query": "first"}\n{"query": "second"}', "first"),
    ('{"query": "unicode caf\\u00e9"}', "unicode café"),
])
def test_parse_good_answers(text, query):
    parsed = parse_answer(text)
    assert parsed.query == query and parsed.error is None


@pytest.mark.parametrize("text, query", [
    ('{"query": "stopped at a comma",', "stopped at a comma"),  # the stop string cut the object
    ('{"query": "closed string", "title": "unclosed', "closed string"),
    ('{"query": "nested \\"x\\" ok", "extra": [1, 2', 'nested "x" ok'),
])
def test_parse_partial_json_salvages_a_closed_query_string(text, query):
    parsed = parse_answer(text)
    assert parsed.query == query and parsed.error is None


@pytest.mark.parametrize("text, error", [
    ("", "no_json"),
    ("just a sentence", "no_json"),
    ('{"query": "ran out of tok', "truncated"),
    ('{"title": "no query here"}', "missing_query"),
    ('{"query": 42}', "missing_query"),
    ('{"query" 12 }', "malformed_json"),
    ("{not json at all", "malformed_json"),
])
def test_parse_malformed_answers_name_the_problem(text, error):
    parsed = parse_answer(text)
    assert parsed.query is None and parsed.error == error


def test_parse_other_field():
    assert parse_answer('{"task": "Given a claim, find evidence."}', field="task").query == "Given a claim, find evidence."
    assert parse_answer('{"query": "a query"}', field="task").error == "missing_query"
