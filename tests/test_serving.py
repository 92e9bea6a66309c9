"""Serving: continuous batching gives each request the output it gets alone, chunked prefill
keeps decodes going, a small KV cache makes requests wait or be preempted but never fail, a
client that disconnects frees its pages, and the OpenAI-compatible server answers the
official client, refuses bad requests with OpenAI-style errors and keeps serving."""

from __future__ import annotations

import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

import llmc
from llmc.runtime.model import CacheSettings
from llmc.runtime.request import Request
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.scheduler import Scheduler
from server_process import MODEL, ServerThread, free_port, start_server
from tiny_models import CHAT_WORDS

@pytest.fixture(scope="module")
def server(chat_package):
    with ServerThread(chat_package, CacheSettings(max_total_tokens=4096, max_batch_size=16, prefill_chunk=64)) as s:
        yield s


@pytest.fixture(scope="module")
def small_server(chat_package):
    """A KV cache of 11 pages (176 tokens): a few requests fill it."""
    with ServerThread(chat_package, CacheSettings(max_total_tokens=160, max_batch_size=8, prefill_chunk=32)) as s:
        yield s


def _prompt(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(CHAT_WORDS, words))


def _ask(client: openai.OpenAI, job: dict) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens) of one request, streamed or not, chat or not."""
    kind, stream, args = job["kind"], job["stream"], job["args"]
    create = client.chat.completions.create if kind == "chat" else client.completions.create
    if not stream:
        response = create(model=MODEL, **args)
        choice = response.choices[0]
        text = choice.message.content if kind == "chat" else choice.text
        return text, choice.finish_reason, response.usage.completion_tokens
    pieces, finish, usage = [], None, None
    for chunk in create(model=MODEL, stream=True, stream_options={"include_usage": True}, **args):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            pieces.append((choice.delta.content or "") if kind == "chat" else choice.text)
            finish = choice.finish_reason or finish
    return "".join(pieces), finish, usage


def _jobs(count: int, seed: int, max_words: int, max_tokens: tuple[int, int]) -> list[dict]:
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(count):
        text = _prompt(rng, int(rng.integers(2, max_words)))
        args = {"max_tokens": int(rng.integers(*max_tokens)), "temperature": 0.0}
        if i % 4 == 3:
            args.update(temperature=0.9, seed=i)  # sampled, but reproducible: each request has its own generator
        if i % 2:
            args["messages"] = [{"role": "user", "content": text}]
        else:
            args["prompt"] = text
        jobs.append({"kind": "chat" if i % 2 else "completion", "stream": i % 3 == 0, "args": args})
    return jobs


def _concurrently(client: openai.OpenAI, jobs: list[dict]) -> list[tuple[str, str, int]]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: _ask(client, job), jobs))


def _record_steps(monkeypatch, model, delay_s: float = 0.0) -> list[list[int]]:
    """Record the tokens per sequence of every model step (optionally slowing each step down)."""
    steps, step = [], model.step

    def recording(seq_ids, chunks, logit_rows=None):
        steps.append([len(c) for c in chunks])
        time.sleep(delay_s)
        return step(seq_ids, chunks, logit_rows)
    monkeypatch.setattr(model, "step", recording)
    return steps


def test_sixteen_concurrent_requests_each_match_the_request_sent_alone(server, monkeypatch):
    jobs = _jobs(16, seed=1, max_words=120, max_tokens=(4, 40))
    alone = [_ask(server.client, job) for job in jobs]
    steps = _record_steps(monkeypatch, server.engine.engine.model)
    together = _concurrently(server.client, jobs)
    assert together == alone
    assert all(finish in ("stop", "length") for _, finish, _ in together)
    assert max(len(s) for s in steps) >= 4, "the requests were not batched"
    assert max(sum(s) for s in steps) <= 64


def test_long_prompts_are_prefilled_in_chunks_beside_running_decodes(chat_package, monkeypatch):
    engine = llmc.load(chat_package, cache=CacheSettings(max_total_tokens=1024, max_batch_size=4, prefill_chunk=16))
    steps = _record_steps(monkeypatch, engine.model)
    scheduler = Scheduler(engine.model)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 300, 5).tolist() for _ in range(3)] + [rng.integers(3, 300, 100).tolist()]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    requests = [Request(p, params, engine.tokenizer, engine.eos_ids, scheduler.max_sequence_tokens) for p in prompts]
    for request in requests[:3]:
        scheduler.add(request)
    scheduler.step()
    scheduler.add(requests[3])
    while scheduler.has_work:
        scheduler.step()
    prefill = steps[1:1 + -(-100 // 13)]  # 16 tokens a step: 3 decodes and 13 of the long prompt
    assert all(s[:3] == [1, 1, 1] and len(s) == 4 and sum(s) <= 16 for s in prefill), steps
    assert sum(s[3] for s in prefill) == 100
    for request, prompt in zip(requests, prompts):
        assert request.output_ids == engine.generate(prompt, params).output_ids


def test_more_requests_than_the_kv_cache_holds_all_finish(small_server):
    jobs = _jobs(12, seed=3, max_words=40, max_tokens=(40, 70))
    for job in jobs:
        job["args"].update(extra_body={"ignore_eos": True})
    alone = [_ask(small_server.client, job) for job in jobs]
    before = small_server.metrics()
    together = _concurrently(small_server.client, jobs)
    after = small_server.metrics()
    assert together == alone
    assert all(finish == "length" for _, finish, _ in together)
    assert after["llmc_preemptions_total"] > before["llmc_preemptions_total"]
    assert after["llmc_requests_running"] == 0 and small_server.pages_in_use_without_the_prefix_cache() == 0


def _wait_until_idle(server: ServerThread) -> dict[str, float]:
    deadline = time.monotonic() + 20
    while True:
        metrics = server.metrics()
        if metrics["llmc_requests_running"] == metrics["llmc_requests_waiting"] == 0 or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_gets_its_request_cancelled_and_its_pages_freed(server, monkeypatch, stream):
    _record_steps(monkeypatch, server.engine.engine.model, delay_s=0.02)  # 200 tokens now take 4 s or more
    before = _wait_until_idle(server)
    body = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 200, "ignore_eos": True, "stream": stream,
            "logprobs": 0}
    if stream:
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            assert server.metrics()["llmc_kv_cache_pages_used"] > 0
    else:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    after = _wait_until_idle(server)
    assert after["llmc_requests_running"] == server.pages_in_use_without_the_prefix_cache() == 0
    assert 0 < after["llmc_generated_tokens_total"] - before["llmc_generated_tokens_total"] < 200


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": ', 400, None, None),
    ("/v1/completions", b'["not", "an", "object"]', 400, None, None),
    ("/v1/completions", b'{"model": "gpt-4", "prompt": "hi"}', 404, "model", "model_not_found"),
    ("/v1/completions", b'{"prompt": "hi"}', 400, "model", None),
    ("/v1/completions", b'{"model": "tiny-chat"}', 400, "prompt", None),
    ("/v1/chat/completions", b'{"model": "tiny-chat"}', 400, "messages", None),
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [{"role": "user"}]}', 400, "messages", None),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": "ten"}', 400, "max_tokens", None),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": 1000}', 400, "prompt",
     "context_length_exceeded"),
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "n": 0}',
     400, "n", None),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": [7, 100000]}', 400, None, None),
])
def test_bad_requests_get_openai_style_errors(server, path, body, status, param, code):
    response = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_the_official_client_sees_errors_and_the_server_keeps_serving(server):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens"):
        server.client.completions.create(model=MODEL, prompt="hi", max_tokens=300)
    with pytest.raises(openai.BadRequestError, match="n must be between 1 and 64"):
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=0)
    choices = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3,
                                                    max_tokens=3).choices
    assert [c.index for c in choices] == [0, 1, 2]
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="another-model", prompt="hi")
    response = server.client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=5, temperature=0,
                                                logprobs=0)
    assert response.usage.completion_tokens == len(response.choices[0].logprobs.token_logprobs) <= 5
    assert all(p <= 0 for p in response.choices[0].logprobs.token_logprobs)
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_failing_step_fails_only_its_requests(server, monkeypatch):
    model = server.engine.engine.model
    step = model.step
    failures = iter([RuntimeError("simulated kernel failure")])

    def failing_once(seq_ids, chunks, logit_rows=None):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return step(seq_ids, chunks, logit_rows)
    monkeypatch.setattr(model, "step", failing_once)
    response = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "the dog", "max_tokens": 4})
    assert response.status_code == 500
    assert "simulated kernel failure" in response.json()["error"]["message"]
    assert server.client.completions.create(model=MODEL, prompt="the dog", max_tokens=4).usage.completion_tokens > 0
    assert _wait_until_idle(server)["llmc_requests_running"] == server.pages_in_use_without_the_prefix_cache() == 0


def test_the_serve_command(chat_package):
    port = free_port()
    process, url = start_server([sys.executable, "-m", "llmc.cli", "serve", chat_package, "--port", str(port),
                                 "--model-name", MODEL, "--max-batch", "4", "--kv-tokens", "512", "--threads", "1"],
                                port)
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as response:
            events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        assert re.search(r"^llmc_kv_cache_pages_total \d+$", httpx.get(url + "/metrics").text, re.MULTILINE)
    finally:
        process.terminate()
        process.wait(timeout=30)
