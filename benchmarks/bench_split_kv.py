"""Split-KV decode attention against the same kernel with the split turned off, at 512 to 8k cached tokens.

    python benchmarks/bench_split_kv.py [--runs 15] [--calls 20]

The kernel is llmc's CPU decode attention (targets/cpu_kernels/attention.py) for one layer of SmolLM2-135M
(9 query heads sharing 3 key heads of 64, pages of 16), one sequence, built twice: with the compiler's
default split (targets/cpu.decode_splits(): 2 x cores) and with `max_splits=1`, where the 3 key heads are
the only work items, so at most 3 cores can help. Both run alternately on the same pages, for each KV-cache
storage format; a run times `--calls` calls, and the table gives medians of `--runs` runs, per call, and
the whole model's attention per token (30 layers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tvm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine  # noqa: E402

from llmc.ir.kv_storage import GROUP, STORAGES, KVStorage, geometry  # noqa: E402
from llmc.targets import get_target  # noqa: E402
from llmc.targets.cpu import decode_splits  # noqa: E402
from llmc.targets.cpu_kernels import attention  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE, LAYERS = 9, 3, 64, 16, 30
CONTEXTS = (512, 2048, 4096, 8192)


def build(storage: KVStorage, max_splits: int):
    kernel = attention.paged_decode(storage, KV_HEADS, Q_HEADS, HEAD_DIM, None, None, PAGE, max_splits)
    return tvm.tirx.build(tvm.IRModule({"main": kernel}), target=get_target("cpu").tvm_target())["main"]


def random_pages(storage: KVStorage, pages: int, rng: np.random.Generator) -> np.ndarray:
    """Pages of keys and values in `storage`'s layout: random codes and, for quantized rows, scales of 0.01."""
    shape = geometry(storage, Q_HEADS, KV_HEADS, HEAD_DIM)
    if storage.name in ("f32", "f16"):
        return rng.standard_normal((pages, 2, KV_HEADS, PAGE, shape.width)).astype(storage.container)
    rows = rng.integers(-128, 128, (pages, 2, KV_HEADS, PAGE, shape.width), dtype=np.int8)
    scales = rows.view(np.float16)
    first = storage.code_bytes(HEAD_DIM) // 2
    scales[..., first:first + HEAD_DIM // GROUP] = 0.01
    return rows


def inputs(storage: KVStorage, context: int, rng: np.random.Generator) -> list:
    shape = geometry(storage, Q_HEADS, KV_HEADS, HEAD_DIM)
    pages = -(-context // PAGE)
    queries = np.zeros((1, shape.q_heads, shape.width), shape.dtype)
    queries.view(np.float32).reshape(-1)[:Q_HEADS * HEAD_DIM] = rng.standard_normal(Q_HEADS * HEAD_DIM)
    arrays = (queries, random_pages(storage, pages, rng), np.array([0, pages], np.int32),
              rng.permutation(pages).astype(np.int32), np.array([context - (pages - 1) * PAGE], np.int32),
              np.zeros(1, np.int32), np.zeros(1, np.int32))
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    tensors.append(tvm.runtime.empty((1, shape.q_heads, shape.width), shape.dtype, tvm.cpu()))
    tensors.append(tvm.runtime.empty((1, shape.q_heads), "float32", tvm.cpu()))
    return tensors


def time_call(kernel, tensors: list, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        kernel(*tensors, 0, 1.0, 1e4, 0.125)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--storages", nargs="+", default=list(STORAGES), choices=list(STORAGES))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    splits = decode_splits()
    print(f"Machine: {describe_machine()}; decode attention of one SmolLM2-135M layer (9 query heads, 3 key "
          f"heads of 64), one sequence; median of {args.runs} runs of {args.calls} calls; split: at most "
          f"{splits} chunks\n")
    print("| KV cache | cached tokens | no split (us/call) | split (us/call) | speed-up | "
          f"attention per token, {LAYERS} layers (ms): no split -> split |")
    print("|---|---|---|---|---|---|")
    for name in args.storages:
        storage = STORAGES[name]
        whole, split = build(storage, 1), build(storage, splits)
        for context in CONTEXTS:
            tensors = inputs(storage, context, rng)
            times: dict[str, list[float]] = {"whole": [], "split": []}
            for _ in range(args.runs):
                times["whole"].append(time_call(whole, tensors, args.calls))
                times["split"].append(time_call(split, tensors, args.calls))
            a, b = statistics.median(times["whole"]), statistics.median(times["split"])
            print(f"| {name} | {context} | {a * 1e6:.0f} | {b * 1e6:.0f} | {a / b:.2f}x | "
                  f"{a * LAYERS * 1e3:.2f} -> {b * LAYERS * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
