"""Decode speed of several llmc packages in one process, alternating: for A/B checks of a kernel change.

Compile the same model before and after the change into two packages, then
`python benchmarks/compare_packages.py OLD NEW`. Each round runs every package once: a one-token
generation (prefill) and a 129-token one from the same 10-token prompt; decode tok/s is 128 tokens
over the difference. Medians over the rounds; the engines share the process and its threads, so
drift of the machine hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import llmc
from llmc.runtime.sampling import SamplingParams

PROMPT = list(range(200, 210))
NEW_TOKENS = 128


def decode_tokens_per_second(engine: Any) -> float:
    started = time.perf_counter()
    engine.generate(PROMPT, SamplingParams(max_tokens=1))
    prefilled = time.perf_counter()
    engine.generate(PROMPT, SamplingParams(max_tokens=NEW_TOKENS + 1, ignore_eos=True))
    finished = time.perf_counter()
    return NEW_TOKENS / ((finished - prefilled) - (prefilled - started))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    engines = {path: llmc.load(path) for path in args.packages}
    for engine in engines.values():
        engine.generate(PROMPT, SamplingParams(max_tokens=16))  # warm-up
    speeds: dict[str, list[float]] = {path: [] for path in engines}
    for _ in range(args.rounds):
        for path, engine in engines.items():
            speeds[path].append(decode_tokens_per_second(engine))
    for path, runs in speeds.items():
        print(f"{path}: decode {statistics.median(runs):.1f} tok/s (runs: {', '.join(f'{r:.0f}' for r in runs)})")


if __name__ == "__main__":
    main()
