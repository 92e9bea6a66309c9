"""One generation request's state, shared by the single-request engine and the batch scheduler.

A `Request` takes the logits computed for it, picks the next token, turns tokens into
text as they complete (holding back text that could still become a stop string), and
decides when it is finished: end-of-sequence token, stop string, max tokens, or the
end of the context window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .sampling import Sampler, SamplingParams
from .tokenizer import TextStream, Tokenizer


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "output_ids": self.output_ids, "text": self.text,
                "logprobs": self.logprobs, "finish_reason": self.finish_reason}


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
                 eos_ids: Sequence[int], context_length: int):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sampler = Sampler(params)
        self.eos_ids = set() if params.ignore_eos else set(eos_ids)
        self.context_length = context_length
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self._stream = TextStream(tokenizer) if tokenizer is not None else None
        self._stops = StopStrings(params.stop)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def next_input(self) -> int:
        return self.output_ids[-1]

    def accept(self, logits: np.ndarray) -> str:
        """Pick the next token from `logits`; return the text it makes final ('' if none)."""
        return self._take(*self.sampler.sample(logits, self.prompt_ids + self.output_ids))

    def accept_drafted(self, logits: np.ndarray, draft: Sequence[int]) -> tuple[str, int]:
        """Pick tokens from the logits of a step that ran the next input and then `draft` (one row per input),
        keeping drafts while they are what the request picks: the text made final, and how many drafts
        became output (their KV stays valid; the rest is rolled back)."""
        text, kept = "", 0
        for row, guess in enumerate(draft):
            token, logprob = self.sampler.check_draft(logits[row], self.prompt_ids + self.output_ids, guess)
            text += self._take(token, logprob)
            if token != guess or self.done:
                return text, kept
            kept += 1
        return text + self.accept(logits[len(draft)]), kept

    def _take(self, token: int, logprob: float) -> str:
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._finish_text()
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        text = ""
        if self._stream is not None:
            text, stopped = self._stops.push(self._stream.push(token))
            if stopped:
                self.finish_reason = "stop"
                return text
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
                          self.finish_reason or "length")
