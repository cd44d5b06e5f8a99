"""Prompts for synthetic queries and the parsing of the generator's answers.

E5-style (Wang et al. 2024): a task description, one document, the kind of query wanted, and a
JSON answer `{"query": "..."}`. Three query types cover what retrieval benchmarks ask:
keyword queries, natural questions, and claims (short declarative statements, the queries of
fact-checking sets such as SciFact). A recipe picks the types and may replace the template;
the default template and its one worked example are domain-neutral on purpose, so the same
recipe runs on any corpus.

Small generators (SmolLM2-135M) follow a format far better when they are shown one answer
first and when the answer is started for them: local backends append `ANSWER_PREFIX` after
the chat template so the model only has to write the query text and close the string. A pretrained generator without
a chat template sees the same worked example as plain text (`render_transcript`).
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from typing import Optional

from embed.errors import ConfigError

# The answer is started for the model (local backends only): it then writes the query and `"}`.
ANSWER_PREFIX = '{"query": "'
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"query": {"type": "string"}},
    "required": ["query"],
    "additionalProperties": False,
}

SYSTEM_PROMPT = "You write search queries for a search engine's test collection. {task} You answer with JSON only."

DEFAULT_TASK = "Given a search query, retrieve documents from the collection that answer it."

# The task goes in the system message, said once; the template is the user message, repeated for
# the worked example, so every word of it costs prompt tokens twice.
DEFAULT_TEMPLATE = (
    "Document: {document}\n\n"
    "Write {query_type} that this document answers, in your own words, at most {max_words} words, "
    "never mentioning the document.\n"
    'Answer as JSON: {{"query": "..."}}'
)
TEMPLATE_FIELDS = {"task", "document", "query_type", "max_words"}


@dataclass(frozen=True)
class QueryType:
    """What to ask the generator for, and the answer it gets shown for the worked example."""

    description: str
    example_answer: str


QUERY_TYPES = {
    "claim": QueryType("a claim: one short sentence that states a finding of the document as a fact",
                       "Brisk walking helps older adults fall asleep faster."),
    "question": QueryType("a question that a curious reader would type and that the document answers",
                          "does walking help older people sleep better"),
    "keywords": QueryType("a keyword query of three to six words",
                          "aerobic exercise sleep quality elderly"),
}

# A made-up, domain-neutral document for the worked example (never taken from an evaluation set).
EXAMPLE_DOCUMENT = (
    "Walking and sleep in later life. In a trial of 120 adults aged 65 to 80, twelve weeks of brisk "
    "walking three times a week shortened the time needed to fall asleep by 15 minutes and reduced "
    "night-time waking, compared with a stretching group."
)


def example_texts() -> list[str]:
    """Everything the worked example shows, its document first, then its answers: the query filters
    reject answers that copy it (`copied`) or write about its topic (`example_echo`)."""
    return [EXAMPLE_DOCUMENT, *(t.example_answer for t in QUERY_TYPES.values())]


@dataclass(frozen=True)
class Prompt:
    """One generation request: chat messages plus the text that starts the assistant's answer."""

    messages: list
    answer_prefix: str = ANSWER_PREFIX


@dataclass(frozen=True)
class ParsedAnswer:
    query: Optional[str]  # None when the answer could not be used
    error: Optional[str]  # None, or: no_json, missing_query, truncated, malformed_json


class PromptBuilder:
    """Builds the messages for (document, query type); everything it needs comes from the recipe."""

    def __init__(self, task: str = DEFAULT_TASK, template: str = "", few_shot: bool = True,
                 max_words: int = 24, max_doc_words: int = 160):
        self.template = template or DEFAULT_TEMPLATE
        check_template(self.template)
        self.task = task or DEFAULT_TASK
        self.few_shot = few_shot
        self.max_words = max_words
        self.max_doc_words = max_doc_words

    def user_message(self, document: str, query_type: str, max_words: int) -> str:
        return self.template.format(task=self.task, document=truncate_words(document, self.max_doc_words),
                                    query_type=QUERY_TYPES[query_type].description, max_words=max_words)

    def build(self, document: str, query_type: str, max_words: Optional[int] = None) -> Prompt:
        """Messages for one document; `max_words` varies the stated length per request (E5 varies
        query length), while the worked example keeps the builder's, so its prefix is shared."""
        if query_type not in QUERY_TYPES:
            raise ConfigError(f"unknown query type '{query_type}' (known: {', '.join(QUERY_TYPES)})")
        messages = [{"role": "system", "content": SYSTEM_PROMPT.format(task=self.task)}]
        if self.few_shot:
            example = json.dumps({"query": QUERY_TYPES[query_type].example_answer})
            messages += [{"role": "user", "content": self.user_message(EXAMPLE_DOCUMENT, query_type, self.max_words)},
                         {"role": "assistant", "content": example}]
        messages.append({"role": "user", "content": self.user_message(document, query_type, max_words or self.max_words)})
        return Prompt(messages)


def check_template(template: str) -> None:
    """Reject a recipe template with unknown or missing placeholders before any model is loaded."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ConfigError(f"key 'gen.prompt_template': {e} (write literal braces as {{{{ and }}}})") from None
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        raise ConfigError(f"key 'gen.prompt_template': unknown placeholder {{{sorted(unknown)[0]}}} "
                          f"(known: {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS))})")
    if "document" not in fields:
        raise ConfigError("key 'gen.prompt_template' must contain the {document} placeholder")


def truncate_words(text: str, max_words: int) -> str:
    """First `max_words` words: bounds prompt length (prefill dominates generation cost on CPU)."""
    words = text.split()
    return " ".join(words[:max_words]) if max_words > 0 and len(words) > max_words else " ".join(words)


def render_chat(tokenizer, prompt: Prompt, with_prefix: bool = True) -> str:
    """The prompt as one string in the generator's chat format, answer started when asked. A generator
    without a chat template (a pretrained, not instruction-tuned model) gets `render_transcript`."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    else:  # chat templates write the BOS token themselves; the backends tokenise without special tokens
        text = (getattr(tokenizer, "bos_token", None) or "") + render_transcript(prompt.messages)
    return text + (prompt.answer_prefix if with_prefix else "")


def render_transcript(messages: list) -> str:
    """The messages as plain text, blocks separated by a blank line and each answer on the line
    below its request: a few-shot completion prompt for a pretrained model (InPars, Bonifacio et al.
    2022, prompts GPT-3 this way). The worked example is what such a model follows, so the transcript
    ends where the example's answer began; the answer prefix then starts the same JSON."""
    parts: list[str] = []
    for message in messages:
        if message["role"] == "system":
            continue
        if message["role"] == "assistant" and parts:
            parts[-1] += "\n" + message["content"]
        else:
            parts.append(message["content"])
    return "\n\n".join(parts) + "\n"


def task_prompt(documents: list[str], max_doc_words: int = 60) -> Prompt:
    """Ask the generator, once, what users would search this collection for (E5's brainstorm step)."""
    shown = "\n".join(f"- {truncate_words(d, max_doc_words)}" for d in documents)
    ask = ("Documents from a collection:\n{docs}\n\nIn one sentence, state the search task this collection "
           "serves, starting with 'Given a'. Answer as JSON: {{\"task\": \"...\"}}")
    example_docs = "\n".join(f"- {d}" for d in TASK_EXAMPLE_DOCUMENTS)
    return Prompt([{"role": "system", "content": "You describe document collections. You answer with JSON only."},
                   {"role": "user", "content": ask.format(docs=example_docs)},
                   {"role": "assistant", "content": json.dumps({"task": TASK_EXAMPLE_ANSWER})},
                   {"role": "user", "content": ask.format(docs=shown)}],
                  answer_prefix='{"task": "')


TASK_EXAMPLE_DOCUMENTS = (
    "Lemon drizzle cake. Beat butter and sugar, fold in flour and lemon zest, bake 45 minutes at 180 C.",
    "Quick tomato soup. Soften onions in olive oil, add canned tomatoes and stock, simmer and blend.",
)
TASK_EXAMPLE_ANSWER = "Given a cooking question, retrieve recipes that answer it."


def _field_pattern(field: str) -> re.Pattern:
    return re.compile(r'"' + re.escape(field) + r'"\s*:\s*"((?:[^"\\]|\\.)*)(")?', re.S)


def parse_answer(text: str, field: str = "query") -> ParsedAnswer:
    """The query from a generator's answer, tolerating what small models do around the JSON.

    A complete object is read with a JSON decoder (text after it is ignored: models often go
    on writing). Failing that, a closed `"<field>": "..."` string is salvaged from partial JSON;
    an unclosed one means the answer ran out of tokens (`truncated`).
    """
    start = text.find("{")
    if start < 0:
        return ParsedAnswer(None, "no_json")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        query = obj.get(field)
        if not isinstance(query, str):
            return ParsedAnswer(None, "missing_query")
        return ParsedAnswer(query.strip(), None)
    match = _field_pattern(field).search(text, start)
    if match is None:
        return ParsedAnswer(None, "malformed_json")
    if match.group(2) is None:
        return ParsedAnswer(None, "truncated")
    try:
        return ParsedAnswer(json.loads('"' + match.group(1) + '"').strip(), None)
    except json.JSONDecodeError:
        return ParsedAnswer(None, "malformed_json")
