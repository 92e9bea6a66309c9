"""The vulkan target on the Vulkan device of this machine (in CI, lavapipe: Mesa's software one).

One compile gives one package with a CPU and a vulkan library; the vulkan library must give
the CPU library's logits (1e-4 relative) and greedy tokens: tiny models, chunked prefill, two
sequences in one batch, continuous batching with a KV cache small enough to make requests
wait and be preempted, `llmc run --device vulkan`, and the bundled SmolLM2. Quantized (q4)
models are held to the CPU's exact numbers: its decode kernel quantizes activations to int8,
the vulkan kernels do not (see `_greedy_by_prefill`). Tests that need a device are skipped,
with the reason, where there is none; the refusal of an absent device is tested everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

import llmc
from llmc.compiler import compile_model
from llmc.ir import LlmcError
from llmc.passes.pipeline import PassOptions
from llmc.runtime.grammar import GrammarSpec
from llmc.runtime.model import CacheSettings
from llmc.runtime.request import Request
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.scheduler import Scheduler
from llmc.runtime.devices import open_device
from llmc.targets.cpu_kernels.matmul import GEMV_ROWS
from tiny_models import GEMMA2_MODEL, LONG_CONTEXT_MODEL, build_chat_package

NEW_TOKENS = 48
VOCAB = 512


def _absent_device() -> str | None:
    try:
        open_device("vulkan")
    except LlmcError as error:
        return str(error)
    return None


ABSENT = _absent_device()
needs_vulkan = pytest.mark.skipif(ABSENT is not None, reason=f"no Vulkan device: {ABSENT}")


def _word_tokenizer(folder) -> None:
    """A word-level tokenizer for the tiny models' vocabulary: "w0" .. "w511"."""
    backend = HFTokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w1").save_pretrained(folder)


@pytest.fixture(scope="module")
def package(tiny_model, tmp_path_factory):
    """(tiny model name, quantization, KV cache format) -> a package compiled for cpu and vulkan, with a word
    tokenizer."""
    built: dict[tuple[str, str, str], str] = {}

    def get(name: str, quant: str = "f32", kv_cache: str = "f32") -> str:
        key = (name, quant, kv_cache)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{name}-{quant}-{kv_cache}")
            _word_tokenizer(folder / "tokenizer")
            built[key] = str(compile_model(tiny_model(name), folder / "pkg", targets=["cpu", "vulkan"],
                                           options=PassOptions(quant, kv_cache=kv_cache),
                                           tokenizer=folder / "tokenizer"))
        return built[key]
    return get


def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(2, VOCAB, length).tolist()


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def _greedy_by_prefill(engine, prompt: list[int], count: int) -> list[int]:
    """Greedy tokens from prefill alone. The CPU's quantized matmuls on few rows (decode) quantize the
    activations to int8 per group, as llama.cpp does; on GEMV_ROWS rows or more they are exact, and so is
    the vulkan target (the op's meaning, ir/ops/quantized.py). This is the exact model's greedy output."""
    assert len(prompt) >= GEMV_ROWS
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(int(np.argmax(engine.forward(tokens)[-1])))
    return tokens[len(prompt):]


@needs_vulkan
@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_tied", "mistral_untied", GEMMA2_MODEL])
def test_vulkan_gives_the_cpu_logits_and_greedy_tokens(package, name):
    cpu, vulkan = llmc.load(package(name)), llmc.load(package(name), device="vulkan")
    prompt = _prompt(7, 20)  # past Gemma 2's window of 8
    assert _relative_error(vulkan.forward(prompt), cpu.forward(prompt)) <= 1e-4
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    assert vulkan.generate(prompt, params).output_ids == cpu.generate(prompt, params).output_ids


@needs_vulkan
def test_vulkan_f16_weights_give_the_cpu_logits_and_greedy_tokens(package):
    """float16 weights (`--quant f16`, as a 16-bit checkpoint keeps them): no activation quantization on
    either device, so decode matches too."""
    cpu, vulkan = llmc.load(package("llama_gqa_tied", "f16")), llmc.load(package("llama_gqa_tied", "f16"),
                                                                         device="vulkan")
    prompt = _prompt(7, 9)
    assert _relative_error(vulkan.forward(prompt), cpu.forward(prompt)) <= 1e-4
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    assert vulkan.generate(prompt, params).output_ids == cpu.generate(prompt, params).output_ids


@needs_vulkan
@pytest.mark.parametrize("kv_cache", ["f16", "q8", "q4"])
def test_vulkan_kv_cache_formats_give_the_cpu_logits_and_greedy_tokens(package, kv_cache):
    """Keys and values stored as f16, or quantized (q8; q4 with its rotation) into 32-bit words holding the
    bytes of the CPU's rows: prefill logits and greedy decode (its keys split over a workgroup's threads)
    match the CPU with the same cache format, over a prompt longer than a workgroup has threads."""
    path = package(LONG_CONTEXT_MODEL, "f32", kv_cache)
    cpu, vulkan = llmc.load(path), llmc.load(path, device="vulkan")
    prompt = _prompt(11, 100)
    assert _relative_error(vulkan.forward(prompt), cpu.forward(prompt)) <= 1e-4
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    assert vulkan.generate(prompt, params).output_ids == cpu.generate(prompt, params).output_ids


@needs_vulkan
def test_vulkan_q4_gives_the_exact_logits_and_greedy_tokens(package):
    cpu, vulkan = llmc.load(package("llama_gqa_untied", "q4")), llmc.load(package("llama_gqa_untied", "q4"),
                                                                          device="vulkan")
    prompt = _prompt(7, 9)
    assert _relative_error(vulkan.forward(prompt), cpu.forward(prompt)) <= 1e-4
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    assert vulkan.generate(prompt, params).output_ids == _greedy_by_prefill(cpu, prompt, 24)


@needs_vulkan
def test_chunked_prefill_gives_the_same_logits_and_tokens(package):
    cpu = llmc.load(package("qwen2_tied"))
    chunked = llmc.load(package("qwen2_tied"), device="vulkan",
                        cache=CacheSettings(max_total_tokens=256, prefill_chunk=5))
    prompt = _prompt(8, 37)
    assert _relative_error(chunked.forward(prompt), cpu.forward(prompt)) <= 1e-4
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    assert chunked.generate(prompt, params).output_ids == cpu.generate(prompt, params).output_ids


@needs_vulkan
def test_two_sequences_in_one_batch_match_each_alone(package):
    cpu, vulkan = llmc.load(package("llama_gqa_untied")), llmc.load(package("llama_gqa_untied"), device="vulkan")
    prompts = [_prompt(9, 5), _prompt(10, 11)]
    alone = [cpu.generate(p, SamplingParams(max_tokens=12, ignore_eos=True)).output_ids for p in prompts]
    seqs = [vulkan.model.cache.add_sequence() for _ in prompts]
    chunks, steps = prompts, []
    for _ in range(12):
        steps.append([int(np.argmax(row)) for row in vulkan.model.step(seqs, chunks)])
        chunks = [[token] for token in steps[-1]]
    assert [list(tokens) for tokens in zip(*steps)] == alone


@needs_vulkan
def test_continuous_batching_with_a_small_cache_gives_each_request_its_tokens(package):
    """Three pages of 16 tokens for three requests of 12-14 prompt tokens that each grow past a page:
    requests wait, and the newest are preempted and recomputed."""
    cpu = llmc.load(package("mistral_untied"))
    vulkan = llmc.load(package("mistral_untied"), device="vulkan",
                       cache=CacheSettings(max_total_tokens=48, max_batch_size=4, prefill_chunk=16))
    prompts = [_prompt(20 + i, 14 - i) for i in range(3)]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    requests = [Request(p, params, None, [], vulkan.context_length) for p in prompts]
    scheduler = Scheduler(vulkan.model)
    for request in requests:
        scheduler.add(request)
    while scheduler.has_work:
        scheduler.step()
    assert scheduler.stats.preemptions > 0
    assert vulkan.model.cache.free_pages() == vulkan.model.cache.total_pages()
    assert [r.output_ids for r in requests] == [cpu.generate(p, params).output_ids for p in prompts]


@needs_vulkan
def test_several_choices_for_one_prompt_on_a_cache_that_cannot_fork(package):
    """n > 1 where the KV cache cannot fork (vulkan's): the other choices compute the prompt themselves."""
    cpu = llmc.load(package("mistral_untied"))
    vulkan = llmc.load(package("mistral_untied"), device="vulkan",
                       cache=CacheSettings(max_total_tokens=256, max_batch_size=4, prefill_chunk=16))
    prompt = _prompt(40, 13)
    params = [SamplingParams(max_tokens=6, ignore_eos=True)] * 3  # greedy: vulkan's float sums differ a little
    requests = [Request(prompt, p, None, [], vulkan.context_length) for p in params]
    scheduler = Scheduler(vulkan.model)
    scheduler.add(requests[0], requests[1:])
    while scheduler.has_work:
        scheduler.step()
    assert [r.output_ids for r in requests] == [cpu.generate(prompt, p).output_ids for p in params]
    assert vulkan.model.cache.free_pages() == vulkan.model.cache.total_pages()


@needs_vulkan
def test_llmc_run_on_the_vulkan_device(package):
    def run(device: str) -> dict:
        result = subprocess.run([sys.executable, "-m", "llmc.cli", "run", package("llama_gqa_untied"),
                                 "w5 w17 w301 w44", "--raw", "--json", "--max-tokens", "12", "--device", device],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert run("vulkan")["output_ids"] == run("cpu")["output_ids"]


def test_an_absent_vulkan_device_is_refused_with_what_is_missing(monkeypatch):
    wgpu = pytest.importorskip("wgpu")
    from llmc.runtime.webgpu_device import wgpu_device

    monkeypatch.setattr(wgpu.gpu, "enumerate_adapters_sync", lambda: [])
    with pytest.raises(LlmcError, match="no Vulkan device is available here: install a Vulkan driver"):
        wgpu_device.__wrapped__()


@needs_vulkan
@pytest.mark.slow
@pytest.mark.parametrize("file_type", ["Q4_0", "Q4_K_M"])
def test_smollm2_on_vulkan_generates_the_cpu_tokens(tmp_path, gguf_variants, file_type):
    """A real model's own quantized tensors on vulkan give the CPU package's exact greedy tokens
    (`_greedy_by_prefill`): Q4_0's 4-bit codes offset by 8, and Q4_K_M's K-quants (4-bit codes with minimums,
    Q6_K's 8-bit codes in groups of 16, float32 scales) and Q8_0. Every weight form of ir/quant_formats.py is
    among them, but for 8-bit codes with minimums (Q5_1, Q5_K), which combine the two dequantization steps
    these check.
    Float32 weights on vulkan are checked on the tiny models (test_vulkan_gives_the_cpu_logits_and_greedy_tokens),
    and llmc's own q4 on test_vulkan_q4_gives_the_exact_logits_and_greedy_tokens."""
    path = compile_model(str(gguf_variants(file_type)), tmp_path / "pkg", targets=["cpu", "vulkan"],
                         options=PassOptions("auto"))
    cache = CacheSettings(max_total_tokens=512)
    cpu, vulkan = llmc.load(path, cache=cache), llmc.load(path, device="vulkan", cache=cache)
    prompt = cpu.encode("The capital of France is Paris. The capital of Italy is")
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    assert vulkan.generate(prompt, params).output_ids == _greedy_by_prefill(cpu, prompt, 16)


@needs_vulkan
def test_a_grammar_holds_vulkan_output_as_it_does_the_cpus(tmp_path):
    """Constrained decoding on the vulkan device (the tiny chat model, whose byte-level tokenizer the grammar
    engine reads): the grammar's mask applies to its logits, batched, and greedy picks the CPU's tokens."""
    path = build_chat_package(tmp_path, targets=("cpu", "vulkan"))
    schema = {"type": "object", "properties": {"word": {"enum": ["fox", "dog"]}, "n": {"type": "integer",
                                                                                      "minimum": 0, "maximum": 99}},
              "required": ["word", "n"], "additionalProperties": False}
    params = SamplingParams(max_tokens=40, grammar=GrammarSpec.json_schema(schema))
    cpu = llmc.load(path)
    vulkan = llmc.load(path, device="vulkan", cache=CacheSettings(max_total_tokens=256, max_batch_size=4,
                                                                  prefill_chunk=16))
    prompts = [_prompt(seed, 9) for seed in (50, 51)]
    requests = [vulkan.new_request(prompt, params, vulkan.context_length) for prompt in prompts]
    scheduler = Scheduler(vulkan.model)
    for request in requests:
        scheduler.add(request)
    while scheduler.has_work:
        scheduler.step()
    for prompt, request in zip(prompts, requests):
        assert json.loads(request.result().text)["word"] in ("fox", "dog")
        assert request.output_ids == cpu.generate(prompt, params).output_ids
