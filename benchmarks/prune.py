"""What pruning trades: perplexity against decode and prefill speed and weights size, for SmolLM2-135M-Instruct
pruned by layers, MLP channels and KV groups of heads, in f32 and q4, with llama.cpp's unpruned Q4_1 beside.

    python benchmarks/prune.py [--runs 3] [--new-tokens 64] [--out benchmarks/out]

Each setting is compiled once (`llmc compile smollm2-135m --quant Q --prune P`, importance measured on the
calibration text shipped with llmc, which is not the text scored here). Perplexity is scored on
benchmarks/data/perplexity.txt in one sequence; speed is the median of `--runs` rounds that alternate
between all engines (bench_cpu.py's workers, 2 threads each): prefill of bench.py's 278-token prompt and
greedy decode of `--new-tokens` tokens after it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import MODEL, Worker, compiled, time_rounds  # noqa: E402
from machine import describe_machine  # noqa: E402
from perplexity import llama_cpp_logits, llmc_logits, perplexity  # noqa: E402

HERE = Path(__file__).resolve().parent
# SmolLM2 has 30 layers, 1,536 MLP channels and 3 KV groups: 10/20/30% of layers are 3/6/9, of channels
# 160/320/448 (whole groups of 32), and the only whole share of KV groups is one of three.
SETTINGS = {"unpruned": None, "layers 10%": "layers=3", "layers 20%": "layers=6", "layers 30%": "layers=9",
            "mlp 10%": "mlp=0.1", "mlp 20%": "mlp=0.2", "mlp 30%": "mlp=0.3", "heads 33%": "heads=1"}
FORMATS = ("f32", "q4")


def weights_mb(package: str) -> float:
    from llmc.runtime.package import WEIGHTS_FILE

    return (Path(package) / WEIGHTS_FILE).stat().st_size / 1e6


def main() -> None:
    from llmc.bench import LONG_PROMPT
    from llmc.frontend.checkpoint import resolve_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    packages = {}
    for fmt in FORMATS:
        for setting, prune in SETTINGS.items():
            name = f"smollm2-{fmt}-" + (prune or "unpruned").replace("=", "")
            options = ["--quant", fmt] + (["--prune", prune] if prune else [])
            packages[(setting, fmt)] = compiled(MODEL, args.out / name, options)["path"]
            print(f"compiled {setting} {fmt}", flush=True)
    gguf = str(resolve_model(MODEL).path)

    import llmc

    text = (HERE / "data" / "perplexity.txt").read_text()
    ids = llmc.load(packages[("unpruned", "f32")]).encode(text)
    scores = {key: perplexity(llmc_logits(path, ids), ids) for key, path in packages.items()}
    scores[("llama.cpp", "Q4_1")] = perplexity(llama_cpp_logits(gguf, ids), ids)

    engines = {key: ("llmc", path) for key, path in packages.items()}
    engines[("llama.cpp", "Q4_1")] = ("llama.cpp", gguf)
    workers = {key: Worker(" ".join(key), kind, where) for key, (kind, where) in engines.items()}
    prompts = {"long": LONG_PROMPT}
    for worker in workers.values():
        worker.run(LONG_PROMPT, 8)
    samples = time_rounds(workers, prompts, args.runs, args.new_tokens)
    for worker in workers.values():
        worker.close()

    sizes = {key: weights_mb(path) for key, path in packages.items()}
    sizes[("llama.cpp", "Q4_1")] = Path(gguf).stat().st_size / 1e6
    lines = [f"machine: {describe_machine()}; perplexity on benchmarks/data/perplexity.txt ({len(ids)} tokens); "
             f"prefill of a {samples[(next(iter(workers)), 'long')][0]['prompt_tokens']}-token prompt, decode of "
             f"{args.new_tokens} tokens, medians of {args.runs} alternating rounds, 2 threads", "",
             "| setting | weights | perplexity | vs unpruned | decode tok/s | vs unpruned | prefill tok/s | vs unpruned "
             "| weights MB |", "|---|---|---|---|---|---|---|---|---|"]
    for key in engines:
        setting, fmt = key
        base = ("unpruned", fmt) if fmt in FORMATS else key
        decode = statistics.median(s["decode"] for s in samples[(key, "long")])
        prefill = statistics.median(s["prefill"] for s in samples[(key, "long")])
        base_decode = statistics.median(s["decode"] for s in samples[(base, "long")])
        base_prefill = statistics.median(s["prefill"] for s in samples[(base, "long")])
        lines.append(f"| {setting} | {fmt} | {scores[key]:.3f} | {100 * (scores[key] / scores[base] - 1):+.1f}% | "
                     f"{decode:.1f} | {decode / base_decode:.2f}x | {prefill:.0f} | {prefill / base_prefill:.2f}x | "
                     f"{sizes[key]:.0f} |")
    report = "\n".join(lines)
    print(report)
    (args.out / "prune.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
