"""CPU benchmark: llmc (f32, q8, q4) against llama.cpp (Q4_1, f32) and PyTorch eager (f32) on
SmolLM2-135M-Instruct, 2 threads, short and 278-token prompts, 128 new tokens.

    python benchmarks/bench_cpu.py [--runs 3] [--new-tokens 128] [--out benchmarks/out]

It builds what it needs (llmc packages, timing each compile and its peak memory; an f32
GGUF made from the bundled Q4_1 one with llama.cpp's own quantizer), starts one worker
process per engine, then times the engines in rounds, alternating between them, and
prints a table of medians with llmc's ratio to each peer. Runs during which other
processes used more than a fifth of a core are repeated (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_variants import requantized_gguf  # noqa: E402
from machine import Meter, describe_machine, wait_quiet  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"


def compiled(model: str, path: Path, options: list[str]) -> dict:
    """`llmc compile MODEL -o PATH OPTIONS`, timed with its peak memory: {path, compile_s, compile_peak_mb};
    a package built earlier is reused if this llmc still reads it."""
    from llmc.runtime.package import Package, PackageError

    record = path / "bench-compile.json"
    try:
        Package.open(path)
    except PackageError:
        record.unlink(missing_ok=True)
    if not record.is_file():
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "llmc.cli", "compile", model,
                               *options, "-o", str(path)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"compiling {model} {' '.join(options)} failed:\n{proc.stderr[-2000:]}")
        peak = next(int(l.split()[-1]) for l in proc.stderr.splitlines() if "Maximum resident" in l) / 1024
        record.write_text(json.dumps({"compile_s": time.perf_counter() - start, "compile_peak_mb": peak}))
    return {"path": str(path), **json.loads(record.read_text())}


def build_packages(out: Path, formats: tuple[str, ...] = ("f32", "q8", "q4")) -> dict[str, dict]:
    """llmc packages of SmolLM2 for each weight format: {format: {path, compile_s, compile_peak_mb}}."""
    return {fmt: compiled(MODEL, out / f"smollm2-{fmt}", ["--quant", fmt]) for fmt in formats}


def f32_gguf(out: Path) -> str:
    """The bundled Q4_1 GGUF re-encoded as f32 by llama.cpp (its dequantized weights, as transformers loads them)."""
    return str(requantized_gguf("F32", out))


class Worker:
    """One engine in its own process, driven over stdin/stdout (see worker.py)."""

    def __init__(self, name: str, kind: str, where: str):
        self.name = name
        env = {**os.environ, "TVM_NUM_THREADS": "2", "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "worker.py"), kind, where], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.ready = json.loads(self.proc.stdout.readline())

    def run(self, prompt: str, new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def peak_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM")) / 1024

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def time_rounds(workers: dict, prompts: dict[str, str], runs: int, new_tokens: int) -> dict[tuple, list[dict]]:
    """Each (worker key, prompt name) -> its runs' results, in rounds that alternate between the workers; a run
    during which other processes used more than a fifth of a core is repeated (the machine is shared)."""
    samples: dict[tuple, list[dict]] = {(key, p): [] for key in workers for p in prompts}
    for round_ in range(runs):
        for prompt_name, prompt in prompts.items():
            for key, worker in workers.items():
                for _ in range(5):
                    wait_quiet()
                    with Meter() as meter:
                        result = worker.run(prompt, new_tokens)
                    if meter.others < 0.2:
                        break
                samples[(key, prompt_name)].append({**result, "others": meter.others})
                print(f"round {round_ + 1} {prompt_name:5s} {worker.name:18s} prefill {result['prefill']:8.1f} "
                      f"decode {result['decode']:7.2f} tok/s (others {meter.others:.2f} cores)", flush=True)
    return samples


def main() -> None:
    from llmc.bench import LONG_PROMPT, SHORT_PROMPT

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from llmc.frontend.checkpoint import resolve_model

    packages = build_packages(args.out)
    engines = {f"llmc {fmt}": ("llmc", info["path"]) for fmt, info in packages.items()}
    engines["llama.cpp Q4_1"] = ("llama.cpp", str(resolve_model(MODEL).path))
    engines["llama.cpp f32"] = ("llama.cpp", f32_gguf(args.out))
    engines["pytorch f32"] = ("pytorch", MODEL)
    workers = {name: Worker(name, kind, where) for name, (kind, where) in engines.items()}
    prompts = {"short": SHORT_PROMPT, "long": LONG_PROMPT}
    for worker in workers.values():
        for prompt in prompts.values():
            worker.run(prompt, 8)
    samples = time_rounds(workers, prompts, args.runs, args.new_tokens)
    peaks = {name: worker.peak_mb() for name, worker in workers.items()}
    for worker in workers.values():
        worker.close()
    report(samples, peaks, packages, prompts, args)


def report(samples, peaks, packages, prompts, args) -> None:
    med = {key: {k: statistics.median(s[k] for s in runs) for k in ("prefill", "decode")}
           for key, runs in samples.items()}
    lines = [f"machine: {describe_machine()}; 2 threads; {args.new_tokens} new tokens; medians of {args.runs} runs",
             "", "| engine | prompt | tokens | prefill tok/s | decode tok/s | peak RSS MB | compile s (peak MB) |",
             "|---|---|---|---|---|---|---|"]
    for (name, prompt), row in med.items():
        fmt = name.split()[-1]
        compile_info = (f"{packages[fmt]['compile_s']:.0f} ({packages[fmt]['compile_peak_mb']:.0f})"
                        if name.startswith("llmc") else "-")
        tokens = samples[(name, prompt)][0]["prompt_tokens"]
        lines.append(f"| {name} | {prompt} | {tokens} | {row['prefill']:.1f} | {row['decode']:.2f} | "
                     f"{peaks[name]:.0f} | {compile_info} |")
    lines += ["", "| ratio | prompt | prefill | decode |", "|---|---|---|---|"]
    pairs = [("llmc q4", "llama.cpp Q4_1"), ("llmc f32", "llama.cpp f32"), ("llmc f32", "pytorch f32"),
             ("llmc q8", "llama.cpp Q4_1")]
    for ours, peer in pairs:
        for prompt in prompts:
            a, b = med[(ours, prompt)], med[(peer, prompt)]
            lines.append(f"| {ours} / {peer} | {prompt} | {a['prefill'] / b['prefill']:.2f}x | "
                         f"{a['decode'] / b['decode']:.2f}x |")
    text = "\n".join(lines)
    print("\n" + text)
    (args.out / "bench_cpu.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
