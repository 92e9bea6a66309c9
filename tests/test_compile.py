"""Compiled packages: logits parity with PyTorch across sequence lengths from one compile,
and the checks that refuse a damaged or foreign package."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import llmc
from llmc.ir import IR_VERSION
from llmc.runtime.package import METADATA_FILE, WEIGHTS_FILE, Package, PackageError
from tiny_models import TINY_MODELS

RTOL = 1e-4


@pytest.mark.parametrize("name", TINY_MODELS)
def test_compiled_logits_match_pytorch(tiny_model, tiny_package, name):
    model = tiny_model(name)
    engine = llmc.load(tiny_package(name))
    for length in (1, 7, 64):
        ids = np.random.default_rng(length).integers(0, model.config.vocab_size, length)
        logits = engine.forward(ids)
        with torch.no_grad():
            expected = model(torch.tensor(ids[None])).logits.numpy()[0]
        assert logits.shape == (length, model.config.vocab_size)
        assert np.abs(logits - expected).max() / np.abs(expected).max() <= RTOL


def test_package_records_what_it_is(tiny_package):
    package = Package.open(tiny_package("llama_gqa_tied"))
    meta = package.metadata
    assert meta["llmc_ir_version"] == IR_VERSION
    assert meta["model"]["architecture"] == "LlamaForCausalLM"
    assert meta["model"]["vocab_size"] == 512
    assert meta["targets"]["cpu"]["library"] == "lib-cpu.so"
    assert len(meta["files"][WEIGHTS_FILE]["xxh3_128"]) == 32
    assert all(entry["offset"] % 64 == 0 for entry in meta["weights"]["tensors"])
    assert meta["kv_cache"] == {"num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16,
                                "dtype": "float32", "page_size": 16}


@pytest.fixture
def package_copy(tiny_package, tmp_path):
    destination = tmp_path / "copy"
    shutil.copytree(tiny_package("llama_gqa_tied"), destination)
    return destination


def test_corrupted_weights_are_refused(package_copy):
    weights = package_copy / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="does not match the checksum"):
        llmc.load(package_copy)


def test_other_package_format_is_refused(package_copy):
    meta_file = package_copy / METADATA_FILE
    meta = json.loads(meta_file.read_text())
    meta["package_format"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="package format 99"):
        llmc.load(package_copy)


def test_missing_library_is_refused(package_copy):
    (package_copy / "lib-cpu.so").unlink()
    with pytest.raises(PackageError, match="lib-cpu.so is missing"):
        llmc.load(package_copy)


def test_unknown_device_is_refused(tiny_package):
    with pytest.raises(llmc.LlmcError, match="no library for device 'tpu'"):
        llmc.load(tiny_package("llama_gqa_tied"), device="tpu")
