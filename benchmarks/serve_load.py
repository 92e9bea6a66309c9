"""Load test of `llmc serve`: concurrent streaming clients, with the official `openai` client.

Starts `llmc serve MODEL` on a free loopback port (or uses `--url`), then for each client
count runs that many clients at once, each sending `--requests` streaming completions in
turn (`--max-tokens` tokens each, end-of-sequence ignored so every request is the same
length). Prints generated tokens per second, time to first token and inter-token latency
(p50, p99) per client count, as a Markdown table.

Workloads (`--workload`): `distinct`, a short prompt of its own per request (nothing to share);
`shared-prefix`, one long document (the first `--shared-chars` characters of
benchmarks/data/perplexity.txt, about 1,000 tokens) followed by each request's own question,
as clients that share a system prompt; `chat`, conversations of `--turns` turns (chat
completions), each client with a document of its own as the system prompt, every turn sending
the whole conversation so far (a second table gives the time per turn, by turn); `rewrite`, a
paragraph of its own per request, which the model is asked to repeat with one word changed
(chat completions, ending at the end-of-sequence token), where speculative decoding pays.
`--no-prefix-cache` starts the server without prefix caching, `--speculate` with speculation.

    python benchmarks/serve_load.py /tmp/smol_pkg --clients 1,4,16 --threads 2
    python benchmarks/serve_load.py /tmp/smol_pkg --workload shared-prefix --clients 16 [--no-prefix-cache]
    python benchmarks/serve_load.py /tmp/smol_pkg --workload chat --clients 4 --turns 6 [--no-prefix-cache]
    python benchmarks/serve_load.py /tmp/smol_pkg --workload rewrite --clients 1,4 [--speculate ngram]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import openai

MODEL_NAME = "bench"
DOCUMENT = Path(__file__).resolve().parent / "data" / "perplexity.txt"
TOPICS = ["the sea", "a lighthouse", "bread", "mountains", "a robot", "winter", "a library", "trains", "the moon",
          "a garden", "rivers", "a market", "clocks", "bees", "a violin", "deserts"]


@dataclass
class Timing:
    start: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, max_batch: int, threads: int, step_tokens: int, prefix_cache: bool,
                 speculate: str | None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    process = subprocess.Popen([sys.executable, "-m", "llmc.cli", "serve", model, "--host", "127.0.0.1",
                                "--port", str(port), "--model-name", MODEL_NAME, "--max-batch", str(max_batch),
                                "--step-tokens", str(step_tokens), "--threads", str(threads),
                                *([] if prefix_cache else ["--no-prefix-cache"]),
                                *(["--speculate", speculate] if speculate else [])],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.terminate()
    sys.exit(f"llmc serve {model} did not start (exit code {process.poll()}); run it by hand to see why")


async def one_request(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> Timing:
    timing = Timing(time.perf_counter())
    stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage is not None:
            timing.tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            timing.chunks.append(time.perf_counter())
    return timing


async def one_chat_request(client: openai.AsyncOpenAI, messages: list[dict], max_tokens: int,
                           ignore_eos: bool = True) -> tuple[Timing, str]:
    """One streamed chat completion: its timing and its text."""
    timing, text = Timing(time.perf_counter()), []
    stream = await client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                                  temperature=0, stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": ignore_eos})
    async for chunk in stream:
        if chunk.usage is not None:
            timing.tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            timing.chunks.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
    return timing, "".join(text)


def prompt_for(workload: str, shared: str, number: int) -> str:
    topic = TOPICS[number % len(TOPICS)]
    if workload == "shared-prefix":
        return f"{shared}\n\nQuestion {number}: what does the text above say about {topic}?\nAnswer:"
    return f"Here is a short story about {topic}:"


def paragraph(document: str, number: int, chars: int = 600) -> str:
    """A passage of whole sentences from the document, a different one for each number."""
    start = document.find(". ", number * 997 % max(1, len(document) - 2 * chars)) + 2
    end = document.rfind(". ", start, start + chars) + 1
    return document[start:end]


async def chat_client(client: openai.AsyncOpenAI, document: str, index: int, turns: int,
                      max_tokens: int) -> list[Timing]:
    """One conversation: a system prompt of its own, then `turns` questions, each sent with all before it."""
    messages = [{"role": "system", "content": paragraph(document, 50 + index, 3000)}]
    timings = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn + 1}: what does the text say about "
                                                    f"{TOPICS[(index + turn) % len(TOPICS)]}?"})
        timing, text = await one_chat_request(client, messages, max_tokens)
        messages.append({"role": "assistant", "content": text})
        timings.append(timing)
    return timings


async def rewrite_request(client: openai.AsyncOpenAI, document: str, number: int, max_tokens: int) -> Timing:
    passage = paragraph(document, number)
    question = (f"Repeat the following paragraph exactly, word for word, but write 'guardian' instead of 'keeper' "
                f"wherever it occurs:\n\n{passage}")
    timing, _ = await one_chat_request(client, [{"role": "user", "content": question}], max_tokens, ignore_eos=False)
    return timing


async def run_clients(url: str, clients: int, requests: int, max_tokens: int, workload: str = "distinct",
                      shared: str = "", document: str = "") -> tuple[list[Timing], float]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)

    async def one_client(index: int) -> list[Timing]:
        if workload == "chat":
            return await chat_client(client, document, index, requests, max_tokens)
        if workload == "rewrite":
            return [await rewrite_request(client, document, index * requests + r, max_tokens)
                    for r in range(requests)]
        return [await one_request(client, prompt_for(workload, shared, index * requests + r), max_tokens)
                for r in range(requests)]

    start = time.perf_counter()
    results = await asyncio.gather(*(one_client(i) for i in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return [t for timings in results for t in timings], wall


def _ms(seconds: list[float], percentile: int) -> str:
    return f"{1000 * np.percentile(seconds, percentile):.0f}" if seconds else "-"


def summarize(clients: int, timings: list[Timing], wall: float) -> str:
    ttft = [t.chunks[0] - t.start for t in timings if t.chunks]
    itl = [b - a for t in timings for a, b in zip(t.chunks, t.chunks[1:])]
    tokens = sum(t.tokens for t in timings)
    return (f"| {clients} | {len(timings)} | {tokens} | {wall:.1f} | {tokens / wall:.2f} | {_ms(ttft, 50)} | "
            f"{_ms(ttft, 99)} | {_ms(itl, 50)} | {_ms(itl, 99)} |")


def per_turn(timings: list[Timing], turns: int) -> list[str]:
    """Markdown rows: by turn, the median time to first token and the median time of the whole turn."""
    rows = []
    for turn in range(turns):
        of_turn = [t for i, t in enumerate(timings) if i % turns == turn and t.chunks]
        rows.append(f"| {turn + 1} | {_ms([t.chunks[0] - t.start for t in of_turn], 50)} | "
                    f"{_ms([t.chunks[-1] - t.start for t in of_turn], 50)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m", help="package directory or model for llmc serve")
    parser.add_argument("--url", help="use this running server (its model name must be 'bench') instead")
    parser.add_argument("--clients", default="1,16", help="comma-separated client counts, one run each")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="TVM threads of the server it starts")
    parser.add_argument("--step-tokens", type=int, default=512, help="the server's token budget per step")
    parser.add_argument("--workload", choices=["distinct", "shared-prefix", "chat", "rewrite"], default="distinct")
    parser.add_argument("--turns", type=int, default=6, help="turns per conversation (--workload chat)")
    parser.add_argument("--speculate", help="start the server with --speculate (ngram[:K] or draft:PKG[:K])")
    parser.add_argument("--shared-chars", type=int, default=4000, help="length of the shared-prefix document")
    parser.add_argument("--no-prefix-cache", action="store_true", help="start the server with its prefix cache off")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    shared = DOCUMENT.read_text()[:args.shared_chars]
    document = DOCUMENT.read_text()
    process, url = (None, args.url) if args.url else start_server(args.model, max(counts), args.threads,
                                                                 args.step_tokens, not args.no_prefix_cache,
                                                                 args.speculate)
    requests = args.turns if args.workload == "chat" else args.requests
    try:
        asyncio.run(run_clients(url, 1, 1, 4))  # warm-up
        print("| clients | requests | generated tokens | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms | "
              "ITL p50 ms | ITL p99 ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        turns = {}
        for clients in counts:
            timings, wall = asyncio.run(run_clients(url, clients, requests, args.max_tokens, args.workload,
                                                    shared, document))
            print(summarize(clients, timings, wall), flush=True)
            turns[clients] = timings
        if args.workload == "chat":
            for clients, timings in turns.items():
                print(f"\n{clients} clients: | turn | TTFT p50 ms | turn p50 ms |\n|---|---|---|")
                print("\n".join(per_turn(timings, args.turns)))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
