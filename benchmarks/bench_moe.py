"""Mixture-of-experts decode against dense models of the same active and total size.

    python benchmarks/bench_moe.py [--runs 5] [--tokens 64]

Three random-weight models of one shape (hidden 512, 4 layers, 8 heads, vocabulary 4096), compiled by llmc for
the CPU in f32:
- `moe`: Mixtral, 8 experts of intermediate 1408, 2 chosen per token;
- `dense, active size`: Mistral with intermediate 2 x 1408, the weights one MoE token reads;
- `dense, total size`: Mistral with intermediate 8 x 1408, the weights of all experts.
If decode reads only the chosen experts, `moe` runs near `dense, active size` and well ahead of `dense, total
size`. Each run prefills a 32-token prompt and decodes `--tokens` tokens greedily; the engines alternate, and the
table gives medians of `--runs` runs. PyTorch (transformers' eager Mixtral, its default experts implementation)
decodes the same MoE model as the peer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine  # noqa: E402

import llmc  # noqa: E402
from llmc.bench import time_generation  # noqa: E402
from llmc.compiler import compile_model  # noqa: E402

SHAPE = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             head_dim=64, max_position_embeddings=1024)
EXPERT_WIDTH, EXPERTS, CHOSEN = 1408, 8, 2
PROMPT = list(range(5, 37))


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    configs = {
        "moe": transformers.MixtralConfig(**SHAPE, intermediate_size=EXPERT_WIDTH, num_local_experts=EXPERTS,
                                          num_experts_per_tok=CHOSEN),
        "dense, active size": transformers.MistralConfig(**SHAPE, intermediate_size=CHOSEN * EXPERT_WIDTH),
        "dense, total size": transformers.MistralConfig(**SHAPE, intermediate_size=EXPERTS * EXPERT_WIDTH),
    }
    return {name: transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            for name, config in configs.items()}


def torch_decode_tok_s(model: torch.nn.Module, tokens: int) -> float:
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        past = model(ids, use_cache=True).past_key_values
        next_id = torch.tensor([[7]])
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(next_id, past_key_values=past, use_cache=True)
            past, next_id = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    built = models()
    parameters = {name: sum(p.numel() for p in model.parameters()) for name, model in built.items()}
    with tempfile.TemporaryDirectory() as folder:
        engines = {name: llmc.load(compile_model(model, Path(folder) / f"m{i}"))
                   for i, (name, model) in enumerate(built.items())}
        decode: dict[str, list[float]] = {name: [] for name in [*engines, "PyTorch, moe"]}
        for _ in range(args.runs):
            for name, engine in engines.items():
                decode[name].append(time_generation(engine.model, PROMPT, args.tokens).decode_tok_s)
            decode["PyTorch, moe"].append(torch_decode_tok_s(built["moe"], args.tokens))
    moe = statistics.median(decode["moe"])
    print(f"Machine: {describe_machine()}; f32, one sequence, {len(PROMPT)}-token prompt, {args.tokens} decoded "
          f"tokens, median of {args.runs} runs\n")
    print("| model | parameters (M) | decode tok/s | moe's decode speed relative to it |")
    print("|---|---|---|---|")
    for name, runs in decode.items():
        rate = statistics.median(runs)
        size = parameters["moe" if name == "PyTorch, moe" else name] / 1e6
        print(f"| {'llmc, ' + name if name in engines else name} | {size:.1f} | {rate:.1f} | {moe / rate:.2f}x |")


if __name__ == "__main__":
    main()
