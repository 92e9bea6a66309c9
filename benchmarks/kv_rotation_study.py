"""What each KV-cache format costs in perplexity, and why q4 rotates whole heads: SmolLM2-135M-Instruct in
PyTorch (float32, its Q4_1 GGUF dequantized) on the first 4,096 tokens of benchmarks/data/long_text.txt,
with the keys (after the rotary embedding, as the cache holds them) and the values replaced by what a
format gives back (ir/kv_storage.py's NumPy reference).

    python benchmarks/kv_rotation_study.py

Variants: q8; q4 without rotation, rotated in blocks of 32, rotated over the whole head of 64 (llmc's q4);
llmc's q4 on the keys alone or the values alone; and two ways to spend more on the keys: 5-bit keys (the
same rotation and scales, 0.156x f32 with q4 values) and q4 keys with each channel's mean removed (the
means of a calibration text, benchmarks/data/perplexity.txt; exact for attention, since q . mean is the
same for every key of a query). The compiled kernels match the reference to 1e-6 (tests/test_kv_storage.py),
so these are the formats' own costs; bench_long.py measures the packages.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers.models.llama.modeling_llama as llama
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine  # noqa: E402

from llmc.frontend.checkpoint import load_torch_model, resolve_model  # noqa: E402
from llmc.frontend.tokenizer_export import save_tokenizer  # noqa: E402
from llmc.ir.kv_storage import STORAGES, hadamard  # noqa: E402

TEXT = Path(__file__).resolve().parent / "data" / "long_text.txt"
CALIBRATION = Path(__file__).resolve().parent / "data" / "perplexity.txt"
TOKENS = 4096
CALIBRATION_TOKENS = 512
HEAD_DIM = 64
Store = Callable[[np.ndarray], np.ndarray] | None


def rotated_codes(bits: int) -> Callable[[np.ndarray], np.ndarray]:
    """q4's layout with `bits`-bit codes: rotated over the head, a float16 scale per 32 (the value of largest
    magnitude / -2^(bits-1))."""
    rotation, half = hadamard(HEAD_DIM), 2 ** (bits - 1)

    def store(x: np.ndarray) -> np.ndarray:
        groups = (x.astype(np.float32) @ rotation).reshape(*x.shape[:-1], -1, 32)
        peak = np.take_along_axis(groups, np.abs(groups).argmax(-1)[..., None], -1)
        scale = (peak / -half).astype(np.float16).astype(np.float32)
        inverse = np.where(scale != 0, 1 / np.where(scale != 0, scale, 1), 0)
        codes = np.clip(np.rint(groups * inverse) + half, 0, 2 * half - 1) - half
        return ((codes * scale).reshape(x.shape) @ rotation).astype(np.float32)
    return store


def rotated_q4(block: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """q4's codes and scales after a Hadamard rotation in blocks of `block` (None: no rotation)."""
    plain = dataclasses.replace(STORAGES["q4"], rotated=False)
    if block is None:
        return plain.round_trip
    rotation = np.kron(np.eye(HEAD_DIM // block, dtype=np.float32), hadamard(block))
    return lambda x: plain.round_trip(x @ rotation) @ rotation


class StoredCache:
    """Replaces keys and values inside the model's attention by what a format gives back; with `key_means`
    (per layer: heads x head size), the keys are stored with those means taken off, then given them back."""

    def __init__(self, model) -> None:
        self.keys: Store = None
        self.values: Store = None
        self.key_means: list[np.ndarray] | None = None
        self.key_sums: list[np.ndarray] | None = None  # set to collect the keys' sums per layer (and count)
        self.key_count = 0
        self.layers = len(model.model.layers)
        self._layer = 0
        rotary = llama.apply_rotary_pos_emb

        def rotary_then_store(q, k, *args, **kwargs):
            q, k = rotary(q, k, *args, **kwargs)
            layer, self._layer = self._layer, (self._layer + 1) % self.layers
            if self.key_sums is not None:
                self.key_sums[layer] = self.key_sums[layer] + k.detach()[0].sum(1).double().numpy()
                self.key_count += k.shape[2] if layer == 0 else 0
                return q, k
            if self.key_means is None or self.keys is None:
                return q, self._store(k, self.keys)
            mean = torch.from_numpy(self.key_means[layer][None, :, None, :])
            return q, self._store(k - mean, self.keys) + mean

        llama.apply_rotary_pos_emb = rotary_then_store
        for layer in model.model.layers:
            layer.self_attn.v_proj.register_forward_hook(lambda _m, _i, out: self._store(out, self.values))

    @staticmethod
    def _store(tensor: torch.Tensor, store: Store) -> torch.Tensor:
        if store is None:
            return tensor
        rows = tensor.detach().numpy()
        return torch.from_numpy(store(rows.reshape(*rows.shape[:-1], -1, HEAD_DIM)).reshape(rows.shape))


def perplexity(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    chosen = torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return math.exp(-chosen.mean().item())


def key_means(model, cache: StoredCache, ids: list[int]) -> list[np.ndarray]:
    """Each layer's mean key (heads x head size, after the rotary embedding) over `ids`."""
    cache.key_sums, cache.key_count = [np.zeros(1)] * cache.layers, 0
    with torch.no_grad():
        model(torch.tensor([ids]))
    means = [(total / cache.key_count).astype(np.float32) for total in cache.key_sums]
    cache.key_sums = None
    return means


def main() -> None:
    source = resolve_model("smollm2-135m")
    model = load_torch_model(source).eval()
    with tempfile.TemporaryDirectory() as folder:
        save_tokenizer(source, Path(folder))  # tokenizer.json, as a package holds it
        tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False).ids[:TOKENS]
    calibration = tokenizer.encode(CALIBRATION.read_text(), add_special_tokens=False).ids[:CALIBRATION_TOKENS]
    cache = StoredCache(model)
    means = key_means(model, cache, calibration)
    base = perplexity(model, ids)
    print(f"Machine: {describe_machine()}; SmolLM2-135M-Instruct in PyTorch, float32; {TOKENS} tokens\n")
    print(f"| keys | values | perplexity | against f32 |\n|---|---|---|---|\n| f32 | f32 | {base:.4f} | |")
    ours = STORAGES["q4"].round_trip
    variants = (("q8", STORAGES["q8"].round_trip, "q8", STORAGES["q8"].round_trip),
                ("q4, no rotation", rotated_q4(None), "q4, no rotation", rotated_q4(None)),
                ("q4, rotated in blocks of 32", rotated_q4(32), "q4, rotated in blocks of 32", rotated_q4(32)),
                ("q4, rotated over the head (llmc)", ours, "q4, rotated over the head (llmc)", ours),
                ("q4 (llmc)", ours, "f32", None),
                ("f32", None, "q4 (llmc)", ours),
                ("5-bit, rotated over the head", rotated_codes(5), "q4 (llmc)", ours),
                ("q4 (llmc), channel means removed", ours, "q4 (llmc)", ours))
    for key_name, keys, value_name, values in variants:
        cache.keys, cache.values = keys, values
        cache.key_means = means if "means removed" in key_name else None
        score = perplexity(model, ids)
        print(f"| {key_name} | {value_name} | {score:.4f} | {(score / base - 1) * 100:+.2f}% |", flush=True)

if __name__ == "__main__":
    main()
