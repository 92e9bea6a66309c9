"""Long contexts: decode speed with the KV cache already at 512 to 8k tokens, the 8k prefill, and perplexity
with each KV-cache precision; llmc (f32, f16, q8, q4 caches) next to llama.cpp (f16, q8_0, q4_0 caches, flash
attention on), on SmolLM2-135M-Instruct's own Q4_1 GGUF and the same tokens.

    python benchmarks/bench_long.py [--out benchmarks/out] [--runs 3] [--skip-perplexity]

Each engine runs in a process of its own, in the order llmc f32, llmc f16, llama.cpp f16, llmc q8, llama.cpp
q8_0, llmc q4, llama.cpp q4_0 (matching precisions side by side). A process prefills
benchmarks/data/long_text.txt (the GPL-3 and GPL-2 texts) up to each context in turn, in chunks of 512, and at
each one times the `--decode` single-token steps that end there (the cache holds the context less those
tokens, then fills to it), `--runs` times, rolling the cache back after each, and reports the median.
Perplexity scores the first 4,096 tokens of the same text in one sequence.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine, wait_quiet  # noqa: E402

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "long_text.txt"
CONTEXTS = (512, 2048, 4096, 8192)
PERPLEXITY_TOKENS = 4096
CHUNK = 512
THREADS = 2
LLMC_CACHES = ("f32", "f16", "q8", "q4")
LLAMA_CACHES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}
# Bytes per value of llama.cpp's cache types (a q8_0 block: 32 codes and an f16 scale; q4_0: 16 bytes and one).
LLAMA_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
ORDER = (("llmc", "f32"), ("llmc", "f16"), ("llama.cpp", "f16"), ("llmc", "q8"), ("llama.cpp", "q8_0"),
         ("llmc", "q4"), ("llama.cpp", "q4_0"))


def package(out: Path, cache: str) -> Path:
    """SmolLM2 as `llmc compile smollm2-135m --kv-cache CACHE` writes it (built once into `out`)."""
    path = out / f"smollm2-kv-{cache}"
    if not (path / "llmc.json").is_file():
        subprocess.run(["llmc", "compile", "smollm2-135m", "-o", str(path), "--kv-cache", cache], check=True)
    return path


class LlmcSide:
    def __init__(self, where: str, context: int):
        import llmc
        from llmc.runtime.model import CacheSettings

        self.engine = llmc.load(where, cache=CacheSettings(max_total_tokens=context, prefill_chunk=CHUNK,
                                                            prefix_cache=False))
        self.model = self.engine.model
        self.seq = self.model.cache.add_sequence()

    def tokenize(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def append(self, ids: list[int]) -> None:
        for start in range(0, len(ids), CHUNK):
            self.model.step([self.seq], [ids[start:start + CHUNK]])

    def decode(self, ids: list[int]) -> None:
        for token in ids:
            self.model.step([self.seq], [[token]])

    def rollback(self, count: int) -> None:
        self.model.cache.truncate(self.seq, self.model.cache.lengths[self.seq] - count)

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model.score(ids)


class LlamaCppSide:
    def __init__(self, gguf: str, cache: str, context: int, all_logits: bool = False):
        import llama_cpp

        kind = getattr(llama_cpp, LLAMA_CACHES[cache])
        self.llm = llama_cpp.Llama(model_path=gguf, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=context,
                                   n_batch=CHUNK, flash_attn=True, type_k=kind, type_v=kind, logits_all=all_logits,
                                   verbose=False)

    def append(self, ids: list[int]) -> None:
        self.llm.eval(ids)

    def decode(self, ids: list[int]) -> None:
        for token in ids:
            self.llm.eval([token])

    def rollback(self, count: int) -> None:
        self.llm.n_tokens -= count

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)])


def _side(engine: str, cache: str, context: int, all_logits: bool = False):
    if engine == "llmc":
        return LlmcSide(str(package(Path(_ARGS.out), cache)), context)
    from llmc.frontend.checkpoint import resolve_model

    return LlamaCppSide(str(resolve_model("smollm2-135m").path), cache, context, all_logits)


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    wide = logits[:-1].astype(np.float64)
    log_norm = np.log(np.exp(wide - wide.max(-1, keepdims=True)).sum(-1)) + wide.max(-1)
    chosen = wide[np.arange(len(ids) - 1), ids[1:]]
    return math.exp(float(np.mean(log_norm - chosen)))


def worker(engine: str, cache: str, ids: list[int], runs: int, decode: int, contexts: list[int],
           score: bool) -> dict:
    """Run in a process of its own: decode tok/s at each context, the prefill time, and the perplexity."""
    if score:
        side = _side(engine, cache, PERPLEXITY_TOKENS, all_logits=True)
        return {"perplexity": perplexity(side.logits(ids[:PERPLEXITY_TOKENS]), ids[:PERPLEXITY_TOKENS])}
    side = _side(engine, cache, max(contexts))
    result, done, prefill_s = {"decode": {}}, 0, 0.0
    for context in contexts:
        start = time.perf_counter()
        side.append(ids[done:context - decode])
        prefill_s += time.perf_counter() - start
        done = context - decode
        rates = []
        for _ in range(runs):
            start = time.perf_counter()
            side.decode(ids[done:context])
            rates.append(decode / (time.perf_counter() - start))
            side.rollback(decode)
        result["decode"][str(context)] = statistics.median(rates)
    result["prefill_tok_s"] = done / prefill_s
    return result


def run_worker(engine: str, cache: str, args: argparse.Namespace, score: bool) -> dict:
    command = [sys.executable, __file__, "--worker", engine, cache, "--out", args.out, "--runs", str(args.runs),
               "--decode", str(args.decode), "--contexts", *map(str, args.contexts)] + (["--score"] if score else [])
    wait_quiet()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {engine} {cache} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bytes_per_token(engine: str, cache: str) -> float:
    layers, kv_heads, head_dim = 30, 3, 64
    if engine == "llmc":
        metadata = json.loads((package(Path(_ARGS.out), cache) / "llmc.json").read_text())
        return metadata["kv_cache"]["bytes_per_token"]
    return 2 * layers * kv_heads * head_dim * LLAMA_BYTES[cache]


def report(results: dict, args: argparse.Namespace) -> str:
    lines = [f"Machine: {describe_machine()}; {THREADS} threads; SmolLM2-135M-Instruct Q4_1 GGUF (llmc: `llmc compile "
             f"smollm2-135m --kv-cache X`); decode: median of {args.runs} runs of {args.decode} tokens at each context",
             "", "| engine | KV cache | bytes/token | " + " | ".join(f"decode tok/s @{c}" for c in args.contexts)
             + f" | prefill tok/s ({max(args.contexts)}) | perplexity ({PERPLEXITY_TOKENS}) |",
             "|---" * (5 + len(args.contexts)) + "|"]
    f32_bytes = bytes_per_token("llmc", "f32")
    for engine, cache in ORDER:
        entry = results.get(f"{engine} {cache}")
        if entry is None:
            continue
        per_token = bytes_per_token(engine, cache)
        rates = " | ".join(f"{entry['decode'][str(c)]:.1f}" for c in args.contexts)
        score = f"{entry['perplexity']:.4f}" if "perplexity" in entry else "-"
        lines.append(f"| {engine} | {cache} | {per_token:,.0f} ({per_token / f32_bytes:.3f}x f32) | {rates} | "
                     f"{entry['prefill_tok_s']:.0f} | {score} |")
    lines += ["", "| llmc / llama.cpp | " + " | ".join(f"decode @{c}" for c in args.contexts) + " |",
              "|---" * (1 + len(args.contexts)) + "|"]
    for mine, theirs in (("f16", "f16"), ("q8", "q8_0"), ("q4", "q4_0")):
        a, b = results.get(f"llmc {mine}"), results.get(f"llama.cpp {theirs}")
        if a and b:
            lines.append(f"| {mine} vs {theirs} | " + " | ".join(
                f"{a['decode'][str(c)] / b['decode'][str(c)]:.2f}x" for c in args.contexts) + " |")
    return "\n".join(lines)


def main() -> None:
    global _ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--skip-perplexity", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "CACHE"))
    parser.add_argument("--score", action="store_true")
    args = _ARGS = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    ids = _text_ids()
    if args.worker:
        engine, cache = args.worker
        print(json.dumps(worker(engine, cache, ids, args.runs, args.decode, args.contexts, args.score)))
        return
    for engine, cache in ORDER:
        if engine == "llmc":
            package(Path(args.out), cache)
    results = {}
    for engine, cache in ORDER:
        results[f"{engine} {cache}"] = run_worker(engine, cache, args, score=False)
        print(engine, cache, results[f"{engine} {cache}"], flush=True)
    if not args.skip_perplexity:
        for engine, cache in ORDER:
            results[f"{engine} {cache}"].update(run_worker(engine, cache, args, score=True))
            print(engine, cache, "perplexity", results[f"{engine} {cache}"]["perplexity"], flush=True)
    text = report(results, args)
    (Path(args.out) / "bench_long.md").write_text(text + "\n")
    print(text)


def _text_ids() -> list[int]:
    """The long text as SmolLM2's tokenizer splits it (llmc's tokenizer; llama.cpp is given the same ids)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(package(Path(_ARGS.out), "f32") / "tokenizer.json"))
    return tokenizer.encode(TEXT.read_text(), add_special_tokens=False).ids


_ARGS: argparse.Namespace


if __name__ == "__main__":
    main()
