"""Load test of `llmc serve`: concurrent streaming clients, with the official `openai` client.

Starts `llmc serve MODEL` on a free loopback port (or uses `--url`), then for each client
count runs that many clients at once, each sending `--requests` streaming completions in
turn (`--max-tokens` tokens each, end-of-sequence ignored so every request is the same
length). Prints generated tokens per second, time to first token and inter-token latency
(p50, p99) per client count, as a Markdown table.

Workloads (`--workload`): `distinct`, a short prompt of its own per request (nothing to share);
`shared-prefix`, one long document (the first `--shared-chars` characters of
benchmarks/data/perplexity.txt, about 1,000 tokens) followed by each request's own question,
as clients that share a system prompt. `--no-prefix-cache` starts the server without it.

    python benchmarks/serve_load.py /tmp/smol_pkg --clients 1,4,16 --threads 2
    python benchmarks/serve_load.py /tmp/smol_pkg --workload shared-prefix --clients 16 [--no-prefix-cache]
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


def start_server(model: str, max_batch: int, threads: int, step_tokens: int,
                 prefix_cache: bool) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    process = subprocess.Popen([sys.executable, "-m", "llmc.cli", "serve", model, "--host", "127.0.0.1",
                                "--port", str(port), "--model-name", MODEL_NAME, "--max-batch", str(max_batch),
                                "--step-tokens", str(step_tokens), "--threads", str(threads),
                                *([] if prefix_cache else ["--no-prefix-cache"])],
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


def prompt_for(workload: str, shared: str, number: int) -> str:
    topic = TOPICS[number % len(TOPICS)]
    if workload == "shared-prefix":
        return f"{shared}\n\nQuestion {number}: what does the text above say about {topic}?\nAnswer:"
    return f"Here is a short story about {topic}:"


async def run_clients(url: str, clients: int, requests: int, max_tokens: int, workload: str = "distinct",
                      shared: str = "") -> tuple[list[Timing], float]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)

    async def one_client(index: int) -> list[Timing]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m", help="package directory or model for llmc serve")
    parser.add_argument("--url", help="use this running server (its model name must be 'bench') instead")
    parser.add_argument("--clients", default="1,16", help="comma-separated client counts, one run each")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="TVM threads of the server it starts")
    parser.add_argument("--step-tokens", type=int, default=512, help="the server's token budget per step")
    parser.add_argument("--workload", choices=["distinct", "shared-prefix"], default="distinct")
    parser.add_argument("--shared-chars", type=int, default=4000, help="length of the shared-prefix document")
    parser.add_argument("--no-prefix-cache", action="store_true", help="start the server with its prefix cache off")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    shared = DOCUMENT.read_text()[:args.shared_chars]
    process, url = (None, args.url) if args.url else start_server(args.model, max(counts), args.threads,
                                                                 args.step_tokens, not args.no_prefix_cache)
    try:
        asyncio.run(run_clients(url, 1, 1, 4))  # warm-up
        print("| clients | requests | generated tokens | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms | "
              "ITL p50 ms | ITL p99 ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        for clients in counts:
            timings, wall = asyncio.run(run_clients(url, clients, args.requests, args.max_tokens, args.workload,
                                                    shared))
            print(summarize(clients, timings, wall), flush=True)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
