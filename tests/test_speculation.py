"""Speculative decoding (runtime/speculation.py): greedy output with prompt-lookup or draft-model drafts is
the plain greedy output, alone and inside continuous batching; sampling keeps the model's distribution;
drafting stops when it does not pay; rejected drafts leave no KV pages behind, also when a client leaves
mid-stream; bad `--speculate` values and mismatched draft models are refused."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

import llmc
from llmc.errors import LlmcError
from llmc.runtime.model import CacheSettings, StepCost
from llmc.runtime.request import Request
from llmc.runtime.sampling import Sampler, SamplingParams
from llmc.runtime.scheduler import Scheduler
from llmc.runtime.ngram_drafter import NgramDrafter
from llmc.runtime.speculation import PROBE_AFTER_STEPS, Speculation, Speculator
from server_process import MODEL, ServerThread
from test_cli import assert_clean_failure, llmc_cli
from tiny_models import build_chat_package

GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)
NO_CACHE = CacheSettings(prefix_cache=False)


@pytest.fixture(scope="module")
def other_tiny_package(tmp_path_factory) -> str:
    """Another tiny random model with the chat tokenizer: a draft model that is often wrong."""
    return build_chat_package(tmp_path_factory.mktemp("draft"), seed=1)


def _record_feedback(monkeypatch) -> list[tuple[int, int]]:
    """Record each check's (drafted, kept); steps cost a fixed 0.1 of a decode per extra token, so that how much is
    drafted does not depend on the machine's timings."""
    monkeypatch.setattr(StepCost, "extra_per_token", property(lambda self: 0.1))
    outcomes, feedback = [], Speculator.feedback

    def recording(self, drafted, kept):
        outcomes.append((drafted, kept))
        feedback(self, drafted, kept)
    monkeypatch.setattr(Speculator, "feedback", recording)
    return outcomes


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, int(rng.integers(5, 40))).tolist() for _ in range(count)]


class _Oracle:
    """Drafts the plain greedy continuation of the prompts it knows, wrong at every third position: checks,
    keeps and rolls back drafts whatever the drafting method (the tiny random models never repeat their
    context, so prompt lookup alone would draft nothing)."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]]):
        self.continuations = continuations

    def propose(self, tokens, limit):
        for prompt, continuation in self.continuations.items():
            if tuple(tokens[:len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                return [(t + 1) % 512 if (done + i) % 3 == 2 else t
                        for i, t in enumerate(continuation[done:done + limit])]
        return []

    def close(self):
        pass


def _speculators(method: str, package: str, prompts: list[list[int]], expected: list[list[int]], drafts: dict):
    """(Speculation for llmc.load, or None and a factory of oracle speculators)."""
    if method == "oracle":
        oracle = _Oracle({tuple(p): e for p, e in zip(prompts, expected)})
        return None, lambda: Speculator(oracle, 5, lambda: 0.0)
    if method.startswith("draft:"):
        return Speculation("draft", 4, drafts[method.split(":")[1]]), None
    return Speculation.parse(method), None


@pytest.mark.parametrize("method", ["oracle", "ngram", "draft:self", "draft:other"])
def test_speculative_greedy_equals_plain_greedy(chat_package, other_tiny_package, method, monkeypatch):
    plain = llmc.load(chat_package, cache=NO_CACHE)
    prompts = _prompts(4, seed=5)
    expected = [plain.generate(p, GREEDY).output_ids for p in prompts]
    speculation, oracle = _speculators(method, chat_package, prompts, expected,
                                       {"self": chat_package, "other": other_tiny_package})
    speculative = llmc.load(chat_package, cache=NO_CACHE, speculation=speculation)
    if oracle is not None:
        speculative.speculators = oracle
    elif method.startswith("draft"):  # the tiny draft models cost as much as the target: draft anyway
        make = speculative.speculators

        def free_drafts() -> Speculator:
            speculator = make()
            speculator.draft_cost = lambda: 0.0
            return speculator
        speculative.speculators = free_drafts
    outcomes = _record_feedback(monkeypatch)
    assert [speculative.generate(p, GREEDY).output_ids for p in prompts] == expected
    if method in ("oracle", "draft:self"):  # drafts kept and (the oracle's) refused
        assert sum(kept for _, kept in outcomes) > 10, "few drafts were kept: little was tested"
        assert any(kept < drafted for drafted, kept in outcomes) or method == "draft:self"
    if method == "draft:other":  # another random model: its drafts are checked, and refused
        assert outcomes
    assert not speculative.model.cache.lengths, "a sequence was left in the KV cache"


def test_speculation_inside_continuous_batching_gives_each_request_its_plain_output(chat_package, monkeypatch):
    plain = llmc.load(chat_package, cache=NO_CACHE)
    prompts = _prompts(4, seed=9)
    expected = [plain.generate(p, GREEDY).output_ids for p in prompts]
    engine = llmc.load(chat_package, cache=CacheSettings(max_total_tokens=2048, max_batch_size=4, prefill_chunk=48))
    _, oracle = _speculators("oracle", chat_package, prompts[::2], expected[::2], {})
    scheduler = Scheduler(engine.model, oracle)  # half the requests find drafts, the others decode plainly
    outcomes = _record_feedback(monkeypatch)
    decode_steps, step = [], engine.model.step

    def recording(seq_ids, chunks, logit_rows=None):
        if logit_rows and all(len(c) == rows for c, rows in zip(chunks, logit_rows)):  # decodes and drafts only
            decode_steps.append(sum(logit_rows))
        return step(seq_ids, chunks, logit_rows)
    monkeypatch.setattr(engine.model, "step", recording)
    requests = [Request(p, GREEDY, engine.tokenizer, engine.eos_ids, scheduler.max_sequence_tokens) for p in prompts]
    for request in requests:
        scheduler.add(request)
    widths = []
    while scheduler.has_work:
        scheduler.step()
        widths.append(scheduler.stats.running)
    assert [r.output_ids for r in requests] == expected
    assert sum(kept for _, kept in outcomes) > 10 and max(widths) > 1
    assert max(decode_steps) == engine.model.tokens_before_slow_kernels(0), "drafts pushed decodes onto slow kernels"
    scheduler.prefix.clear()
    assert scheduler.cache.free_pages() == scheduler.pages_total and not scheduler.cache.lengths


def test_prompt_lookup_drafts_what_followed_the_longest_matching_ending():
    tokens = [1, 2, 3, 4, 5, 9, 3, 4, 6, 7, 2, 3, 4]
    drafter = NgramDrafter()
    assert drafter.propose(tokens, 3) == [5, 9, 3]  # "2 3 4" occurred at the start: what followed it
    assert drafter.propose(tokens + [6], 2) == [7, 2]  # "3 4 6", indexed as the sequence grew
    assert drafter.propose([8, 8, 8, 1], 4) == []  # nothing ended like this before
    assert NgramDrafter().propose(tokens + [6], 2) == [7, 2]


def test_checking_a_draft_keeps_the_distribution():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3))
    draws = 40_000
    for draft in (0, 3):
        counts = np.bincount([sampler.check_draft(logits, [], draft)[0] for _ in range(draws)], minlength=5)
        assert np.abs(counts / draws - np.exp(logits)).max() < 0.01, (draft, counts / draws)


class _Wrong:
    """A drafter that is always wrong."""

    def __init__(self):
        self.asked: list[int] = []

    def propose(self, tokens, limit):
        self.asked.append(limit)
        return [0] * limit

    def close(self):
        pass


def test_drafting_stops_when_it_does_not_pay_and_probes_now_and_then():
    cost = StepCost(longest=7)
    for tokens, seconds in ((1, 0.010), (3, 0.013), (1, 0.010), (5, 0.016)):  # 0.15 of a decode per extra token
        cost.record(tokens, seconds)
    assert abs(cost.extra_per_token - 0.15) < 1e-6 and abs(cost.decode_s - 0.010) < 1e-9
    drafter = _Wrong()
    speculator = Speculator(drafter, max_tokens=5, draft_cost=lambda: 0.0)
    drafted = []
    for _ in range(3 * PROBE_AFTER_STEPS):
        draft = speculator.draft([1, 2, 3], room=5, step_cost=cost)
        if draft:
            speculator.feedback(len(draft), 0)
        drafted.append(len(draft))
    assert sum(1 for d in drafted if d) <= 3 + 3 and drafted[-PROBE_AFTER_STEPS:].count(1) == 1
    right = Speculator(_Right(), max_tokens=5, draft_cost=lambda: 0.0)
    for _ in range(10):
        draft = right.draft([1, 2, 3], room=5, step_cost=cost)
        right.feedback(len(draft), len(draft))
    assert len(right.draft([1, 2, 3], room=5, step_cost=cost)) == 5
    assert len(right.draft([1, 2, 3], room=2, step_cost=cost)) == 2


class _Right(_Wrong):
    """A drafter whose drafts are always kept (feedback says so)."""


def test_a_client_that_leaves_mid_speculation_frees_its_pages(chat_package):
    with ServerThread(chat_package, CacheSettings(max_total_tokens=2048, max_batch_size=4, prefill_chunk=64),
                      speculation=Speculation()) as server:
        prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 150, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            chunks = 0
            for line in response.iter_lines():
                chunks += line.startswith("data: {")
                if chunks == 5:
                    break
        for _ in range(100):
            if server.engine.stats.running == 0:
                break
            httpx.get(server.url + "/health")
        reply = httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 30}).json()
        assert reply["usage"]["completion_tokens"] == 30
        assert server.engine.stats.running == 0 and server.pages_in_use_without_the_prefix_cache() == 0


@pytest.mark.parametrize("text, message", [
    ("beam", "say ngram"), ("ngram:0", "K must be from 1"), ("ngram:99", "K must be from 1"), ("draft", "say ngram"),
])
def test_bad_speculate_values_are_refused(text, message):
    with pytest.raises(LlmcError, match=message):
        Speculation.parse(text)


def test_a_draft_model_with_another_tokenizer_is_refused(chat_package, tiny_package):
    with pytest.raises(LlmcError, match="has no tokenizer|another tokenizer"):
        llmc.load(chat_package, speculation=Speculation("draft", 4, tiny_package("llama_mha_tied")))


def test_the_cli_speculates(chat_package):
    args = ["run", chat_package, "the dog the dog the dog the dog", "--raw", "--json", "-n", "12"]
    plain = json.loads(llmc_cli(*args).stdout)
    assert json.loads(llmc_cli(*args, "--speculate", "ngram:3").stdout)["output_ids"] == plain["output_ids"]
    assert_clean_failure(llmc_cli(*args, "--speculate", "ngram:x"), "--speculate 'ngram:x'")


def test_smollm2_speculative_greedy_equals_plain_greedy(smollm2_package, smollm2_auto_package, monkeypatch):
    """SmolLM2 with float32 weights, drafting by prompt lookup and with the Q4_1 package as the draft model."""
    plain = llmc.load(smollm2_package, cache=NO_CACHE)
    paragraph = ("The old lighthouse stood on the northern cliff for two hundred years. Every night its keeper "
                 "climbed the narrow stairs, trimmed the wick and watched the ships pass through the strait.")
    prompts = [f"Repeat this paragraph, replacing 'old' with 'ancient':\n\n{paragraph}",
               "What is the capital of France?"]
    params = SamplingParams(max_tokens=48)
    expected = [plain.generate(p, params, chat=True).output_ids for p in prompts]
    outcomes = _record_feedback(monkeypatch)
    for speculation in (Speculation(), Speculation("draft", 4, smollm2_auto_package)):
        engine = llmc.load(smollm2_package, cache=NO_CACHE, speculation=speculation)
        assert [engine.generate(p, params, chat=True).output_ids for p in prompts] == expected, speculation.method
    assert sum(kept for _, kept in outcomes) > 20
