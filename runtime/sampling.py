"""Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p
and a repetition penalty, reproducibly when given a seed.

The log-probability reported for a token is that of the model's own distribution
(log-softmax of the raw logits), whatever the sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .validation import MAX_SEED, InvalidParameter, at_least, finite, in_range


# Below this temperature sampling is greedy: dividing logits by it would overflow to infinities.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; checked once here, for the CLI, the API and the server.
    `top_k` 0 or -1 (vLLM's spelling) means off."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        at_least("max_tokens", self.max_tokens, 1)
        temperature = at_least("temperature", finite("temperature", self.temperature), 0)
        object.__setattr__(self, "temperature", 0.0 if temperature < GREEDY_BELOW_TEMPERATURE else temperature)
        if not 0 < finite("top_p", self.top_p) <= 1:
            raise InvalidParameter("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "top_k", max(int(at_least("top_k", self.top_k, -1)), 0))
        if not finite("repetition_penalty", self.repetition_penalty) > 0:
            raise InvalidParameter("repetition_penalty",
                                   f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.seed is not None:
            in_range("seed", self.seed, 0, MAX_SEED)
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def log_probability(logits: np.ndarray, token: int) -> float:
    """log-softmax(logits)[token], without the whole log-softmax: one max, one exp and one sum over the
    vocabulary in the logits' own float32 (a float64 copy cost 0.3 ms a step for SmolLM2's 49,152 logits;
    float32's error here is about 1e-6)."""
    peak = logits.max()
    return float(logits[token] - peak) - float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))


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
        with np.errstate(over="ignore"):  # a tiny penalty may overflow; `sample` clips infinities
            logits[seen] = np.where(values > 0, values / penalty, values * penalty)
        return logits

    def probabilities(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The distribution a token is sampled from (not greedy): penalty, temperature, top-k, top-p."""
        scores = self._penalized(logits, history)
        # Extreme but valid settings (a penalty of 1e-300, say) overflow to infinity: keep the order, drop the inf.
        scores = np.nan_to_num(scores.astype(np.float64) / self.params.temperature, nan=-np.inf,
                               posinf=np.finfo(np.float64).max, neginf=-np.inf)
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
        return probs

    def sample(self, logits: np.ndarray, history: Sequence[int]) -> tuple[int, float]:
        """(token, its log-probability under the model) for one row of logits."""
        if self.params.greedy:
            token = int(np.argmax(self._penalized(logits, history)))
        else:
            probs = self.probabilities(logits, history)
            token = int(self.rng.choice(probs.size, p=probs))
        return token, log_probability(logits, token)

    def check_draft(self, logits: np.ndarray, history: Sequence[int], draft: int) -> tuple[int, float]:
        """(token, its log-probability) for one row of logits whose position a drafter guessed `draft` for.
        Greedy picks as `sample` does. Sampling accepts the draft with its probability, else samples from the
        distribution without it: for a draft proposed with certainty (prompt lookup) this is the rejection
        rule of speculative sampling, so the tokens keep the model's distribution."""
        if self.params.greedy:
            return self.sample(logits, history)
        probs = self.probabilities(logits, history)
        if self.rng.random() < probs[draft]:
            token = draft
        else:
            probs[draft] = 0.0
            token = int(self.rng.choice(probs.size, p=probs / probs.sum()))
        return token, log_probability(logits, token)
