"""Speculative decoding against plain decoding, single stream, in one process, alternating.

For each target package: the plain engine, prompt lookup (`ngram`), and with `--draft PKG` a draft
model, on two chat prompts: `rewrite` (a paragraph of benchmarks/data/perplexity.txt to repeat
with one word changed: the answer repeats the prompt) and `story` (an open-ended story: little to
look up). Decode speed is the tokens after the first over the time after the first (prefill is
the same for all), greedy, ending at the end-of-sequence token or `--max-tokens`; medians over
`--rounds` rounds, each running every engine once. The table says whether each speculative output
was token for token the plain one.

    python benchmarks/speculative.py /tmp/smol_q4 /tmp/smol_f32 --draft /tmp/smol_q4
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import llmc
from llmc.runtime.model import CacheSettings
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.speculation import Speculation

DOCUMENT = Path(__file__).resolve().parent / "data" / "perplexity.txt"


def prompts() -> dict[str, str]:
    text = DOCUMENT.read_text()
    start = text.find("The keeper")
    passage = text[start:text.rfind(". ", start, start + 700) + 1]
    return {"rewrite": "Repeat the following paragraph exactly, word for word, but write 'guardian' instead of "
                       f"'keeper' wherever it occurs:\n\n{passage}",
            "story": "Write a short story about a robot who learns to paint."}


def decode(engine: Any, prompt: str, max_tokens: int) -> tuple[float, list[int]]:
    """(decode tokens per second, output ids) of one greedy chat generation."""
    first: list[float] = []
    started = time.perf_counter()
    result = engine.generate(prompt, SamplingParams(max_tokens=max_tokens), chat=True,
                             on_text=lambda _: first.append(time.perf_counter()) if not first else None)
    finished = time.perf_counter()
    tokens = len(result.output_ids)
    return (tokens - 1) / (finished - (first[0] if first else started)), result.output_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+")
    parser.add_argument("--draft", help="a draft model package, tried with every other target")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    cache = CacheSettings(prefix_cache=False)
    methods = {"ngram": Speculation()}
    if args.draft:
        methods["draft"] = Speculation("draft", 4, args.draft)
    print("| target | prompt | method | plain tok/s | speculative tok/s | ratio | tokens | same output |")
    print("|---|---|---|---|---|---|---|---|")
    for package in args.packages:
        engines = {"plain": llmc.load(package, cache=cache)}
        engines.update({name: llmc.load(package, cache=cache, speculation=speculation)
                        for name, speculation in methods.items()
                        if not (name == "draft" and Path(args.draft).resolve() == Path(package).resolve())})
        for name, prompt in prompts().items():
            speeds: dict[str, list[float]] = {method: [] for method in engines}
            outputs: dict[str, list[int]] = {}
            for engine in engines.values():
                decode(engine, prompt, 16)  # warm-up, and a first measure of the step costs
            for _ in range(args.rounds):
                for method, engine in engines.items():
                    speed, outputs[method] = decode(engine, prompt, args.max_tokens)
                    speeds[method].append(speed)
            plain = statistics.median(speeds["plain"])
            for method in engines:
                if method == "plain":
                    continue
                fast = statistics.median(speeds[method])
                print(f"| {Path(package).name} | {name} | {method} | {plain:.1f} | {fast:.1f} | {fast / plain:.2f}x | "
                      f"{len(outputs['plain'])} | {'yes' if outputs[method] == outputs['plain'] else 'no'} |",
                      flush=True)


if __name__ == "__main__":
    main()
