"""The command line: bad input gets one clear paragraph and a non-zero exit code, never a
traceback; inspect describes a model or package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from llmc.frontend.checkpoint import resolve_model
from llmc.runtime.package import WEIGHTS_FILE


def llmc_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True, timeout=900,
                          env=env)


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    message = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in message, result.stderr


def test_a_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a model at all\n")
    assert_clean_failure(llmc_cli("compile", str(path), "-o", str(tmp_path / "out")), "is not a model")


def test_a_path_that_does_not_exist(tmp_path):
    assert_clean_failure(llmc_cli("compile", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "out")),
                         "neither a file, a folder, nor a built-in model")


@pytest.mark.parametrize("size", [1000, 50_000_000])
def test_a_truncated_gguf(tmp_path, size):
    bundled = resolve_model("smollm2-135m").path
    truncated = tmp_path / "truncated.gguf"
    with open(bundled, "rb") as source:
        truncated.write_bytes(source.read(size))
    assert_clean_failure(llmc_cli("compile", str(truncated), "-o", str(tmp_path / "out")),
                         "truncated or corrupt GGUF")
    assert not (tmp_path / "out" / "llmc.json").exists()


def test_a_model_with_an_unsupported_op(tmp_path):
    """JetMoE routes tokens with ops llmc does not import yet (index_add sums each expert's rows back)."""
    config = transformers.JetMoeConfig(vocab_size=128, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                       num_attention_heads=4, num_key_value_heads=2, kv_channels=8,
                                       num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "jetmoe")
    assert_clean_failure(llmc_cli("compile", str(tmp_path / "jetmoe"), "-o", str(tmp_path / "out")),
                         "cannot import yet: ", "aten.index_add.default", "modeling_jetmoe.py")


def test_a_package_with_a_corrupted_weight_file(tiny_package, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_package("llama_mha_tied"), copy)
    weights = copy / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x55
    weights.write_bytes(bytes(data))
    assert_clean_failure(llmc_cli("run", str(copy), "hello"), "does not match the checksum")


def test_a_package_without_a_tokenizer_needs_token_ids(tiny_package):
    assert_clean_failure(llmc_cli("run", tiny_package("llama_mha_tied"), "hello"), "has no tokenizer")


def test_inspect_a_package(tiny_package):
    result = llmc_cli("inspect", tiny_package("qwen2_tied"))
    assert result.returncode == 0, result.stderr
    assert "function prefill(input_ids: i64[1, seq], positions: i64[seq], logit_rows: i64[rows]" in result.stdout
    assert "paged_attention 2" in result.stdout
    assert "symbolic dims: batch, rows, seq" in result.stdout
    full = llmc_cli("inspect", tiny_package("qwen2_tied"), "--ir")
    assert "func decode(" in full.stdout and "param @" in full.stdout


def test_inspect_a_hugging_face_folder(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    result = llmc_cli("inspect", str(tmp_path / "llama"))
    assert result.returncode == 0, result.stderr
    assert "function forward(input_ids: i64[1, seq]) -> f32[1, seq, 64]" in result.stdout
    assert "attention 1" in result.stdout


def test_inspect_an_op_prints_its_signature_and_doc():
    result = llmc_cli("inspect", "--op", "attention")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("attention(q, k, v, mask?) {scale=None, causal=False, softcap=None}\n")
    assert "softmax(q @ k^T * scale + mask) @ v" in result.stdout
    assert_clean_failure(llmc_cli("inspect", "--op", "atention"), "llmc's IR has no op 'atention'", "attention,")
    assert_clean_failure(llmc_cli("inspect"), "needs a package or model to describe, or --op NAME")


def test_help_lists_the_commands():
    result = llmc_cli("--help")
    for command in ("compile", "inspect", "run", "chat"):
        assert command in result.stdout
    assert Path(sys.executable).exists()


@pytest.mark.parametrize("args, fragment", [
    (["--prune", "layers=3,width=2"], "llmc prunes layers, heads, mlp"),
    (["--calibration", "text.txt"], "--calibration is the text --prune measures on; give --prune too"),
    (["--prune", "layers=99"], "cannot remove 99 of the model's 30 decoder layers"),
    (["--prune", "mlp=0.1", "--calibration", "/nonexistent/text.txt"], "cannot read the calibration text"),
])
def test_bad_pruning_requests(tmp_path, args, fragment):
    assert_clean_failure(llmc_cli("compile", "smollm2-135m", "-o", str(tmp_path / "out"), *args), fragment)
