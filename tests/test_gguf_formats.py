"""GGUF files in llama.cpp's own formats, kept as they are (`--quant auto`): every block format's
reading equals gguf-py's `dequantize` bit for bit on tensors llama.cpp wrote; a mixed Q4_K_M file
compiles with each tensor in its own format and its logits are the dequantized model's; a format
llmc does not read is refused, naming the tensor; `llmc inspect` shows each tensor's format."""

from __future__ import annotations

import collections
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

import llmc
from dequantized_logits import assert_logits_match_the_dequantized_model
from llmc.frontend.checkpoint import load_torch_model, resolve_model
from llmc.ir.ggml_formats import FORMATS
from llmc.ir.quant_formats import dequantize

pytestmark = pytest.mark.slow

# Which llama.cpp file type holds tensors of each format (the bundled file is Q4_1 with a Q8_0 embedding).
FILE_WITH = {"Q4_0": "Q4_0", "Q4_1": None, "Q5_0": "Q4_K_M", "Q5_1": "Q5_K_M", "Q8_0": None, "Q4_K": "Q4_K_M",
             "Q5_K": "Q5_K_M", "Q6_K": "Q4_K_M"}


def _path(gguf_variants, file_type):
    return resolve_model("smollm2-135m").path if file_type is None else gguf_variants(file_type)


@pytest.mark.parametrize("name", list(FORMATS))
def test_reading_each_format_equals_gguf_py_bit_for_bit(gguf_variants, name):
    reader = GGUFReader(str(_path(gguf_variants, FILE_WITH[name])))
    tensors = [t for t in reader.tensors if t.tensor_type.name == name][:3]
    assert tensors, f"no {name} tensor in the file"
    for tensor in tensors:
        cols, rows = (int(n) for n in tensor.shape)
        q = FORMATS[name].to_quantized(np.asarray(tensor.data), cols)
        ours = dequantize(q.codes, q.scales, q.mins, q.bits)
        theirs = gguf_dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols).astype(np.float32)
        np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32), err_msg=tensor.name)


def test_a_mixed_file_keeps_each_tensors_format(gguf_variants, tmp_path):
    from llmc.compiler import compile_model

    path = gguf_variants("Q4_K_M")
    package = compile_model(str(path), tmp_path / "pkg")
    engine = llmc.load(package)
    formats = engine.package.metadata["quantization"]["formats"]
    in_file = collections.Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors
                                  if t.tensor_type.name != "F32")
    kept = collections.Counter(formats.values())  # the tied embedding and head: one tensor, one entry
    assert kept == in_file and set(in_file) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    model = load_torch_model(resolve_model(str(path)))  # the file dequantized to float32 by transformers
    assert_logits_match_the_dequantized_model(engine, model)
    assert "4" in engine.chat([{"role": "user", "content": "What is 2+2?"}], llmc.SamplingParams(max_tokens=20)).text


def test_a_format_llmc_does_not_read_is_refused_naming_the_tensor(gguf_variants, tmp_path):
    path = gguf_variants("Q3_K_S")
    result = subprocess.run([sys.executable, "-m", "llmc.cli", "compile", str(path), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "(Q3_K)" in message and "blk.0." in message and "formats llmc does not read" in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_inspect_shows_each_tensors_format(smollm2_auto_package):
    result = subprocess.run([sys.executable, "-m", "llmc.cli", "inspect", smollm2_auto_package],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()
             if line.startswith("  model.") and len(line.split()) >= 2}
    assert lines["model.layers.0.mlp.down_proj.weight"] == "Q4_1"
    assert lines["model.embed_tokens.weight"] == "Q8_0"
    assert lines["model.norm.weight"] == "float32"


@pytest.mark.parametrize("file_type", ["BF16"])  # float16 weights: test_float16_weights.py, on the tiny models
def test_a_16_bit_file_keeps_16_bit_weights(gguf_variants, tmp_path, file_type):
    from llmc.compiler import compile_model

    path = gguf_variants(file_type)
    package = compile_model(str(path), tmp_path / "pkg")
    engine = llmc.load(package)
    assert set(engine.package.metadata["quantization"]["formats"].values()) == {file_type}
    assert (package / "weights.bin").stat().st_size < 300e6  # 538 MB as float32
    model = load_torch_model(resolve_model(str(path)))
    for length in (64, 3):  # no activation quantization with float weights: decode matches too
        ids = np.random.default_rng(length).integers(0, 49152, length)
        with torch.no_grad():
            expected = model(torch.tensor(ids[None])).logits.numpy()[0]
        assert np.abs(engine.forward(ids) - expected).max() / np.abs(expected).max() <= 1e-4
