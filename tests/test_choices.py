"""Several choices for one prompt (`n`, `best_of`): the prompt is computed once and forked, each choice
is what its seed gives alone, streamed choices arrive by index, the forked pages are all given back,
and bad values are refused."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

import llmc
from llmc.runtime.model import CacheSettings
from llmc.runtime.request import Request
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.scheduler import Scheduler
from server_process import MODEL, ServerThread

PROMPT = "the quick brown fox jumps over the lazy dog and the dog sleeps"


@pytest.fixture(scope="module")
def server(chat_package):
    with ServerThread(chat_package, CacheSettings(max_total_tokens=2048, max_batch_size=8, prefill_chunk=64)) as s:
        yield s


def _completion(server, **args) -> dict:
    response = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, **args},
                          timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _record_prefill(monkeypatch, model) -> list[int]:
    """The token count of every sequence's chunk in every step."""
    counts, step = [], model.step

    def recording(seq_ids, chunks, logit_rows=None):
        counts.extend(len(c) for c in chunks)
        return step(seq_ids, chunks, logit_rows)
    monkeypatch.setattr(model, "step", recording)
    return counts


def test_three_choices_equal_three_solo_runs_with_their_seeds(server, monkeypatch):
    sampled = {"max_tokens": 12, "temperature": 0.9, "ignore_eos": True}
    solo = [_completion(server, seed=41 + i, **sampled)["choices"][0]["text"] for i in range(3)]
    server.engine.scheduler.prefix.clear()  # nothing cached: the prompt must be computed by the call itself
    counts = _record_prefill(monkeypatch, server.engine.engine.model)
    reply = _completion(server, n=3, seed=41, **sampled)
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert [c["text"] for c in reply["choices"]] == solo
    assert len(set(solo)) > 1, "the seeds should give different choices"
    prompt_tokens = reply["usage"]["prompt_tokens"]
    assert sum(c for c in counts if c > 1) == prompt_tokens, "the prompt was computed more than once"
    assert reply["usage"]["completion_tokens"] == 36
    assert server.pages_in_use_without_the_prefix_cache() == 0


def test_streamed_choices_reassemble_into_the_whole_reply(server):
    args = {"n": 2, "seed": 7, "temperature": 1.0, "max_tokens": 10}
    whole = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], **args}).json()
    texts, finishes, roles = ["", ""], [None, None], [0, 0]
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
                            **args}) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                index = choice["index"]
                roles[index] += choice["delta"].get("role") == "assistant"
                texts[index] += choice["delta"].get("content") or ""
                finishes[index] = choice["finish_reason"] or finishes[index]
    assert texts == [c["message"]["content"] for c in whole["choices"]]
    assert finishes == [c["finish_reason"] for c in whole["choices"]] and roles == [1, 1]


def test_best_of_returns_the_choice_with_the_highest_log_probability_per_token(server):
    args = {"max_tokens": 8, "temperature": 1.0, "logprobs": 0, "ignore_eos": True}
    candidates = [_completion(server, seed=90 + i, **args)["choices"][0] for i in range(4)]
    best = max(candidates, key=lambda c: np.mean(c["logprobs"]["token_logprobs"]))
    reply = _completion(server, best_of=4, seed=90, **args)
    assert [c["text"] for c in reply["choices"]] == [best["text"]]
    assert reply["usage"]["completion_tokens"] == 32


def test_choices_forked_in_the_scheduler_share_the_prompt_and_give_every_page_back(chat_package):
    engine = llmc.load(chat_package, cache=CacheSettings(max_total_tokens=512, max_batch_size=4, prefill_chunk=32,
                                                         prefix_cache=False))
    scheduler = Scheduler(engine.model)
    prompt = np.random.default_rng(3).integers(3, 300, 45).tolist()
    params = [SamplingParams(max_tokens=10, temperature=0.8, seed=s, ignore_eos=True) for s in range(6)]
    requests = [Request(prompt, p, engine.tokenizer, engine.eos_ids, scheduler.max_sequence_tokens) for p in params]
    scheduler.add(requests[0], requests[1:])
    scheduler.step()  # the first 32 prompt tokens
    scheduler.step()  # the rest: the first four choices are forked, two wait for room in the batch
    assert scheduler.stats.running == 4 and scheduler.stats.waiting == 2
    while scheduler.has_work:
        scheduler.step()
    for request, p in zip(requests, params):
        assert request.output_ids == engine.generate(prompt, p).output_ids
    assert scheduler.cache.free_pages() == scheduler.pages_total and not scheduler.cache.lengths


def test_cancelling_the_first_choice_before_its_prompt_is_done_hands_the_prompt_to_the_next(chat_package):
    engine = llmc.load(chat_package, cache=CacheSettings(max_total_tokens=512, max_batch_size=4, prefill_chunk=16))
    scheduler = Scheduler(engine.model)
    prompt = list(range(3, 60))
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    requests = [Request(prompt, params, engine.tokenizer, engine.eos_ids, scheduler.max_sequence_tokens)
                for _ in range(3)]
    scheduler.add(requests[0], requests[1:])
    scheduler.step()
    scheduler.cancel(requests[0])
    scheduler.cancel(requests[2])
    while scheduler.has_work:
        scheduler.step()
    assert requests[0].output_ids == requests[2].output_ids == []
    assert requests[1].output_ids == engine.generate(prompt, params).output_ids
    scheduler.prefix.clear()
    assert scheduler.cache.free_pages() == scheduler.pages_total


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"n": 65}, "n"),
    ("/v1/completions", {"n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"best_of": 3, "stream": True}, "best_of"),
    ("/v1/chat/completions", {"best_of": 2}, "best_of"),
    ("/v1/chat/completions", {"n": "two"}, "n"),
])
def test_bad_choice_counts_are_refused(server, path, fields, param):
    body = {"model": MODEL, **({"prompt": "hi"} if "chat" not in path else
                               {"messages": [{"role": "user", "content": "hi"}]}), **fields}
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
