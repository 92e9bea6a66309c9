"""The bundled SmolLM2-135M-Instruct (Q4_1 GGUF). Compiled with --quant f32 (dequantized to
float32 as transformers loads it): logits parity with PyTorch, and greedy generation token for
token equal to transformers' `generate`. Compiled as `llmc run smollm2-135m` does (--quant auto,
the file's own Q4_1 and Q8_0 blocks): the package holds the file's bytes, prefill logits equal
PyTorch's on the same dequantized weights, and decode is within int8 activation error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import llmc
from dequantized_logits import assert_logits_match_the_dequantized_model
from llmc.runtime.sampling import SamplingParams

pytestmark = pytest.mark.slow
CHAT_QUESTION = "What is 2+2?"
RAW_PROMPT = "The capital of France is"
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def engine(smollm2_package):
    return llmc.load(smollm2_package)


def reference(model, prompt_ids: list[int], stop_at_eos: bool) -> tuple[list[int], list[float]]:
    kwargs = {} if stop_at_eos else {"eos_token_id": None}
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [float(torch.log_softmax(step[0].double(), -1)[t]) for step, t in zip(out.logits, tokens)]
    if stop_at_eos and tokens and tokens[-1] == 2:
        tokens, logprobs = tokens[:-1], logprobs[:-1]
    return tokens, logprobs


def chat_ids(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def test_logits_match_pytorch(engine, smollm2_torch):
    model, _ = smollm2_torch
    for length in (1, 7, 64):
        ids = np.random.default_rng(length).integers(0, 49152, length)
        with torch.no_grad():
            expected = model(torch.tensor(ids[None])).logits.numpy()[0]
        logits = engine.forward(ids)
        assert np.abs(logits - expected).max() / np.abs(expected).max() <= 1e-4


@pytest.mark.parametrize("stop_at_eos", [True, False], ids=["until-eos", "64-tokens"])
@pytest.mark.parametrize("kind", ["chat", "raw"])
def test_greedy_generation_is_token_exact(engine, smollm2_torch, kind, stop_at_eos):
    model, tokenizer = smollm2_torch
    prompt_ids = chat_ids(tokenizer) if kind == "chat" else tokenizer(RAW_PROMPT)["input_ids"]
    ours_prompt = engine.prompt_ids(CHAT_QUESTION if kind == "chat" else RAW_PROMPT, chat=kind == "chat")
    assert ours_prompt == prompt_ids
    expected, expected_logprobs = reference(model, prompt_ids, stop_at_eos)
    result = engine.generate(prompt_ids, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=not stop_at_eos))
    assert result.output_ids == expected
    assert np.abs(np.array(result.logprobs) - np.array(expected_logprobs)).max() <= 1e-3
    if not stop_at_eos:
        assert len(result.output_ids) == NEW_TOKENS


def test_llmc_run_uses_the_chat_template_and_the_cached_package(smollm2_auto_package, smollm2_torch, llmc_cache_dir):
    _, tokenizer = smollm2_torch
    env = {**os.environ, "LLMC_CACHE_DIR": str(llmc_cache_dir), "TVM_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "llmc.cli", "run", "smollm2-135m", CHAT_QUESTION, "--json",
                             "--max-tokens", str(NEW_TOKENS)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "compiling" not in result.stderr
    out = json.loads(result.stdout)
    assert out["prompt_ids"] == chat_ids(tokenizer)
    assert out["text"] == tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    assert "4" in out["text"]


def test_llmc_run_raw_streams_the_reference_text(smollm2_package):
    result = subprocess.run([sys.executable, "-m", "llmc.cli", "run", smollm2_package, RAW_PROMPT, "--raw",
                             "--max-tokens", "8"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" Paris.")


def test_auto_package_holds_the_files_blocks(smollm2_auto_package):
    from gguf import GGUFReader

    from llmc.frontend.checkpoint import resolve_model
    from llmc.runtime.package import Package

    package = Package.open(smollm2_auto_package)
    quantization = package.metadata["quantization"]
    assert (quantization["layers"], quantization["head"]) == ("auto", "auto")
    assert quantization["formats"]["model.layers.3.mlp.down_proj.weight"] == "Q4_1"
    assert quantization["formats"]["model.embed_tokens.weight"] == "Q8_0"
    names = [entry["name"] for entry in package.metadata["weights"]["tensors"]]
    arrays = dict(zip(names, package.weights()))
    reader = GGUFReader(str(resolve_model("smollm2-135m").path))
    blocks = np.asarray(next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight").data).reshape(576, -1, 20)
    codes = next(array for name, array in arrays.items() if name.startswith("model.layers.3.mlp.down_proj")
                 and name.endswith(".codes"))
    np.testing.assert_array_equal(codes, blocks[..., 4:].reshape(576, -1))
    assert sum(array.nbytes for array in arrays.values()) < 100e6  # 538 MB as float32


def test_auto_package_logits_are_the_dequantized_models(smollm2_auto_package, smollm2_torch):
    """transformers' float32 weights are the GGUF's blocks dequantized, so prefill (which dequantizes the
    blocks exactly) matches it as the f32 package does; decode-sized inputs quantize activations to int8."""
    model, _ = smollm2_torch
    engine = llmc.load(smollm2_auto_package)
    assert_logits_match_the_dequantized_model(engine, model)


@pytest.fixture(scope="module")
def long_prompt_logits(smollm2_torch):
    """An 8,000-token text and transformers' logits at positions 2,047, 4,095 and 7,991 to 7,999."""
    model, _ = smollm2_torch
    ids = np.random.default_rng(8000).integers(0, 49152, 8000).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    return ids, logits[[2047, 4095, *range(7991, 8000)]]


def test_long_prompts_match_pytorch(smollm2_package, long_prompt_logits):
    """Prompts of 2,048, 4,096 and 7,992 tokens (one sequence, prefilled in chunks of 512), then 8 tokens
    decoded to 8,000: within 1e-4 (of the largest logit) of transformers', and the same greedy tokens. An f16
    cache at 2k to 8k tokens gives transformers' greedy tokens in test_kv_storage.py (a tiny long-context model),
    and every cache format's cost at long contexts is measured by benchmarks/bench_long.py (RESULTS.md)."""
    ids, expected = long_prompt_logits
    model = llmc.load(smollm2_package).model
    seq = model.cache.add_sequence()
    got = []
    for start in range(0, 7992, 512):
        end = min(start + 512, 7992)
        logits = model.step([seq], [ids[start:end]])
        if end in (2048, 4096, 7992):
            got.append(logits)
    got = np.concatenate(got + [model.step([seq], [[token]]) for token in ids[7992:]])
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-4
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))
