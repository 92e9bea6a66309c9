"""Speculative decoding: guess the next tokens cheaply, check them all in one forward step.

A drafter proposes tokens that may continue a sequence: prompt lookup (`ngram[:K]`,
runtime/ngram_drafter.py) or a smaller model with the same tokenizer (`draft:PKG[:K]`,
runtime/draft_model.py). The target model runs them after the sequence's next token in one
step, and the request keeps the longest run of them that it would have picked itself
(runtime/request.py): greedy output is the plain greedy output, and sampling keeps the model's
distribution (the rejection rule of speculative sampling).

Checking drafts costs more than a plain decode step, so each sequence's `Speculator` drafts
only what pays: it estimates how often the sequence's drafts are kept, and drafts the number
that maximises the expected tokens per unit of step time, under the costs the models measure
as they run (runtime/model.py `StepCost`); when no number beats plain decoding it drafts
nothing, but one token now and then, to notice a sequence that starts repeating itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from llmc.errors import LlmcError

from .draft_model import DraftModelDrafter
from .model import CacheSettings, CompiledModel, StepCost
from .ngram_drafter import NgramDrafter
from .package import Package
from .request import Request
from .sampling import SamplingParams

DEFAULT_DRAFT_TOKENS = 5
MAX_DRAFT_TOKENS = 16
ACCEPTANCE_MEMORY = 0.8  # the weight of earlier drafts' outcomes, each step
PROBE_AFTER_STEPS = 64  # a sequence whose drafts do not pay drafts one token after this many steps
UNMEASURED_DRAFT_COST = 0.2  # a draft model's decode step, as a fraction of the target's, until measured


@dataclass(frozen=True)
class Speculation:
    """How to speculate: `ngram` (prompt lookup) or `draft` (the model in `draft_package`), at most
    `draft_tokens` a step."""

    method: str = "ngram"
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    draft_package: str | None = None

    @classmethod
    def parse(cls, text: str) -> Speculation:
        """`ngram`, `ngram:K`, `draft:PKG` or `draft:PKG:K` (the forms `--speculate` takes)."""
        method, _, rest = text.partition(":")
        head, _, tail = rest.rpartition(":")
        count, rest = (tail, head) if tail.isdigit() else ("", rest)
        if count and not 1 <= int(count) <= MAX_DRAFT_TOKENS:
            raise LlmcError(f"--speculate {text!r}: K must be from 1 to {MAX_DRAFT_TOKENS}")
        draft_tokens = int(count) if count else DEFAULT_DRAFT_TOKENS
        if method == "ngram" and not rest:
            return cls("ngram", draft_tokens)
        if method == "draft" and rest:
            return cls("draft", draft_tokens, rest)
        raise LlmcError(f"--speculate {text!r}: say ngram[:K] (prompt lookup) or draft:PKG[:K] (a smaller "
                        "compiled model with the same tokenizer)")


class Drafter(Protocol):
    def propose(self, tokens: Sequence[int], limit: int) -> list[int]: ...

    def close(self) -> None: ...


def speculates(params: SamplingParams) -> bool:
    """Whether a request may decode speculatively: greedy ones, and sampled ones without a seed (with a seed,
    checking drafts would draw other random numbers than plain decoding, and the same seed must give the same
    text)."""
    return params.greedy or params.seed is None


def expected_tokens(acceptance: float, drafted: int) -> float:
    """Tokens a step yields with `drafted` drafts, each kept (after the ones before it) with probability
    `acceptance`: 1 + a + a^2 + ... + a^drafted."""
    return sum(acceptance ** i for i in range(drafted + 1))


class Speculator:
    """One sequence's drafter and the estimate of how many of its drafts are worth checking."""

    def __init__(self, drafter: Drafter, max_tokens: int, draft_cost: Callable[[], float]):
        self.drafter = drafter
        self.max_tokens = max_tokens
        self.draft_cost = draft_cost  # drafting one token, as a fraction of a target decode step
        self._kept = 0.0  # drafts kept, and drafts refused, lately (older ones count less)
        self._refused = 0.0
        self._idle_steps = PROBE_AFTER_STEPS  # probe at once: the first draft says whether drafting pays

    @property
    def acceptance(self) -> float:
        """The estimated chance that a draft is kept when the ones before it were (prior: one half, worth one
        draft's outcome)."""
        return (self._kept + 0.5) / (self._kept + self._refused + 1)

    def worth_drafting(self, cost_per_token: float) -> int:
        """The draft count with the most expected tokens per unit of step time; 0 if plain decoding wins."""
        gains = [expected_tokens(self.acceptance, k) / (1 + cost_per_token * k) for k in range(self.max_tokens + 1)]
        return max(range(len(gains)), key=gains.__getitem__)

    def draft(self, tokens: Sequence[int], room: int, step_cost: StepCost) -> list[int]:
        """At most `room` drafts worth checking after `tokens`, given what the target's steps cost."""
        count = self.worth_drafting(step_cost.extra_per_token + self.draft_cost())
        if count == 0:
            self._idle_steps += 1
            if self._idle_steps < PROBE_AFTER_STEPS:
                return []
            count = 1
        drafts = self.drafter.propose(tokens, min(count, room))
        if drafts:
            self._idle_steps = 0
        return drafts

    def draft_for(self, request: Request, context: int, limit: int, step_cost: StepCost) -> list[int]:
        """Drafts for the request's next step: at most `limit`, none past its max_tokens (they would be wasted),
        past `context` tokens in its sequence (their KV must fit) or where its grammar would refuse them."""
        tokens = request.prompt_ids + request.output_ids
        room = min(limit, request.params.max_tokens - len(request.output_ids) - 1, context - len(tokens))
        drafts = self.draft(tokens, room, step_cost) if room > 0 else []
        if drafts and request.constraint is not None:  # drafts the grammar refuses would be refused anyway
            drafts = drafts[:request.constraint.valid_prefix(drafts)]
        return drafts

    def check(self, request: Request, logits, draft: list[int]) -> tuple[str, int]:
        """Let the request pick its tokens from the logits of a step that ran its next input and `draft`: the text
        made final and how many drafts it kept (the caller rolls the rest back from the KV cache)."""
        text, kept = request.accept_drafted(logits, draft)
        self.feedback(len(draft), kept)
        return text, kept

    def feedback(self, drafted: int, kept: int) -> None:
        """`kept` of `drafted` drafts became output (the first refused one ends the run)."""
        self._kept = ACCEPTANCE_MEMORY * self._kept + kept
        self._refused = ACCEPTANCE_MEMORY * self._refused + (1 if kept < drafted else 0)

    def close(self) -> None:
        self.drafter.close()


def speculators(speculation: Speculation, target: CompiledModel, device: str) -> Callable[[], Speculator]:
    """What makes each sequence's `Speculator`; for `draft`, the draft model is loaded here, once."""
    if speculation.method == "ngram":
        return lambda: Speculator(NgramDrafter(), speculation.draft_tokens, lambda: 0.0)
    draft = _draft_model(Path(speculation.draft_package), target, device)

    def draft_cost() -> float:
        mine, theirs = draft.step_cost.decode_s, target.step_cost.decode_s
        return mine / theirs if mine and theirs and mine > 0 and theirs > 0 else UNMEASURED_DRAFT_COST
    return lambda: Speculator(DraftModelDrafter(draft, target.vocab_size), speculation.draft_tokens, draft_cost)


def _draft_model(path: Path, target: CompiledModel, device: str) -> CompiledModel:
    package = Package.open(path)
    mine, theirs = package.metadata.get("tokenizer") or {}, target.package.metadata.get("tokenizer") or {}
    if not mine or "file" not in mine or mine.get("file") not in package.metadata["files"]:
        raise LlmcError(f"the draft package {path} has no tokenizer; it needs the target's to draft for it")
    if package.metadata["files"][mine["file"]] != target.package.metadata["files"].get(theirs.get("file")):
        raise LlmcError(f"the draft package {path} has another tokenizer than {target.package.path}: a draft model "
                        "must share the target's tokenizer")
    cache = target.cache
    return CompiledModel(package, device, CacheSettings(max_total_tokens=cache.max_total_tokens,
                                                        max_batch_size=cache.max_batch_size,
                                                        prefill_chunk=cache.prefill_chunk, prefix_cache=False))
