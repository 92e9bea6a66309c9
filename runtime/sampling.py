"""Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p
and a repetition penalty, reproducibly when given a seed.

The log-probability reported for a token is that of the model's own distribution
(log-softmax of the raw logits), whatever the sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from llmc.errors import LlmcError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise LlmcError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise LlmcError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LlmcError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LlmcError(f"top_k must be 0 (off) or more, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise LlmcError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    wide = logits.astype(np.float64)
    shifted = wide - wide.max()
    return shifted - np.log(np.exp(shifted).sum())


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def _penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or not history:
            return logits
        logits = logits.astype(np.float64, copy=True)
        seen = np.unique(np.asarray(history, dtype=np.int64))
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / penalty, values * penalty)
        return logits

    def sample(self, logits: np.ndarray, history: Sequence[int]) -> tuple[int, float]:
        """(token, its log-probability under the model) for one row of logits."""
        logprobs = log_softmax(logits)
        scores = self._penalized(logits, history)
        if self.params.greedy:
            token = int(np.argmax(scores))
            return token, float(logprobs[token])
        scores = scores.astype(np.float64) / self.params.temperature
        if self.params.top_k and self.params.top_k < scores.size:
            cutoff = np.partition(scores, -self.params.top_k)[-self.params.top_k]
            scores = np.where(scores >= cutoff, scores, -np.inf)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if self.params.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, self.params.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        token = int(self.rng.choice(probs.size, p=probs))
        return token, float(logprobs[token])
