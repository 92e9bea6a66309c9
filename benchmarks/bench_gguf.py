"""GGUF files as they come: llmc (`--quant auto`, each tensor in the file's own format) against
llama.cpp on the very same files, SmolLM2-135M-Instruct in Q4_1 (the bundled file) and, re-encoded
by llama.cpp's quantizer, Q4_K_M, Q6_K, Q8_0 and F16. 2 threads, short and 278-token prompts.

    python benchmarks/bench_gguf.py [--runs 3] [--new-tokens 128] [--out benchmarks/out]

Speed: one worker process per engine and file, timed in rounds that alternate between them,
medians (bench_cpu.py's method). Perplexity on benchmarks/data/perplexity.txt, each engine scoring
the whole text in one sequence (perplexity.py's method). Prints a table with llmc's ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import Worker, compiled, time_rounds  # noqa: E402
from gguf_variants import MODEL, requantized_gguf  # noqa: E402
from machine import describe_machine  # noqa: E402
from perplexity import llama_cpp_logits, llmc_logits, perplexity  # noqa: E402

HERE = Path(__file__).resolve().parent
FILE_TYPES = ("Q4_1", "Q4_K_M", "Q6_K", "Q8_0", "F16")


def gguf_file(file_type: str, out: Path) -> Path:
    from llmc.frontend.checkpoint import resolve_model

    return resolve_model(MODEL).path if file_type == "Q4_1" else requantized_gguf(file_type, out)


def main() -> None:
    from llmc.bench import LONG_PROMPT, SHORT_PROMPT

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = {t: gguf_file(t, args.out) for t in FILE_TYPES}
    packages = {t: compiled(str(path), args.out / f"auto-{path.stem}", []) for t, path in files.items()}
    engines = {}
    for t in FILE_TYPES:
        engines[("llmc", t)] = ("llmc", packages[t]["path"])
        engines[("llama.cpp", t)] = ("llama.cpp", str(files[t]))
    workers = {key: Worker(f"{key[0]} {key[1]}", kind, where) for key, (kind, where) in engines.items()}
    prompts = {"short": SHORT_PROMPT, "long": LONG_PROMPT}
    for worker in workers.values():
        worker.run(SHORT_PROMPT, 8)
    samples = time_rounds(workers, prompts, args.runs, args.new_tokens)
    for worker in workers.values():
        worker.close()
    med = {key: {k: statistics.median(s[k] for s in runs) for k in ("prefill", "decode")}
           for key, runs in samples.items()}
    import llmc

    ids = llmc.load(packages["Q4_1"]["path"]).encode((HERE / "data" / "perplexity.txt").read_text())
    ppl = {t: (perplexity(llmc_logits(packages[t]["path"], ids), ids),
               perplexity(llama_cpp_logits(str(files[t]), ids), ids)) for t in FILE_TYPES}
    lines = [f"machine: {describe_machine()}; 2 threads; {args.new_tokens} new tokens; medians of {args.runs} runs; "
             f"perplexity on benchmarks/data/perplexity.txt ({len(ids)} tokens)", "",
             "| file | prompt | llmc prefill | llama.cpp prefill | ratio | llmc decode | llama.cpp decode | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for t in FILE_TYPES:
        for p in prompts:
            ours, theirs = med[(("llmc", t), p)], med[(("llama.cpp", t), p)]
            lines.append(f"| {t} | {p} | {ours['prefill']:.1f} | {theirs['prefill']:.1f} | "
                         f"{ours['prefill'] / theirs['prefill']:.2f}x | {ours['decode']:.2f} | {theirs['decode']:.2f} | "
                         f"{ours['decode'] / theirs['decode']:.2f}x |")
    lines += ["", "| file | llmc perplexity | llama.cpp perplexity | difference | llmc compile s (peak MB) |",
              "|---|---|---|---|---|"]
    for t in FILE_TYPES:
        ours, theirs = ppl[t]
        lines.append(f"| {t} | {ours:.4f} | {theirs:.4f} | {100 * (ours / theirs - 1):+.3f}% | "
                     f"{packages[t]['compile_s']:.0f} ({packages[t]['compile_peak_mb']:.0f}) |")
    text = "\n".join(lines)
    print("\n" + text)
    (args.out / "bench_gguf.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
