"""`llmc bench`: llmc's own prefill and decode speed on a package, medians of repeated runs.

A run prefills a prompt in a fresh sequence (timed to the first logits), then decodes
greedily with end-of-sequence ignored (timed per token). The benchmark in benchmarks/
runs the same measurement next to llama.cpp and PyTorch.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llmc.runtime.model import CompiledModel


SHORT_PROMPT = "The capital of France is"
# 278 SmolLM2 tokens: the long prompt of the llama.cpp, PyTorch and ONNX Runtime baselines.
LONG_PROMPT = ("The history of Paris stretches back more than two thousand years. The city grew from a small settlement "
               "of the Parisii tribe on an island in the Seine into one of the largest and most influential cities in "
               "Europe, known for its art, science, food and politics. ") * 5 + "In summary, the capital of France is"


@dataclass(frozen=True)
class Timing:
    prompt_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    output_ids: list[int]


def time_generation(model: CompiledModel, prompt_ids: Sequence[int], new_tokens: int) -> Timing:
    cache = model.cache
    seq_id = cache.add_sequence()
    try:
        start = time.perf_counter()
        logits = None
        for begin in range(0, len(prompt_ids), cache.prefill_chunk):
            logits = model.step([seq_id], [list(prompt_ids[begin:begin + cache.prefill_chunk])])
        first = time.perf_counter()
        output = [int(np.argmax(logits[0]))]
        for _ in range(new_tokens - 1):
            logits = model.step([seq_id], [[output[-1]]])
            output.append(int(np.argmax(logits[0])))
        end = time.perf_counter()
    finally:
        cache.remove_sequence(seq_id)
    return Timing(len(prompt_ids), len(prompt_ids) / (first - start), (new_tokens - 1) / (end - first), output)


def bench(model: CompiledModel, prompts: dict[str, Sequence[int]], new_tokens: int = 128,
          runs: int = 3) -> dict[str, dict[str, float]]:
    """{prompt name: {prompt_tokens, prefill_tok_s, decode_tok_s}} as medians of `runs` after a warm-up."""
    results = {}
    for name, ids in prompts.items():
        time_generation(model, ids, min(new_tokens, 8))
        timings = [time_generation(model, ids, new_tokens) for _ in range(runs)]
        results[name] = {"prompt_tokens": len(ids),
                         "prefill_tok_s": statistics.median(t.prefill_tok_s for t in timings),
                         "decode_tok_s": statistics.median(t.decode_tok_s for t in timings)}
    return results
