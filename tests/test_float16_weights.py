"""16-bit checkpoints keep 16-bit weights (`--quant auto`): a Hugging Face folder stored in float16 or
bfloat16 compiles to matmul and embedding weights of that dtype (half the bytes), whose logits and greedy
tokens are transformers' on the same checkpoint loaded as float32 (which holds every 16-bit value
exactly). `--quant f16` converts a float32 checkpoint explicitly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import llmc
from llmc.errors import LlmcError
from llmc.compiler import compile_model
from llmc.passes.pipeline import PassOptions
from llmc.runtime.package import Package
from llmc.runtime.sampling import SamplingParams
from tiny_models import build_tiny, transformers_greedy


def _sixteen_bit_folder(name: str, dtype: torch.dtype, folder):
    build_tiny(name).to(dtype).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _weight_bytes(package: str) -> dict[str, int]:
    by_dtype: dict[str, int] = {}
    for entry in Package.open(package).metadata["weights"]["tensors"]:
        by_dtype[entry["dtype"]] = by_dtype.get(entry["dtype"], 0) + entry["nbytes"]
    return by_dtype


@pytest.mark.parametrize("dtype, stored, file_format", [(torch.float16, "float16", "F16"),
                                                        (torch.bfloat16, "bfloat16", "BF16")])
@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_tied"])
def test_a_16_bit_checkpoint_keeps_16_bit_weights(tmp_path, name, dtype, stored, file_format):
    model = _sixteen_bit_folder(name, dtype, tmp_path / "hf")
    package = str(compile_model(str(tmp_path / "hf"), tmp_path / "pkg"))
    formats = Package.open(package).metadata["quantization"]["formats"]
    assert formats and set(formats.values()) == {file_format}
    assert "model.layers.0.self_attn.q_proj.weight" in formats
    sizes = _weight_bytes(package)
    assert sizes[stored] > 20 * sizes.get("float32", 0)  # norms and biases stay float32
    engine = llmc.load(package)
    for length in (1, 3, 9):  # decode-sized and prefill-sized inputs: no activation quantization here
        ids = np.random.default_rng(length).integers(0, model.config.vocab_size, length)
        with torch.no_grad():
            expected = model(torch.tensor(ids[None])).logits.numpy()[0]
        assert np.abs(engine.forward(ids) - expected).max() / np.abs(expected).max() <= 1e-4
    prompt = np.random.default_rng(7).integers(0, model.config.vocab_size, 9).tolist()
    expected_ids, _ = transformers_greedy(model, prompt, 32)
    assert engine.generate(prompt, SamplingParams(max_tokens=32)).output_ids == expected_ids


def test_quant_f16_converts_a_float32_checkpoint(tmp_path):
    model = build_tiny("llama_gqa_tied")
    package = str(compile_model(model, tmp_path / "pkg", options=PassOptions("f16")))
    assert set(Package.open(package).metadata["quantization"]["formats"].values()) == {"F16"}
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, 9)
    with torch.no_grad():
        expected = model(torch.tensor(ids[None])).logits.numpy()[0]
    error = np.abs(llmc.load(package).forward(ids) - expected).max() / np.abs(expected).max()
    assert error <= 5e-3  # float16 rounding of the weights


def test_vulkan_refuses_bfloat16_weights_at_compile_time(tmp_path):
    _sixteen_bit_folder("llama_gqa_untied", torch.bfloat16, tmp_path / "hf")
    with pytest.raises(LlmcError, match=r"target vulkan cannot hold bfloat16 weights \(\d+ of them, .*WGSL has no "
                                        r"bfloat16.*Compile with --quant f16"):
        compile_model(str(tmp_path / "hf"), tmp_path / "pkg", targets=["vulkan"])
