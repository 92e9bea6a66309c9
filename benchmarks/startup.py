"""Start-up benchmark: `llmc run PACKAGE "What is 2+2?"` as a whole process, beside llama.cpp doing
the same work in one process (benchmarks/llamacpp_chat.py: import, load the GGUF, the same chat
prompt, greedy, streamed) on SmolLM2-135M-Instruct.

    python benchmarks/startup.py [--runs 5] [--out benchmarks/out]

Engines: llmc's q4 and f32 packages run by the full install's `llmc`, the q4 package run by
the runtime-only environment's `llmc` (benchmarks/runtime_env.py), llama.cpp on the bundled
Q4_1 GGUF and on an f32 GGUF made from it. Each process is timed from its start to the first
byte of the answer on stdout (time to first token) and to its exit, with its peak RSS. The
engines alternate within each round; one warm-up round puts the files in the page cache, and
the table gives medians of --runs rounds, llmc's ratios to llama.cpp, and the runtime-only
environment's size on disk. Runs during which other processes used more than a fifth of a
core are repeated (the machine is shared).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import MODEL, build_packages, f32_gguf  # noqa: E402
from machine import Meter, describe_machine, wait_quiet  # noqa: E402
from runtime_env import build_runtime_env, size_on_disk_mib  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPT = "What is 2+2?"
RATIOS = [("llmc q4", "llama.cpp Q4_1"), ("llmc q4 (runtime-only)", "llama.cpp Q4_1"), ("llmc f32", "llama.cpp f32")]


def timed_process(command: list[str], peak_file: Path) -> dict:
    """Wall time to the first byte on stdout and to exit, peak RSS, and what the process printed.
    GNU time reports the peak: a child forked from this process would count this process's own
    memory in its peak (Linux keeps the larger of the two across exec)."""
    start = time.perf_counter()
    process = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(peak_file), *command], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd="/")
    first = process.stdout.read(1)
    first_byte_s = time.perf_counter() - start
    rest = process.stdout.read()
    errors = process.stderr.read()
    if process.wait():
        raise SystemExit(f"{' '.join(command)} failed:\n{errors.decode()[-2000:]}")
    wall_s = time.perf_counter() - start
    return {"wall_s": wall_s, "first_token_s": first_byte_s, "peak_rss_mb": int(peak_file.read_text()) / 1024,
            "text": (first + rest).decode().strip()}


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    from llmc.frontend.checkpoint import resolve_model

    packages = build_packages(args.out, ("q4", "f32"))
    llmc = str(Path(sys.executable).parent / "llmc")  # the script itself, not a shim in front of it
    shutil.rmtree(args.out / "runtime-env", ignore_errors=True)  # built anew from this checkout
    runtime_llmc = str(build_runtime_env(args.out / "runtime-env").parent / "llmc")
    llama = [sys.executable, str(HERE / "llamacpp_chat.py")]
    return {
        "llmc q4": [llmc, "run", packages["q4"]["path"], PROMPT],
        "llmc q4 (runtime-only)": [runtime_llmc, "run", packages["q4"]["path"], PROMPT],
        "llmc f32": [llmc, "run", packages["f32"]["path"], PROMPT],
        "llama.cpp Q4_1": llama + [str(resolve_model(MODEL).path), PROMPT],
        "llama.cpp f32": llama + [f32_gguf(args.out), PROMPT],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    args.out = args.out.resolve()  # the engines run from /, away from the checkout
    args.out.mkdir(parents=True, exist_ok=True)
    engines = commands(args)
    samples: dict[str, list[dict]] = {name: [] for name in engines}
    for round_ in range(args.runs + 1):
        for name, command in engines.items():
            for _ in range(5):
                wait_quiet()
                with Meter() as meter:
                    result = timed_process(command, args.out / "startup-peak.txt")
                if meter.others < 0.2:
                    break
            if round_ == 0:
                continue  # warm-up: the page cache
            samples[name].append(result)
            print(f"round {round_} {name:24s} wall {result['wall_s']:.3f} s, first token {result['first_token_s']:.3f} s,"
                  f" peak RSS {result['peak_rss_mb']:.0f} MB (others {meter.others:.2f} cores)", flush=True)
    report(samples, size_on_disk_mib(args.out / "runtime-env"), args)


def report(samples: dict[str, list[dict]], env_mib: float, args: argparse.Namespace) -> None:
    med = {name: {key: statistics.median(s[key] for s in runs) for key in ("wall_s", "first_token_s", "peak_rss_mb")}
           for name, runs in samples.items()}
    answers = {name: runs[0]["text"] for name, runs in samples.items()}
    lines = [f"machine: {describe_machine()}; 2 threads; prompt {PROMPT!r} in the chat template, greedy, until EOS; "
             f"medians of {args.runs} runs after a warm-up round", "",
             "| engine | whole process s | first token s | peak RSS MB | answer |", "|---|---|---|---|---|"]
    for name, row in med.items():
        lines.append(f"| {name} | {row['wall_s']:.3f} | {row['first_token_s']:.3f} | {row['peak_rss_mb']:.0f} | "
                     f"{answers[name]!r} |")
    lines += ["", "| ratio | whole process | first token | peak RSS |", "|---|---|---|---|"]
    for ours, peer in RATIOS:
        a, b = med[ours], med[peer]
        lines.append(f"| {ours} / {peer} | {a['wall_s'] / b['wall_s']:.2f}x | "
                     f"{a['first_token_s'] / b['first_token_s']:.2f}x | {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x |")
    lines += ["", f"runtime-only environment (benchmarks/runtime_env.py): {env_mib:.0f} MiB on disk"]
    text = "\n".join(lines)
    print("\n" + text)
    (args.out / "startup.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
