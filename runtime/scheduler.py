"""Continuous batching over the paged KV cache: which tokens of which requests go into each step.

Requests join the running batch at the next step and leave it the step they finish. Each
step has a token budget (the cache's prefill chunk): running decodes come first, one token
each, then prompt chunks fill what is left, oldest request first (chunked prefill, as in
DeepSpeed-FastGen), so a long prompt never stalls the decodes. A request that cannot get KV
pages for even one token preempts the newest running requests, itself last; a preempted
request frees its pages and is later recomputed from its prompt and the tokens it already
generated, so its output does not change. A request starts from the longest prefix of its
tokens that the prefix cache holds (runtime/prefix_cache.py); one that finishes leaves its
sequence there, and cached sequences are evicted, least recently used first, before any
running request is preempted. Several requests for one prompt (`n` > 1) are added together:
the first computes the prompt, and the moment its logits come the others are forked from its
sequence (sharing its pages) and sample their first tokens from the same logits. With
speculation, a decoding request may add drafted tokens to its step (runtime/speculation.py); the
drafts it does not keep are rolled back from the KV cache before the next step, while the other
requests of the batch decode as usual. Nothing here is asynchronous: one caller thread calls `add`,
`cancel` and `step`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from llmc.errors import LlmcError

from .grammar import masks_during
from .model import CompiledModel, check_fits
from .prefix_cache import Match, PrefixStats
from .request import Request
from .speculation import Speculator, speculates


@dataclass(frozen=True)
class Delta:
    """What one step added to a request: text made final, tokens, their log-probabilities."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # when the request asks for them


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot taken after each change, safe to read from other threads."""

    running: int = 0
    waiting: int = 0
    pages_used: int = 0
    pages_total: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    prefix: PrefixStats = PrefixStats()


class StepFailed(LlmcError):
    """The model failed in a step; the requests of that step are dropped from the batch."""

    def __init__(self, requests: list[Request], cause: Exception):
        super().__init__(f"the model failed in a batch step: {cause}")
        self.requests = requests


class RequestFailed(LlmcError):
    """Picking or decoding one request's next token failed; that request alone is dropped."""

    def __init__(self, cause: Exception):
        super().__init__(f"generating this request failed: {type(cause).__name__}: {cause}")


@dataclass(eq=False)
class _Entry:
    request: Request
    arrival: int
    seq_id: int | None = None
    cached: int = 0  # tokens of prompt + output already in the KV cache
    siblings: list[_Entry] = field(default_factory=list)  # same prompt: forked from this one once it is computed
    speculator: Speculator | None = None

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt_ids + self.request.output_ids

    @property
    def pending(self) -> int:
        return len(self.request.prompt_ids) + len(self.request.output_ids) - self.cached


@dataclass
class _Plan:
    """The step being put together: tokens per entry, budget and pages left."""

    budget: int
    free_pages: int
    counts: dict[_Entry, int] = field(default_factory=dict)
    drafts: dict[_Entry, list[int]] = field(default_factory=dict)
    draft_room: int = 0
    preempted: bool = False


class Scheduler:
    def __init__(self, model: CompiledModel, speculators: Callable[[], Speculator] | None = None):
        self.model = model
        self.speculators = speculators
        self.cache = model.cache
        self.prefix = model.prefix
        self.prefix.clear()  # what the engine left cached: the pages count from an empty cache
        if self.cache.lengths:
            raise LlmcError("the scheduler needs a KV cache with no sequences in it")
        self.step_tokens = self.cache.prefill_chunk
        if self.step_tokens < self.cache.max_batch_size:
            raise LlmcError(f"the step budget ({self.step_tokens} tokens) must cover one decode token for each of "
                            f"the {self.cache.max_batch_size} sequences of a batch: raise --step-tokens or lower "
                            "--max-batch")
        self.pages_total = self.cache.free_pages()
        self.max_sequence_tokens = min(model.context_length, self.pages_total * self.cache.page_size)
        self.running: list[_Entry] = []
        self.waiting: list[_Entry] = []
        self._arrivals = 0
        self._generated = 0
        self._preemptions = 0
        self.stats = SchedulerStats(pages_total=self.pages_total)

    def _speculator(self, request: Request) -> Speculator | None:
        return self.speculators() if self.speculators and speculates(request.params) else None

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a request that could not finish even alone (the prompt plus `max_tokens`)."""
        check_fits(prompt_tokens, max_tokens, self.max_sequence_tokens)

    def add(self, request: Request, siblings: Sequence[Request] = ()) -> None:
        """Queue `request`, and `siblings` (more requests for the same prompt), which are forked from it
        when its prompt is computed rather than computing the prompt again."""
        for each in (request, *siblings):
            self.check_fits(len(each.prompt_ids), each.params.max_tokens)
            if each.prompt_ids != request.prompt_ids:
                raise LlmcError("the requests added together must have the same prompt")
        followers = [_Entry(s, self._arrivals + 1 + i, speculator=self._speculator(s)) for i, s in enumerate(siblings)]
        entry = _Entry(request, self._arrivals, siblings=followers, speculator=self._speculator(request))
        self._arrivals += 1 + len(siblings)
        self.waiting.append(entry)
        self._snapshot()

    def cancel(self, request: Request) -> None:
        """Drop a request wherever it is; its KV pages are free when this returns."""
        for entry in self.running + self.waiting:
            entry.siblings = [s for s in entry.siblings if s.request is not request]
            if entry.request is request:
                self._drop(entry)
        self._snapshot()

    def step(self) -> list[tuple[Request, Delta | RequestFailed]]:
        """Run one forward step over the scheduled tokens; what each request that got logits produced,
        or why it failed."""
        plan = _Plan(self.step_tokens, self.cache.free_pages())
        self._schedule_running(plan)
        self._admit_waiting(plan)
        if not plan.counts:
            self._snapshot()
            return []
        entries = list(plan.counts)
        drafts = [plan.drafts.get(entry, []) for entry in entries]
        chunks = [entry.tokens[entry.cached:entry.cached + plan.counts[entry] - len(draft)] + draft
                  for entry, draft in zip(entries, drafts)]
        rows = [1 + len(draft) for draft in drafts]
        # The grammar masks of the requests in this step are computed while the model runs.
        constraints = [e.request.constraint for entry in entries for e in (entry, *entry.siblings)
                       if e.request.constraint is not None]
        try:
            logits = masks_during(constraints, lambda: self.model.step([entry.seq_id for entry in entries], chunks,
                                                                        rows))
        except Exception as error:  # TVM raises its own errors; the batch's KV state is unknown after one
            for entry in entries:
                self._drop(entry)
            self._snapshot()
            raise StepFailed([entry.request for entry in entries], error) from error
        outputs: list[tuple[Request, Delta | RequestFailed]] = []
        ends = np.cumsum(rows)
        for entry, draft, end, count in zip(entries, drafts, ends, rows):
            before = entry.cached
            entry.cached += plan.counts[entry] - len(draft)  # and the drafts it keeps, in `_accept`
            if entry.pending == 0:
                outputs += self._fork_siblings(entry, logits[end - 1])
                try:
                    outputs.append((entry.request, self._accept(entry, logits[end - count:end], draft)))
                except Exception as error:  # sampling, detokenization, stop strings: this request only
                    if entry in self.running:
                        self._drop(entry)
                    outputs.append((entry.request, RequestFailed(error)))
            if entry.cached // self.cache.page_size > before // self.cache.page_size and entry in self.running:
                self.prefix.computed(entry.seq_id, entry.tokens[:entry.cached])  # a page is full: share it
        self._snapshot()
        return outputs

    def fail_all(self) -> list[Request]:
        """Drop every request (after an error the scheduler cannot pin on some of them); the dropped."""
        dropped = [e.request for entry in self.running + self.waiting for e in (entry, *entry.siblings)]
        for entry in self.running + self.waiting:
            entry.siblings = []
            self._drop(entry)
        self._snapshot()
        return dropped

    # -- planning ----------------------------------------------------------------------------------------
    def _schedule_running(self, plan: _Plan) -> None:
        """Decodes take one token of the budget each; prompt chunks share the rest, oldest first.
        Pages go oldest first: an entry that gets none preempts the newest entries, itself last."""
        decodes = sum(1 for entry in self.running if entry.pending == 1)
        prefill_budget = plan.budget - decodes
        # Prompts go first: drafts only in steps of decodes alone, with nobody waiting, and within the tokens that
        # keep such a step on the kernels a decode step runs.
        prompts = self.waiting or any(entry.pending > 1 for entry in self.running)
        plan.draft_room = 0 if prompts else self.model.tokens_before_slow_kernels(decodes)
        for entry in list(self.running):
            if entry.seq_id is None:  # preempted by an older entry in this loop
                continue
            draft = self._draft(entry, min(prefill_budget, plan.draft_room)) if entry.pending == 1 else []
            want = 1 + len(draft) if entry.pending == 1 else min(entry.pending, prefill_budget)
            if want == 0:
                continue
            count = self._fitting(entry, want, plan.free_pages)
            while count == 0 and self._evict(plan):
                count = self._fitting(entry, want, plan.free_pages)
            while count == 0 and self.running[-1] is not entry:
                plan.free_pages += self._preempt(self.running[-1])
                plan.preempted = True
                count = self._fitting(entry, want, plan.free_pages)
            if count == 0:
                self._preempt(entry)
                plan.preempted = True
                continue
            if entry.pending > 1:
                prefill_budget -= count
            elif count > 1:
                plan.drafts[entry] = draft[:count - 1]
                prefill_budget -= count - 1
                plan.draft_room -= count - 1
            self._plan(plan, entry, count)

    def _admit_waiting(self, plan: _Plan) -> None:
        """First come, first served, while the batch has room and the pages cover a chunk with one
        spare page per running sequence (so an admission does not force a preemption next step).
        A request whose next page of prompt a running one is computing waits for it, and those after
        it go first. A step that had to preempt admits nothing: pages are short."""
        position = 0
        while position < len(self.waiting) and plan.budget > 0 and len(self.running) < self.cache.max_batch_size \
                and not plan.preempted:
            entry = self.waiting[position]
            match = self.prefix.longest(entry.tokens)
            if match.promised:
                position += 1
                continue
            # A match is whole pages, so the tokens after it need pages of their own, as from an empty sequence.
            count = self._fitting(entry, min(len(entry.tokens) - match.length, plan.budget),
                                  plan.free_pages - len(self.running))
            if count == 0:
                if self._evict(plan):
                    continue  # the evicted sequence may have been the match: look again
                return
            self.waiting.pop(position)
            entry.seq_id, entry.cached = self.prefix.start(entry.tokens, match)
            _insert_by_arrival(self.running, entry)
            self._plan(plan, entry, count)

    def _draft(self, entry: _Entry, budget: int) -> list[int]:
        """Tokens the entry's drafter proposes for this step, within `budget`."""
        if entry.speculator is None:
            return []
        return entry.speculator.draft_for(entry.request, self.max_sequence_tokens, budget, self.model.step_cost)

    def _plan(self, plan: _Plan, entry: _Entry, count: int) -> None:
        plan.counts[entry] = count
        plan.budget -= count
        plan.free_pages -= self._pages(entry.cached + count) - self._pages(entry.cached)

    def _fitting(self, entry: _Entry, want: int, free_pages: int) -> int:
        """How many of `want` next tokens fit in the entry's last page and `free_pages` more."""
        room = (self._pages(entry.cached) + max(free_pages, 0)) * self.cache.page_size - entry.cached
        return max(0, min(want, room))

    def _pages(self, tokens: int) -> int:
        return self.cache.pages_for(tokens)

    def _evict(self, plan: _Plan) -> bool:
        """Evict the least recently used cached sequence, counting the pages it frees into the plan."""
        before = self.cache.free_pages()
        if not self.prefix.evict_one():
            return False
        plan.free_pages += self.cache.free_pages() - before
        return True

    # -- state changes -----------------------------------------------------------------------------------
    def _fork_siblings(self, entry: _Entry, logits_row) -> list[tuple[Request, Delta | RequestFailed]]:
        """Start the entry's siblings from its computed prompt, each taking its first token from the
        same logits; a sibling that finds no room in the batch or no page for the fork, or a cache that
        cannot fork, waits instead (and later starts from the prefix cache, or computes the prompt)."""
        siblings, entry.siblings = entry.siblings, []
        length, outputs = entry.cached, []
        fork_pages = 1 if length % self.cache.page_size else 0  # a fork within a page copies that page
        for sibling in siblings:
            self.prefix.make_room(fork_pages)
            if not self.prefix.can_fork or len(self.running) >= self.cache.max_batch_size or \
                    self.cache.free_pages() < fork_pages:
                _insert_by_arrival(self.waiting, sibling)
                continue
            sibling.seq_id, sibling.cached = self.prefix.start(sibling.tokens, Match(entry.seq_id, length))
            _insert_by_arrival(self.running, sibling)
            try:
                outputs.append((sibling.request, self._accept(sibling, logits_row[np.newaxis], [])))
            except Exception as error:  # as in `step`: this request only
                if sibling in self.running:
                    self._drop(sibling)
                outputs.append((sibling.request, RequestFailed(error)))
        return outputs

    def _preempt(self, entry: _Entry) -> int:
        """Free the entry's pages and queue it for recomputation; the number of pages freed (fewer than it
        holds where it shares pages with cached sequences)."""
        before = self.cache.free_pages()
        self.prefix.remove(entry.seq_id)
        freed = self.cache.free_pages() - before
        if entry.speculator is not None:
            entry.speculator.close()  # a draft model's KV too: pages are short
        self.running.remove(entry)
        entry.seq_id, entry.cached = None, 0
        _insert_by_arrival(self.waiting, entry)
        self._preemptions += 1
        return freed

    def _drop(self, entry: _Entry, finished: bool = False) -> None:
        """Take the entry out of the batch; a finished one leaves its sequence to the prefix cache. Siblings
        still waiting for it go on without it: the first of them computes the prompt."""
        if entry.siblings:
            heir, *rest = entry.siblings
            heir.siblings, entry.siblings = rest, []
            _insert_by_arrival(self.waiting, heir)
        if entry.speculator is not None:
            entry.speculator.close()
        if entry.seq_id is None:
            self.waiting.remove(entry)
            return
        if finished:
            self.prefix.finish(entry.seq_id, entry.tokens[:entry.cached])
        else:
            self.prefix.remove(entry.seq_id)
        self.running.remove(entry)

    def _accept(self, entry: _Entry, logits, draft: list[int]) -> Delta:
        """Pick the entry's next tokens from its rows of logits; roll back the drafts it does not keep."""
        request = entry.request
        before = len(request.output_ids)
        if draft:
            text, kept = entry.speculator.check(request, logits, draft)
            entry.cached += kept
            self.cache.truncate(entry.seq_id, entry.cached)
        else:
            text = request.accept(logits[0])
        self._generated += len(request.output_ids) - before
        if request.done:
            self._drop(entry, finished=True)
        return Delta(text, request.output_ids[before:], request.logprobs[before:], request.finish_reason,
                     request.top_logprobs[before:])

    def _snapshot(self) -> None:
        waiting = len(self.waiting) + sum(len(entry.siblings) for entry in self.running + self.waiting)
        self.stats = SchedulerStats(len(self.running), waiting, self.pages_total - self.cache.free_pages(),
                                    self.pages_total, self._generated, self._preemptions, self.prefix.stats)


def _insert_by_arrival(entries: list[_Entry], entry: _Entry) -> None:
    """Keep `entries` oldest first, so the newest is always last (the first to be preempted)."""
    entries.insert(bisect.bisect(entries, entry.arrival, key=lambda e: e.arrival), entry)
