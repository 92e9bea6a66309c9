"""Automatic prefix caching (runtime/prefix_cache.py): a prompt that begins like an earlier one starts
from that one's KV pages, with the same greedy tokens as a run that recomputes everything; shared pages
go back to the cache when the last sequence using them ends; cached sequences are evicted when pages
run short; `/metrics` and the CLI's `--no-prefix-cache` expose it."""

from __future__ import annotations

import json

import numpy as np

import llmc
from llmc.runtime.model import CacheSettings
from llmc.runtime.request import Request
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.scheduler import Scheduler
from server_process import MODEL, ServerThread
from test_cli import llmc_cli

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
BATCH = CacheSettings(max_total_tokens=1024, max_batch_size=8, prefill_chunk=64)


def _prompts(count: int, shared: int, own: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of `shared` common token ids followed by `own` ids of their own."""
    rng = np.random.default_rng(seed)
    common = rng.integers(3, 300, shared).tolist()
    return [common + rng.integers(3, 300, own).tolist() for _ in range(count)]


def _run_all(scheduler: Scheduler, engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    requests = [Request(p, params, engine.tokenizer, engine.eos_ids, scheduler.max_sequence_tokens) for p in prompts]
    for request in requests:
        scheduler.add(request)
    while scheduler.has_work:
        scheduler.step()
    return [request.output_ids for request in requests]


def _scheduled(chat_package, settings: CacheSettings, prompts: list[list[int]]):
    """A fresh engine and a scheduler over it, and the greedy tokens each prompt gets alone, uncached."""
    engine = llmc.load(chat_package, cache=settings)
    solo = llmc.load(chat_package, cache=CacheSettings(prefix_cache=False))
    return engine, Scheduler(engine.model), [solo.generate(p, GREEDY).output_ids for p in prompts]


def test_a_prompt_sharing_a_prefix_starts_from_its_pages_with_the_same_tokens(chat_package):
    cached = llmc.load(chat_package)
    uncached = llmc.load(chat_package, cache=CacheSettings(prefix_cache=False))
    page = cached.model.cache.page_size
    for prompt in _prompts(3, shared=3 * page + 5, own=7):
        assert cached.generate(prompt, GREEDY).output_ids == uncached.generate(prompt, GREEDY).output_ids
    stats = cached.model.prefix.stats
    assert stats.cached_tokens == 2 * 3 * page  # the second and third prompts found the three shared full pages
    assert uncached.model.prefix.stats.cached_tokens == 0 and not uncached.model.cache.lengths


def test_a_chat_turn_starts_from_the_conversation_so_far(chat_package):
    engine = llmc.load(chat_package)
    messages = [{"role": "system", "content": "the quick brown fox jumps over the lazy dog " * 6},
                {"role": "user", "content": "the dog"}]
    first = engine.chat(messages, GREEDY)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "the fox"}]
    before = engine.model.prefix.stats.cached_tokens
    second = engine.chat(messages, GREEDY)
    page = engine.model.cache.page_size
    first_prompt = len(engine.chat_prompt(messages[:2]))
    assert engine.model.prefix.stats.cached_tokens - before >= first_prompt // page * page - page
    assert second.output_ids == llmc.load(chat_package, cache=CacheSettings(prefix_cache=False)).chat(
        messages, GREEDY).output_ids


def test_batched_requests_share_pages_and_give_them_all_back(chat_package):
    prompts = _prompts(6, shared=70, own=9, seed=1)
    engine, scheduler, expected = _scheduled(chat_package, BATCH, prompts)
    assert _run_all(scheduler, engine, prompts[:1], GREEDY) == expected[:1]  # cached once finished ...
    assert _run_all(scheduler, engine, prompts[1:], GREEDY) == expected[1:]  # ... then shared by five at once
    assert scheduler.stats.prefix.cached_tokens == 5 * (70 // 16 * 16)
    assert scheduler.stats.prefix.retained_sequences == 6
    scheduler.prefix.clear()
    assert not engine.model.cache.lengths
    assert engine.model.cache.free_pages() == scheduler.pages_total  # every shared page's count is back to zero


def test_requests_arriving_together_share_the_pages_the_first_one_computes(chat_package):
    prompts = _prompts(6, shared=70, own=9, seed=3)
    engine, scheduler, expected = _scheduled(chat_package, BATCH, prompts)
    assert _run_all(scheduler, engine, prompts, GREEDY) == expected
    # The first step's 64 tokens are the first prompt's four full pages; the other five start from them.
    assert scheduler.stats.prefix.cached_tokens == 5 * 64
    scheduler.prefix.clear()
    assert not engine.model.cache.lengths and engine.model.cache.free_pages() == scheduler.pages_total


def test_requests_wait_for_the_shared_pages_another_request_is_computing(chat_package):
    """With a step budget that would admit all six at once, the five wait one step for the first to compute the
    shared document (nine full pages) instead of computing it five times more."""
    prompts = _prompts(6, shared=150, own=9, seed=4)
    engine, scheduler, expected = _scheduled(chat_package, CacheSettings(max_total_tokens=2048, max_batch_size=8,
                                                                         prefill_chunk=512), prompts)
    assert _run_all(scheduler, engine, prompts, GREEDY) == expected
    assert scheduler.stats.prefix.cached_tokens == 5 * 144
    scheduler.prefix.clear()
    assert not engine.model.cache.lengths and engine.model.cache.free_pages() == scheduler.pages_total


def test_cached_sequences_are_evicted_when_pages_run_short(chat_package):
    # 11 pages in all: each request holds up to 4, so the cache cannot keep many finished ones.
    prompts = _prompts(8, shared=0, own=40, seed=2)
    engine, scheduler, expected = _scheduled(
        chat_package, CacheSettings(max_total_tokens=160, max_batch_size=4, prefill_chunk=32), prompts)
    outputs = [_run_all(scheduler, engine, [prompt], GREEDY)[0] for prompt in prompts]
    outputs += _run_all(scheduler, engine, prompts[-2:], GREEDY)  # the two newest are still cached
    assert outputs == expected + expected[-2:]
    stats = scheduler.stats.prefix
    assert stats.evictions >= 4 and stats.cached_tokens == 2 * (40 // 16 * 16)
    assert scheduler.stats.preemptions == 0  # cached sequences go before any running request
    scheduler.prefix.clear()
    assert engine.model.cache.free_pages() == scheduler.pages_total


def test_metrics_report_the_prefix_cache(chat_package):
    body = {"model": MODEL, "messages": [{"role": "system", "content": "the lazy dog " * 20},
                                         {"role": "user", "content": "the fox"}], "max_tokens": 4, "temperature": 0}
    with ServerThread(chat_package, CacheSettings(max_total_tokens=1024, max_batch_size=4, prefill_chunk=64)) as s:
        first = s.client.chat.completions.create(**body).choices[0].message.content
        second = s.client.chat.completions.create(**body).choices[0].message.content
        metrics = s.metrics()
    assert first == second
    assert metrics["llmc_prefix_cache_hit_tokens_total"] >= 48
    assert 0 < metrics["llmc_prefix_cache_hit_rate"] < 1
    assert metrics["llmc_prefix_cache_queried_tokens_total"] > metrics["llmc_prefix_cache_hit_tokens_total"]
    assert metrics["llmc_prefix_cache_sequences"] == 2 and metrics["llmc_prefix_cache_evictions_total"] == 0


def test_run_gives_the_same_tokens_with_and_without_the_prefix_cache(chat_package):
    outputs = []
    for flag in ([], ["--no-prefix-cache"]):
        result = llmc_cli("run", chat_package, "the quick brown fox", "-n", "6", "--json", *flag)
        assert result.returncode == 0, result.stderr
        outputs.append(json.loads(result.stdout)["output_ids"])
    assert outputs[0] == outputs[1] and len(outputs[0]) > 0
