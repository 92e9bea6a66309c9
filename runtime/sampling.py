"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p,
reproducibly when given a seed; after the penalties (repetition as in transformers, presence and
frequency as in OpenAI's API), the logit bias, and a grammar's mask of the allowed tokens.

The log-probability reported for a token, and its `top_logprobs`, are those of the model's own
distribution (log-softmax of the raw logits), whatever the sampling settings, as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .grammar import GrammarSpec
from .validation import MAX_SEED, InvalidParameter, at_least, finite, in_range


# Below this temperature sampling is greedy: dividing logits by it would overflow to infinities.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency penalties, as OpenAI bounds them
BIAS_RANGE = (-100.0, 100.0)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; checked once here, for the CLI, the API and the server.
    `top_k` 0 or -1 (vLLM's spelling) means off. `logit_bias` holds (token id, bias) pairs; `grammar`,
    when given, holds the output to it (runtime/grammar.py)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0
    grammar: GrammarSpec | None = None

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
        for name in ("presence_penalty", "frequency_penalty"):
            in_range(name, finite(name, getattr(self, name)), *PENALTY_RANGE)
        for token, bias in self.logit_bias:
            at_least("logit_bias", token, 0)
            in_range("logit_bias", finite("logit_bias", bias), *BIAS_RANGE)
        in_range("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _log_normalizer(logits: np.ndarray) -> tuple[float, float]:
    """(max, log of the sum of exp(logits - max)): one max, one exp and one sum over the vocabulary in the
    logits' own float32 (a float64 copy cost 0.3 ms a step for SmolLM2's 49,152 logits; float32's error here
    is about 1e-6)."""
    peak = logits.max()
    return float(peak), float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))


def log_probability(logits: np.ndarray, token: int) -> float:
    """log-softmax(logits)[token], without the whole log-softmax."""
    peak, log_total = _log_normalizer(logits)
    return float(logits[token] - peak) - log_total


def top_logprobs(logits: np.ndarray, count: int) -> list[tuple[int, float]]:
    """The `count` most likely tokens under log-softmax(logits), most likely first, with their log-probabilities."""
    peak, log_total = _log_normalizer(logits)
    best = np.argpartition(-logits, count - 1)[:count]
    best = best[np.argsort(-logits[best], kind="stable")]
    return [(int(t), float(logits[t] - peak) - log_total) for t in best]


class Sampler:
    """Picks one request's tokens; `prompt_length` tokens of the history it is given are prompt, the rest
    output (which the presence and frequency penalties count)."""

    def __init__(self, params: SamplingParams, prompt_length: int = 0):
        self.params = params
        self.prompt_length = prompt_length
        self.rng = np.random.default_rng(params.seed)
        self._bias = None
        if params.logit_bias:
            tokens, biases = zip(*params.logit_bias)
            self._bias = (np.asarray(tokens, dtype=np.int64), np.asarray(biases, dtype=np.float64))

    @property
    def _adjusts(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty) or self._bias is not None

    def _adjusted(self, logits: np.ndarray, history: Sequence[int], allowed: np.ndarray | None) -> np.ndarray:
        """The logits after the penalties and the bias, with the tokens the grammar forbids at -inf."""
        if self._adjusts:
            logits = self._penalized(logits, history)
        if allowed is not None:
            logits = np.where(allowed, logits, -np.inf)
        return logits

    def _penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        params = self.params
        logits = logits.astype(np.float64, copy=True)
        penalty = params.repetition_penalty
        if penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            values = logits[seen]
            with np.errstate(over="ignore"):  # a tiny penalty may overflow; `sample` clips infinities
                logits[seen] = np.where(values > 0, values / penalty, values * penalty)
        output = history[self.prompt_length:]
        if (params.presence_penalty or params.frequency_penalty) and len(output):
            tokens, counts = np.unique(np.asarray(output, dtype=np.int64), return_counts=True)
            logits[tokens] -= params.frequency_penalty * counts + params.presence_penalty
        if self._bias is not None:
            logits[self._bias[0]] += self._bias[1]
        return logits

    def probabilities(self, logits: np.ndarray, history: Sequence[int], allowed: np.ndarray | None = None) -> np.ndarray:
        """The distribution a token is sampled from (not greedy): penalties, bias, mask, temperature, top-k, top-p."""
        scores = self._adjusted(logits, history, allowed)
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

    def sample(self, logits: np.ndarray, history: Sequence[int],
               allowed: np.ndarray | None = None) -> tuple[int, float]:
        """(token, its log-probability under the model) for one row of logits; only tokens in `allowed`
        (a boolean per token) when given."""
        if self.params.greedy:
            token = int(np.argmax(self._adjusted(logits, history, allowed)))
        else:
            probs = self.probabilities(logits, history, allowed)
            token = int(self.rng.choice(probs.size, p=probs))
        return token, log_probability(logits, token)

    def check_draft(self, logits: np.ndarray, history: Sequence[int], draft: int,
                    allowed: np.ndarray | None = None) -> tuple[int, float]:
        """(token, its log-probability) for one row of logits whose position a drafter guessed `draft` for.
        Greedy picks as `sample` does. Sampling accepts the draft with its probability, else samples from the
        distribution without it: for a draft proposed with certainty (prompt lookup) this is the rejection
        rule of speculative sampling, so the tokens keep the model's distribution."""
        if self.params.greedy:
            return self.sample(logits, history, allowed)
        probs = self.probabilities(logits, history, allowed)
        if self.rng.random() < probs[draft]:
            token = draft
        else:
            probs[draft] = 0.0
            token = int(self.rng.choice(probs.size, p=probs / probs.sum()))
        return token, log_probability(logits, token)
