"""One generation request's state, shared by the single-request engine and the batch scheduler.

A `Request` takes the logits computed for it, picks the next token (among those its grammar
allows, when it has one), turns tokens into text as they complete (holding back text that could
still become a stop string), and decides when it is finished: end-of-sequence token, stop string,
the end of its grammar, max tokens, or the end of the context window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .grammar import Constraint, GrammarError
from .sampling import Sampler, SamplingParams, top_logprobs
from .tokenizer import TextStream, Tokenizer


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    top_logprobs: list[list[tuple[int, float]]] | None = None

    def to_json(self) -> dict:
        extra = {"top_logprobs": self.top_logprobs} if self.top_logprobs is not None else {}
        return {"prompt_ids": self.prompt_ids, "output_ids": self.output_ids, "text": self.text,
                "logprobs": self.logprobs, "finish_reason": self.finish_reason, **extra}


class StopStrings:
    """Finds stop strings in streamed text; emits only text that cannot be part of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0

    def push(self, delta: str) -> tuple[str, bool]:
        self.text += delta
        start = max(0, self.emitted - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out, self.emitted = self.text[self.emitted:end], end
            self.text = self.text[:end]
            return out, True
        safe = max(self.emitted, len(self.text) - self.hold)
        out, self.emitted = self.text[self.emitted:safe], safe
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


class Request:
    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, tokenizer: Tokenizer | None,
                 eos_ids: Sequence[int], context_length: int, constraint: Constraint | None = None):
        """`constraint`: the request's place in `params.grammar` (runtime/grammar.py), when it has one."""
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.constraint = constraint
        self.sampler = Sampler(params, len(self.prompt_ids))
        self.eos_ids = set() if params.ignore_eos else set(eos_ids)
        self.context_length = context_length
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []  # per output token, when params.top_logprobs
        self.finish_reason: str | None = None
        self._stream = TextStream(tokenizer) if tokenizer is not None else None
        self._stops = StopStrings(params.stop)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def next_input(self) -> int:
        return self.output_ids[-1]

    def _allowed(self) -> np.ndarray | None:
        if self.constraint is None:
            return None
        allowed = self.constraint.allowed()
        if not allowed.any():
            raise GrammarError(f"the grammar allows no token after {len(self.output_ids)} output tokens: "
                               f"{self.constraint.matcher.get_error() or 'it cannot go on'}")
        return allowed

    def accept(self, logits: np.ndarray) -> str:
        """Pick the next token from `logits`; return the text it makes final ('' if none)."""
        token, logprob = self.sampler.sample(logits, self.prompt_ids + self.output_ids, self._allowed())
        return self._take(token, logprob, logits)

    def accept_drafted(self, logits: np.ndarray, draft: Sequence[int]) -> tuple[str, int]:
        """Pick tokens from the logits of a step that ran the next input and then `draft` (one row per input),
        keeping drafts while they are what the request picks: the text made final, and how many drafts
        became output (their KV stays valid; the rest is rolled back)."""
        text, kept = "", 0
        for row, guess in enumerate(draft):
            token, logprob = self.sampler.check_draft(logits[row], self.prompt_ids + self.output_ids, guess,
                                                      self._allowed())
            text += self._take(token, logprob, logits[row])
            if token != guess or self.done:
                return text, kept
            kept += 1
        return text + self.accept(logits[len(draft)]), kept

    def _take(self, token: int, logprob: float, logits: np.ndarray) -> str:
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._finish_text()
        if self.constraint is not None:
            self.constraint.accept(token)
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        if self.params.top_logprobs:
            self.top_logprobs.append(top_logprobs(logits, self.params.top_logprobs))
        text = ""
        if self._stream is not None:
            text, stopped = self._stops.push(self._stream.push(token))
            if stopped:
                self.finish_reason = "stop"
                return text
        if self.constraint is not None and self.constraint.complete:
            self.finish_reason = "stop"
            return text + self._finish_text()
        if len(self.output_ids) >= self.params.max_tokens or \
                len(self.prompt_ids) + len(self.output_ids) >= self.context_length:
            self.finish_reason = "length"
            return text + self._finish_text()
        return text

    def _finish_text(self) -> str:
        if self._stream is None:
            return ""
        text, stopped = self._stops.push(self._stream.flush())
        return text if stopped else text + self._stops.flush()

    def result(self) -> Generation:
        return Generation(self.prompt_ids, self.output_ids, self._stops.text, self.logprobs,
                          self.finish_reason or "length", self.top_logprobs if self.params.top_logprobs else None)
