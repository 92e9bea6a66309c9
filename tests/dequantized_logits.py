"""The check a package compiled from a GGUF's own blocks must pass against transformers' float32
model of the same file (whose weights are those blocks dequantized)."""

from __future__ import annotations

import numpy as np
import torch


def assert_logits_match_the_dequantized_model(engine, model) -> None:
    """Prefill-sized inputs dequantize the blocks exactly: PyTorch's logits within 1e-4. Decode-sized inputs
    (fewer than 8 rows) quantize activations to int8 in every layer, as llama.cpp does: about 5% RMS over
    30 layers on random tokens, so 10% is the bound (a wrong scale, minimum or offset gives errors of order 1)."""
    for length in (64, 3):
        ids = np.random.default_rng(length).integers(0, 49152, length)
        with torch.no_grad():
            expected = model(torch.tensor(ids[None])).logits.numpy()[0]
        got = engine.forward(ids)
        if length < 8:
            assert np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected ** 2)) <= 0.1
        else:
            assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-4
