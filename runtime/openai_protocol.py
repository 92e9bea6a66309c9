"""OpenAI's completions and chat completions, as llmc serves them: request bodies in, checked
requests out; response objects and stream chunks back.

Lengths follow vLLM: a request whose prompt plus `max_tokens` is longer than the context is
refused (400, `context_length_exceeded`), never silently clamped; without `max_tokens`, a
completion gets 16 tokens (OpenAI's default) and a chat reply the rest of the context.
`n` choices share one computed prompt; with a `seed`, choice i is what a request with seed
`seed + i` gets alone (as in vLLM). A completion's `best_of` generates that many and returns the
`n` with the highest log-probability per token (OpenAI's rule).

Output can be held to a grammar: `response_format` (`json_object`, or `json_schema` with its
schema) in both endpoints, and llmc's `grammar` field (GBNF or Lark text, as llama.cpp's server
takes it); `tools` and `tool_choice` in chat (runtime/tool_calls.py). `logprobs` come from the
model's own logits (with `top_logprobs`, up to 20, in chat; `logprobs` up to 5 in completions, as
OpenAI's legacy API allows); vLLM's `return_tokens_as_token_ids` names their tokens "token_id:N". Refused, each with a 400 naming it: `suffix`, `functions` and
`function_call` (the API's older form of tools), `echo` with `logprobs` (prompt log-probabilities).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from llmc.errors import LlmcError

from .async_engine import AsyncEngine
from .grammar import GrammarError, GrammarSpec
from .model import ContextOverflow
from .request import Request
from .sampling import MAX_TOP_LOGPROBS, SamplingParams
from .scheduler import Delta
from .tokenizer import Tokenizer
from .tool_calls import (CALL_OPEN, CallStream, ToolError, ToolUse, call_text, parse_tools, special_markers,
                         split_calls, tools_system_text)
from .validation import MAX_SEED, InvalidParameter, at_least, in_range

COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_CHOICES = 64  # `n` and `best_of`: more would only queue behind the batch
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for `logprobs` in completions
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_NUMBER = (int, float)
# Fields llmc does not implement: accepted only at the value that means "off".
_UNSUPPORTED = {"suffix": (None, ""), "functions": (None, []), "function_call": (None, "none")}


class ApiError(LlmcError):
    """A request the API refuses, with the HTTP status and the OpenAI error fields."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Call:
    """One parsed API call: the engine requests (one per choice generated, all for one prompt) and how to
    answer it: with the best `n` of them."""

    chat: bool
    requests: list[Request]
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    tools: ToolUse | None = None
    echo: str = ""  # completions: the prompt's text, sent before the output
    token_ids_as_tokens: bool = False  # vLLM's `return_tokens_as_token_ids`: logprobs name "token_id:N"


def _get(body: dict, name: str, types: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise ApiError(f"'{name}' must be {names}, got {type(value).__name__}", name)
    return value


def _required(body: dict, name: str) -> Any:
    if body.get(name) is None:
        raise ApiError(f"'{name}' is a required field", name)
    return body[name]


def _check_unsupported(body: dict) -> None:
    for name, allowed in _UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise ApiError(f"'{name}' is not supported by this server", name)


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} (ids as strings in JSON) as (id, bias) pairs."""
    bias = _get(body, "logit_bias", (dict,), {})
    pairs = []
    for key, value in bias.items():
        if not (key.isascii() and key.isdecimal() and len(key) <= 12) or isinstance(value, bool) or \
                not isinstance(value, _NUMBER):
            raise ApiError(f"'logit_bias' maps token ids to numbers; got {key!r}: {value!r}", "logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def _grammar(body: dict) -> GrammarSpec | None:
    """The grammar that `response_format` or `grammar` asks for (not both)."""
    response_format = _get(body, "response_format", (dict,))
    grammar = _get(body, "grammar", (str,))
    kind = (response_format or {}).get("type", "text")
    if grammar is not None:
        if kind != "text":
            raise ApiError("give 'grammar' or a 'response_format', not both", "grammar")
        return GrammarSpec("grammar", grammar)
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise ApiError("'response_format' json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                           "response_format")
        try:
            return GrammarSpec.json_schema(spec.get("schema", {}))
        except GrammarError as error:
            raise ApiError(str(error), "response_format") from None
    raise ApiError(f"'response_format' type {kind!r} is not one of text, json_object, json_schema",
                   "response_format")


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise ApiError("'stop' must be a string or a list of strings", "stop")


def _number(body: dict, name: str, default: float) -> float:
    value = _get(body, name, _NUMBER, default)
    try:
        return float(value)
    except OverflowError:
        raise ApiError(f"'{name}' is too large: {value}", name) from None


def _sampling(body: dict, max_tokens: int, top_logprobs: int, grammar: GrammarSpec | None) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0),
                              top_p=_number(body, "top_p", 1.0), top_k=_get(body, "top_k", (int,), 0),
                              repetition_penalty=_number(body, "repetition_penalty", 1.0),
                              seed=_get(body, "seed", (int,)), stop=_stops(body),
                              ignore_eos=_get(body, "ignore_eos", (bool,), False),
                              presence_penalty=_number(body, "presence_penalty", 0.0),
                              frequency_penalty=_number(body, "frequency_penalty", 0.0),
                              logit_bias=_logit_bias(body), top_logprobs=top_logprobs, grammar=grammar)
    except InvalidParameter as error:
        raise ApiError(str(error), error.name) from None


def _count(body: dict, name: str, low: int) -> int | None:
    value = _get(body, name, (int,))
    if value is None:
        return None
    try:
        return int(in_range(name, value, low, MAX_CHOICES))
    except InvalidParameter as error:
        raise ApiError(str(error), name) from None


def _choices(body: dict, stream: bool) -> tuple[int, int]:
    """(`n`, how many choices to generate: `best_of`, by default `n`)."""
    n = _count(body, "n", 1) or 1
    best_of = _count(body, "best_of", n) or n
    if best_of > n and stream:
        raise ApiError("'best_of' cannot be used with 'stream': the best choices are known only at the end",
                       "best_of")
    return n, best_of


def _stream_options(body: dict, stream: bool) -> bool:
    """Whether the stream ends with a usage chunk."""
    options = _get(body, "stream_options", (dict,))
    if options is None:
        return False
    if not stream:
        raise ApiError("'stream_options' is only allowed with \"stream\": true", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise ApiError("'stream_options' takes {\"include_usage\": true or false}", "stream_options")
    return include_usage


def _call(body: dict, engine: AsyncEngine, prompt_ids: list[int], prompt_field: str, max_tokens: int,
          chat: bool, logprobs: bool, top_logprobs: int, grammar: GrammarSpec | None,
          tools: ToolUse | None = None, echo: str = "") -> Call:
    stream = _get(body, "stream", (bool,), False)
    n, generated = _choices(body, stream)
    include_usage = _stream_options(body, stream)
    params = _sampling(body, max_tokens, top_logprobs, grammar)
    try:
        requests = [engine.request(prompt_ids, params if params.seed is None else
                                   replace(params, seed=(params.seed + i) % (MAX_SEED + 1)))
                    for i in range(generated)]
    except ContextOverflow as error:
        raise ApiError(str(error), prompt_field, code="context_length_exceeded") from None
    except InvalidParameter as error:
        raise ApiError(str(error), error.name) from None
    except GrammarError as error:
        field_name = "tools" if tools is not None else "grammar" if "grammar" in body else "response_format"
        raise ApiError(str(error), field_name) from None
    as_ids = _get(body, "return_tokens_as_token_ids", (bool,), False)
    return Call(chat, requests, n, stream, include_usage, logprobs, tools, echo, as_ids)


def _max_tokens(body: dict, names: tuple[str, ...], default: int) -> int:
    """The first of `names` given, else `default`."""
    for name in names:
        value = _get(body, name, (int,))
        if value is not None:
            try:
                return int(at_least(name, value, 1))
            except InvalidParameter as error:
                raise ApiError(str(error), name) from None
    return default


def parse_completion(body: dict, engine: AsyncEngine) -> Call:
    _check_unsupported(body)
    prompt = _required(body, "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt_ids = engine.engine.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt_ids = prompt
    else:
        raise ApiError("'prompt' must be one non-empty string or list of token ids (one prompt per request)",
                       "prompt")
    logprobs = _get(body, "logprobs", (int,))
    if logprobs is not None:
        try:
            in_range("logprobs", logprobs, 0, MAX_COMPLETION_LOGPROBS)
        except InvalidParameter as error:
            raise ApiError(str(error), "logprobs") from None
    echo = _get(body, "echo", (bool,), False)
    if echo and logprobs is not None:
        raise ApiError("'echo' with 'logprobs' would need the prompt's log-probabilities, which this server does "
                       "not compute", "echo")
    max_tokens = _max_tokens(body, ("max_tokens",), COMPLETION_DEFAULT_MAX_TOKENS)
    echo_text = (prompt if isinstance(prompt, str) else engine.engine.tokenizer.decode(prompt_ids)) if echo else ""
    return _call(body, engine, prompt_ids, "prompt", max_tokens, False, logprobs is not None, logprobs or 0,
                 _grammar(body), echo=echo_text)


def _message(message: Any, index: int) -> dict[str, Any]:
    """A checked chat message: role, text content (None for an assistant's message of calls alone), and an
    assistant's `tool_calls` (arguments as objects, as templates take them) or a tool result's `tool_call_id`."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ApiError(f"message {index} must be an object with a 'role' and a 'content'", "messages")
    role = message["role"]
    if role not in CHAT_ROLES:
        raise ApiError(f"message {index} has role {role!r}; roles are {', '.join(CHAT_ROLES)}", "messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(f"message {index}: only text content parts are supported", "messages")
        content = "".join(p["text"] for p in content)
    checked: dict[str, Any] = {"role": role, "content": content}
    calls = message.get("tool_calls")
    if role == "assistant" and calls:
        checked["tool_calls"] = [_history_call(call, index) for call in (calls if isinstance(calls, list) else [0])]
    elif not isinstance(content, str):
        raise ApiError(f"message {index} needs a text 'content'", "messages")
    if role == "tool":
        checked["tool_call_id"] = message.get("tool_call_id")
    return checked


def _history_call(call: Any, index: int) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
            not isinstance(function.get("arguments", "{}"), str):
        raise ApiError(f"message {index}: each tool call needs a function with a name and its arguments as a JSON "
                       "string", "messages")
    try:
        arguments = json.loads(function.get("arguments", "{}"))
    except json.JSONDecodeError:
        raise ApiError(f"message {index}: the arguments of tool call {function['name']!r} are not JSON",
                       "messages") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _plain_messages(messages: list[dict], tools: ToolUse | None) -> list[dict]:
    """The conversation for a template that does not read `tools`: the tools described in a system message,
    calls and results written as text (runtime/tool_calls.py)."""
    plain = []
    for message in messages:
        if message["role"] == "tool":
            plain.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        elif "tool_calls" in message:
            calls = "\n".join(call_text(c["function"]["name"], c["function"]["arguments"])
                               for c in message["tool_calls"])
            plain.append({"role": "assistant", "content": "\n".join(filter(None, [message["content"], calls]))})
        else:
            plain.append({"role": message["role"], "content": message["content"]})
    if tools is not None:
        text = tools_system_text(tools.tools)
        if plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": plain[0]["content"] + "\n\n" + text}
        else:
            plain.insert(0, {"role": "system", "content": text})
    return plain


def _chat_prompt(body: dict, engine: AsyncEngine, tools: ToolUse | None) -> list[int]:
    messages = _required(body, "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", "messages")
    checked = [_message(m, i) for i, m in enumerate(messages)]
    template = engine.engine.chat_template
    if template is not None and template.reads("tools"):
        return engine.engine.chat_prompt(checked, tools=[t.openai() for t in tools.tools] if tools else None)
    return engine.engine.chat_prompt(_plain_messages(checked, tools))


def parse_chat(body: dict, engine: AsyncEngine) -> Call:
    _check_unsupported(body)
    try:
        tools = parse_tools(body.get("tools"), body.get("tool_choice"))
    except ToolError as error:
        raise ApiError(str(error), error.param) from None
    if tools is not None:
        if not isinstance(body.get("parallel_tool_calls", True), bool):
            raise ApiError("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
        tools = replace(tools, parallel=body.get("parallel_tool_calls", True))
    if tools is not None and special_markers(engine.engine.tokenizer.backend):
        raise ApiError(f"this model's tokenizer holds {CALL_OPEN} as a special token, which llmc's tool grammar does "
                       "not write; tools are not supported for it", "tools")
    grammar = _grammar(body)
    if tools is not None and grammar is not None:
        raise ApiError("'tools' cannot be combined with 'response_format' or 'grammar' (set 'tool_choice' to "
                       "\"none\" to use them)", "tools")
    prompt_ids = _chat_prompt(body, engine, tools)
    if body.get("best_of") not in (None, 1):
        raise ApiError("'best_of' is for completions; chat completions take 'n'", "best_of")
    logprobs = _get(body, "logprobs", (bool,), False)
    top_logprobs = _get(body, "top_logprobs", (int,), 0)
    try:
        in_range("top_logprobs", top_logprobs, 0, MAX_TOP_LOGPROBS)
    except InvalidParameter as error:
        raise ApiError(str(error), "top_logprobs") from None
    if top_logprobs and not logprobs:
        raise ApiError("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"),
                             max(1, engine.context_length - len(prompt_ids)))
    return _call(body, engine, prompt_ids, "messages", max_tokens, True, logprobs, top_logprobs,
                 tools.grammar() if tools is not None else grammar, tools)


@dataclass
class Choice:
    """One choice's text, tokens and log-probabilities so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    calls: CallStream = field(default_factory=CallStream)  # where the output may hold tool calls

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.top_logprobs += delta.top_logprobs
        self.finish_reason = delta.finish_reason

    @property
    def mean_logprob(self) -> float:
        """The log-probability per token, what `best_of` ranks by (a choice with no token ranks last)."""
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else -math.inf


@dataclass
class Reply:
    """The answer to one call, built up from its deltas: whole, or as stream chunks."""

    call: Call
    model: str
    tokenizer: Tokenizer
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))
    choices: list[Choice] = field(init=False)

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.call.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.choices = [Choice() for _ in self.call.requests]

    def add(self, index: int, delta: Delta) -> None:
        self.choices[index].add(delta)

    def _token(self, token: int) -> str:
        if self.call.token_ids_as_tokens:
            return f"token_id:{token}"
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _logprobs(self, token_ids: list[int], logprobs: list[float],
                  tops: list[list[tuple[int, float]]]) -> dict | None:
        if not self.call.logprobs:
            return None
        tokens = [self._token(t) for t in token_ids]
        tops = tops or [[] for _ in token_ids]
        if self.call.chat:
            return {"content": [{"token": t, "logprob": p, "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": self._token(i), "logprob": q,
                                                   "bytes": list(self._token(i).encode())} for i, q in top]}
                                for t, p, top in zip(tokens, logprobs, tops)]}
        # As OpenAI's legacy API: each position's top tokens and the chosen one, keyed by their text.
        return {"tokens": tokens, "token_logprobs": logprobs,
                "top_logprobs": [{**{self._token(i): q for i, q in top}, token: p}
                                 for token, p, top in zip(tokens, logprobs, tops)] if any(tops) else None}

    def _object(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def usage(self) -> dict[str, int]:
        """The prompt counted once, every generated token (also those of choices `best_of` left out)."""
        prompt = len(self.call.requests[0].prompt_ids)
        completion = sum(len(choice.token_ids) for choice in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self) -> dict:
        best = sorted(self.choices, key=lambda c: -c.mean_logprob)[:self.call.n] \
            if len(self.choices) > self.call.n else self.choices
        choices = []
        for index, choice in enumerate(best):
            text = "".join(choice.text)
            logprobs = self._logprobs(choice.token_ids, choice.logprobs, choice.top_logprobs)
            if self.call.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                finish_reason = choice.finish_reason
                if self.call.tools is not None:
                    message["content"], calls = split_calls(text)
                    if calls:
                        message["tool_calls"] = calls
                        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
                choices.append({"index": index, "message": message, "logprobs": logprobs,
                                "finish_reason": finish_reason})
            else:
                choices.append({"index": index, "text": self.call.echo + text, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})
        kind = "chat.completion" if self.call.chat else "text_completion"
        return {**self._object(kind, choices), "usage": self.usage()}

    def chunks(self, index: int, delta: Delta) -> list[dict]:
        """The stream chunks for one delta of choice `index` (none when it holds no text yet and is not the end)."""
        choice = self.choices[index]
        first = not choice.token_ids and not choice.text
        choice.add(delta)
        logprobs = self._logprobs(delta.token_ids, delta.logprobs, delta.top_logprobs)
        if not self.call.chat:
            text = (self.call.echo if first else "") + delta.text
            if not (text or delta.finish_reason or (logprobs and delta.token_ids)):
                return []
            part = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}
            return [self._object("text_completion", [part])]
        chunks = []
        if first:
            chunks.append(self._chat_chunk(index, {"role": "assistant", "content": ""}, None, None))
        text, calls = delta.text, []
        if self.call.tools is not None:
            text, calls = choice.calls.push(delta.text)
            if delta.finish_reason:
                text += choice.calls.flush()
        if text or (logprobs and delta.token_ids):
            chunks.append(self._chat_chunk(index, {"content": text}, logprobs, None))
        if calls:
            first_call = choice.calls.calls - len(calls)
            chunks.append(self._chat_chunk(index, {"tool_calls": [{"index": first_call + i, **call}
                                                                  for i, call in enumerate(calls)]}, None, None))
        if delta.finish_reason:
            finish_reason = delta.finish_reason
            if choice.calls.calls and finish_reason == "stop":
                finish_reason = "tool_calls"
            chunks.append(self._chat_chunk(index, {}, None, finish_reason))
        return chunks

    def _chat_chunk(self, index: int, content: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
        part = {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._object("chat.completion.chunk", [part])

    def usage_chunk(self) -> dict:
        return {**self._object("chat.completion.chunk" if self.call.chat else "text_completion", []),
                "usage": self.usage()}
