"""OpenAI's completions and chat completions, as llmc serves them: request bodies in, checked
requests out; response objects and stream chunks back.

Lengths follow vLLM: a request whose prompt plus `max_tokens` is longer than the context is
refused (400, `context_length_exceeded`), never silently clamped; without `max_tokens`, a
completion gets 16 tokens (OpenAI's default) and a chat reply the rest of the context.
`n` choices share one computed prompt; with a `seed`, choice i is what a request with seed
`seed + i` gets alone (as in vLLM). A completion's `best_of` generates that many and returns the
`n` with the highest log-probability per token (OpenAI's rule). `logprobs` gives the chosen
tokens' log-probabilities only.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from llmc.errors import LlmcError

from .async_engine import AsyncEngine
from .model import ContextOverflow
from .request import Request
from .sampling import SamplingParams
from .scheduler import Delta
from .tokenizer import Tokenizer
from .validation import MAX_SEED, InvalidParameter, at_least, in_range

COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_CHOICES = 64  # `n` and `best_of`: more would only queue behind the batch
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_NUMBER = (int, float)
# Fields llmc does not implement: accepted only at the value that means "off".
_UNSUPPORTED = {"echo": (False,), "suffix": (None, ""), "logit_bias": (None, {}),
                "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []),
                "functions": (None, []), "response_format": (None, {"type": "text"})}


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


def _sampling(body: dict, max_tokens: int) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0),
                              top_p=_number(body, "top_p", 1.0), top_k=_get(body, "top_k", (int,), 0),
                              repetition_penalty=_number(body, "repetition_penalty", 1.0),
                              seed=_get(body, "seed", (int,)), stop=_stops(body),
                              ignore_eos=_get(body, "ignore_eos", (bool,), False))
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


def _call(body: dict, engine: AsyncEngine, prompt_ids: list[int], prompt_field: str, max_tokens: int,
          chat: bool, logprobs: bool) -> Call:
    stream = _get(body, "stream", (bool,), False)
    n, generated = _choices(body, stream)
    params = _sampling(body, max_tokens)
    try:
        requests = [engine.request(prompt_ids, params if params.seed is None else
                                   replace(params, seed=(params.seed + i) % (MAX_SEED + 1)))
                    for i in range(generated)]
    except ContextOverflow as error:
        raise ApiError(str(error), prompt_field, code="context_length_exceeded") from None
    options = _get(body, "stream_options", (dict,), {})
    return Call(chat, requests, n, stream, bool(stream and options.get("include_usage")), logprobs)


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
    if logprobs:
        raise ApiError("only logprobs=0 (the chosen tokens' log-probabilities) is supported", "logprobs")
    max_tokens = _max_tokens(body, ("max_tokens",), COMPLETION_DEFAULT_MAX_TOKENS)
    return _call(body, engine, prompt_ids, "prompt", max_tokens, False, logprobs is not None)


def _message_text(message: Any, index: int) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ApiError(f"message {index} must be an object with a 'role' and a 'content'", "messages")
    if message["role"] not in CHAT_ROLES:
        raise ApiError(f"message {index} has role {message['role']!r}; roles are {', '.join(CHAT_ROLES)}",
                       "messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(f"message {index}: only text content parts are supported", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(f"message {index} needs a text 'content'", "messages")
    return {"role": message["role"], "content": content}


def parse_chat(body: dict, engine: AsyncEngine) -> Call:
    _check_unsupported(body)
    messages = _required(body, "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", "messages")
    prompt_ids = engine.engine.chat_prompt([_message_text(m, i) for i, m in enumerate(messages)])
    if body.get("best_of") not in (None, 1):
        raise ApiError("'best_of' is for completions; chat completions take 'n'", "best_of")
    if _get(body, "top_logprobs", (int,), 0):
        raise ApiError("top_logprobs is not supported; 'logprobs': true gives the chosen tokens' ones",
                       "top_logprobs")
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"),
                             max(1, engine.context_length - len(prompt_ids)))
    return _call(body, engine, prompt_ids, "messages", max_tokens, True, _get(body, "logprobs", (bool,), False))


@dataclass
class Choice:
    """One choice's text, tokens and log-probabilities so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
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

    def _logprobs(self, token_ids: list[int], logprobs: list[float]) -> dict | None:
        if not self.call.logprobs:
            return None
        tokens = [self.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
        if self.call.chat:
            return {"content": [{"token": t, "logprob": p, "bytes": list(t.encode()), "top_logprobs": []}
                                for t, p in zip(tokens, logprobs)]}
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None}

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
            text, logprobs = "".join(choice.text), self._logprobs(choice.token_ids, choice.logprobs)
            if self.call.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": choice.finish_reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})
        kind = "chat.completion" if self.call.chat else "text_completion"
        return {**self._object(kind, choices), "usage": self.usage()}

    def chunks(self, index: int, delta: Delta) -> list[dict]:
        """The stream chunks for one delta of choice `index` (none when it holds no text yet and is not the end)."""
        choice = self.choices[index]
        first = not choice.token_ids and not choice.text
        choice.add(delta)
        logprobs = self._logprobs(delta.token_ids, delta.logprobs)
        if not self.call.chat:
            if not (delta.text or delta.finish_reason or (logprobs and delta.token_ids)):
                return []
            part = {"index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}
            return [self._object("text_completion", [part])]
        chunks = []
        if first:
            chunks.append(self._chat_chunk(index, {"role": "assistant", "content": ""}, None, None))
        if delta.text or (logprobs and delta.token_ids):
            chunks.append(self._chat_chunk(index, {"content": delta.text}, logprobs, None))
        if delta.finish_reason:
            chunks.append(self._chat_chunk(index, {}, None, delta.finish_reason))
        return chunks

    def _chat_chunk(self, index: int, content: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
        part = {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._object("chat.completion.chunk", [part])

    def usage_chunk(self) -> dict:
        return {**self._object("chat.completion.chunk" if self.call.chat else "text_completion", []),
                "usage": self.usage()}
