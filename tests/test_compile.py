"""Compiled packages: logits parity with PyTorch across sequence lengths from one compile,
and the checks that refuse a damaged or foreign package."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import llmc
from llmc.ir import IR_VERSION
from llmc.runtime.package import (METADATA_DIGEST, METADATA_FILE, WEIGHTS_FILE, Package, PackageError,
                                  sealed_metadata)
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
                                "dtype": "float32", "storage": "f32", "bytes_per_token": 2 * 2 * 2 * 16 * 4,
                                "page_size": 16, "softcap": None, "window": None}


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


def test_weights_that_do_not_fit_the_library_are_refused_at_load_naming_the_tensor(package_copy):
    """A sealed weight table that disagrees with the library (as a faulty writer would make one): the library's
    entry points no longer check the weights on each call, so the check at load must catch it."""
    meta = json.loads((package_copy / METADATA_FILE).read_text())
    del meta[METADATA_DIGEST]
    entry = next(e for e in meta["weights"]["tensors"] if len(set(e["shape"])) == 2)
    entry["shape"] = entry["shape"][::-1]
    (package_copy / METADATA_FILE).write_text(sealed_metadata(meta))
    expected = tuple(entry["shape"][::-1])
    with pytest.raises(PackageError, match=rf"weight {re.escape(entry['name'])} of .* is {entry['dtype']} "
                                           rf"\({expected[1]}, {expected[0]}\), but its cpu library takes "
                                           rf"R\.Tensor\(\({expected[0]}, {expected[1]}\)"):
        llmc.load(package_copy)


def test_decode_checks_only_its_token_inputs_on_each_call(tiny_package):
    """The weights are checked once, at load: a decode step's VM checks only the tokens and positions."""
    engine = llmc.load(tiny_package("llama_gqa_tied"))
    checks: list[str] = []

    def count_checks(func, name, before, result, *args):
        if before and name.startswith(("vm.builtin.check_", "vm.builtin.match_shape")):
            checks.append(name)
        return 0

    def checks_in(new_tokens: int) -> int:
        checks.clear()
        engine.model.executor.vm["set_instrument"](count_checks)
        engine.generate([1, 2, 3], llmc.SamplingParams(max_tokens=new_tokens, ignore_eos=True))
        engine.model.executor.vm["set_instrument"](None)
        return len(checks)

    per_decode_step = (checks_in(6) - checks_in(2)) / 4
    # input_ids and positions: a dtype and a shape check each; the logits: a shape check; the weights: none
    assert per_decode_step == 5


def test_unknown_device_is_refused(tiny_package):
    with pytest.raises(llmc.LlmcError, match="no library for device 'tpu'"):
        llmc.load(tiny_package("llama_gqa_tied"), device="tpu")


def test_dump_ir_writes_each_step_in_order(tiny_model, tmp_path):
    """--dump-ir: the imported module, the module after each pass (named after it), then the Relax module."""
    from llmc.compiler import compile_model
    from llmc.passes.pipeline import PassOptions, passes

    compile_model(tiny_model("llama_gqa_tied"), tmp_path / "pkg", dump_ir=tmp_path / "ir")
    files = sorted(path.name for path in (tmp_path / "ir").iterdir())
    steps = [name for name, _ in passes(PassOptions())]
    assert len(files) == 1 + len(steps) + 1
    assert files[0] == "01-imported.txt" and files[1] == "02-lower-attention-to-the-paged-kv-cache-f32.txt"
    assert files[-1] == f"{len(files):02d}-relax-for-cpu.py"
    imported, lowered = ((tmp_path / "ir" / name).read_text() for name in files[:2])
    assert "func forward(" in imported and "paged_attention" not in imported
    assert "func decode(" in lowered and "paged_attention" in lowered
    assert "def decode(" in (tmp_path / "ir" / files[-1]).read_text()
