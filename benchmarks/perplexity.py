"""Perplexity of SmolLM2-135M-Instruct on a fixed English text (data/perplexity.txt), for
llmc f32/q8/q4 next to transformers (f32) and llama.cpp (Q4_1 and f32), on the same tokens.

    python benchmarks/perplexity.py [--out benchmarks/out]

The packages and the f32 GGUF are the ones bench_cpu.py builds (it builds them if
missing). Every engine scores the whole text in one sequence: perplexity is
exp(mean negative log-likelihood of each token given all before it).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import MODEL, build_packages, f32_gguf  # noqa: E402
from machine import describe_machine  # noqa: E402

HERE = Path(__file__).resolve().parent


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    wide = logits[:-1].astype(np.float64)
    log_norm = np.log(np.exp(wide - wide.max(-1, keepdims=True)).sum(-1)) + wide.max(-1)
    chosen = wide[np.arange(len(ids) - 1), ids[1:]]
    return math.exp(float(np.mean(log_norm - chosen)))


def llmc_logits(package: str, ids: list[int]) -> np.ndarray:
    import llmc

    return llmc.load(package).forward(ids)


def llama_cpp_logits(gguf: str, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=2, n_threads_batch=2, n_ctx=2048, n_batch=512, logits_all=True,
                verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def torch_logits(ids: list[int]) -> np.ndarray:
    import torch

    from llmc.frontend.checkpoint import load_torch_model, resolve_model

    torch.set_num_threads(2)
    model = load_torch_model(resolve_model(MODEL))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def main() -> None:
    from llmc.frontend.checkpoint import resolve_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    packages = build_packages(args.out)
    import llmc

    text = (HERE / "data" / "perplexity.txt").read_text()
    ids = llmc.load(packages["f32"]["path"]).encode(text)
    results = {"transformers f32": perplexity(torch_logits(ids), ids)}
    for fmt, info in packages.items():
        results[f"llmc {fmt}"] = perplexity(llmc_logits(info["path"], ids), ids)
    results["llama.cpp Q4_1"] = perplexity(llama_cpp_logits(str(resolve_model(MODEL).path), ids), ids)
    results["llama.cpp f32"] = perplexity(llama_cpp_logits(f32_gguf(args.out), ids), ids)
    reference, q4_peer = results["transformers f32"], results["llama.cpp Q4_1"]
    lines = [f"machine: {describe_machine()}; text: benchmarks/data/perplexity.txt, {len(ids)} tokens", "",
             "| engine | perplexity | vs transformers f32 | vs llama.cpp Q4_1 |", "|---|---|---|---|"]
    for name, value in results.items():
        lines.append(f"| {name} | {value:.4f} | {100 * (value / reference - 1):+.3f}% | "
                     f"{100 * (value / q4_peer - 1):+.3f}% |")
    text = "\n".join(lines)
    print(text)
    (args.out / "perplexity.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
