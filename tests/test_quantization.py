"""The grouped weight formats: round trips, and exact reproduction of the bundled GGUF's
Q4_1 and Q8_0 data when quantizing the weights transformers dequantized from it."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from llmc.frontend.checkpoint import resolve_model
from llmc.ir.quant_formats import dequantize, quantize


def test_q8_and_q4_round_trip_within_one_step():
    weight = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    for bits, steps in ((8, 127), (4, 15)):
        q = quantize(weight, bits)
        back = dequantize(q.codes, q.scales, q.mins, bits)
        group_range = np.abs(weight.reshape(8, 2, 32)).max(-1) * 2 if bits == 8 else np.ptp(weight.reshape(8, 2, 32), -1)
        assert np.all(np.abs(back - weight).reshape(8, 2, 32).max(-1) <= group_range / steps)


def test_quantizing_requires_whole_groups():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(np.zeros((4, 40), np.float32), 4)


def _gguf_blocks(name: str) -> tuple[np.ndarray, str]:
    reader = GGUFReader(str(resolve_model("smollm2-135m").path))
    tensor = next(t for t in reader.tensors if t.name == name)
    return np.asarray(tensor.data), tensor.tensor_type.name


@pytest.mark.slow
@pytest.mark.parametrize("gguf_name, hf_name", [("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
                                                ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight"),
                                                ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight")])
def test_requantizing_the_bundled_q4_1_reproduces_its_blocks(smollm2_torch, gguf_name, hf_name):
    model, _ = smollm2_torch
    weight = dict(model.named_parameters())[hf_name].detach().numpy()
    raw, kind = _gguf_blocks(gguf_name)
    assert kind == "Q4_1"
    blocks = raw.reshape(weight.shape[0], -1, 20)
    q = quantize(weight, 4)
    np.testing.assert_array_equal(q.scales.view(np.uint16), blocks[..., 0:2].copy().view(np.uint16)[..., 0])
    np.testing.assert_array_equal(q.mins.view(np.uint16), blocks[..., 2:4].copy().view(np.uint16)[..., 0])
    np.testing.assert_array_equal(q.codes, blocks[..., 4:].reshape(weight.shape[0], -1))
    np.testing.assert_array_equal(dequantize(q.codes, q.scales, q.mins, 4), weight)


@pytest.mark.slow
def test_requantizing_the_bundled_q8_0_embedding_reproduces_its_blocks(smollm2_torch):
    model, _ = smollm2_torch
    weight = model.model.embed_tokens.weight.detach().numpy()
    raw, kind = _gguf_blocks("token_embd.weight")
    assert kind == "Q8_0"
    blocks = raw.reshape(weight.shape[0], -1, 34)
    q = quantize(weight, 8)
    np.testing.assert_array_equal(q.scales.view(np.uint16), blocks[..., 0:2].copy().view(np.uint16)[..., 0])
    np.testing.assert_array_equal(q.codes.view(np.uint8), blocks[..., 2:].reshape(weight.shape[0], -1))
