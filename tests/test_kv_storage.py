"""The KV cache's storage formats (f32, f16, q8, q4: ir/kv_storage.py) and split-KV decode attention.

Each format's compiled attention is checked against the IR interpreter, whose reference cache keeps
keys and values as the format gives them back; f32 and f16 caches against transformers at long
prompts; split decode against the same sequence decoded in a batch (where it does not split).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import llmc
from llmc.compiler import compile_model
from llmc.errors import LlmcError
from llmc.frontend.torch_export import import_torch_model
from llmc.ir import KVCacheType, ReferenceKVCache, run
from llmc.ir.kv_storage import STORAGES, block_hadamard, hadamard, kv_storage, rotation_size
from llmc.passes.pipeline import PassOptions, run_pipeline
from tiny_models import LONG_CONTEXT_MODEL, build_tiny

FORMATS = ("f32", "f16", "q8", "q4")


@pytest.fixture(scope="module")
def long_model():
    return build_tiny(LONG_CONTEXT_MODEL)


@pytest.fixture(scope="module")
def storage_package(long_model, tmp_path_factory):
    """format -> the long-context tiny model compiled (f32 weights) with that KV cache."""
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            path = tmp_path_factory.mktemp(f"kv-{name}") / "pkg"
            cache[name] = str(compile_model(long_model, path, options=PassOptions("f32", kv_cache=name)))
        return cache[name]
    return get


def _interpreter_logits(model, storage: str, ids: list[int], chunk: int) -> np.ndarray:
    (module,) = run_pipeline(import_torch_model(model), PassOptions("f32", kv_cache=storage))
    fields = {k: v for k, v in module.metadata["kv_cache"].items() if k != "bytes_per_token"}
    cache = ReferenceKVCache(KVCacheType(**fields))
    cache.add_sequence(0)
    pieces = []
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        cache.begin_forward([0], [len(part)])
        inputs = {"input_ids": np.array([part]), "positions": np.arange(start, start + len(part)),
                  "logit_rows": np.arange(len(part)), "kv_cache": cache}
        (logits,) = run(module, "prefill", inputs)
        cache.end_forward()
        pieces.append(logits)
    return np.concatenate(pieces)


def test_hadamard_is_orthonormal_and_its_own_inverse():
    for size, block in ((32, 32), (64, 64), (96, 32), (128, 128)):
        assert rotation_size(size) == block
        matrix = block_hadamard(size)
        np.testing.assert_allclose(matrix @ matrix, np.eye(size), atol=1e-6)
        np.testing.assert_allclose(matrix, matrix.T)
        np.testing.assert_allclose(matrix[:block, :block], hadamard(block))


def test_quantized_rows_keep_values_within_their_step():
    rows = np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32)
    rows[:, 5] *= 20  # an outlier channel, as keys have
    for name, limit in (("q8", 1 / 127), ("q4", 1 / 7)):
        error = np.abs(STORAGES[name].round_trip(rows) - rows).max(-1)
        assert np.all(error <= np.abs(rows).max(-1) * limit * 1.01 + 1e-6), name
    rotated = np.abs(STORAGES["q4"].round_trip(rows) - rows).mean()
    plain = np.abs(dataclasses.replace(STORAGES["q4"], rotated=False).round_trip(rows) - rows).mean()
    assert rotated < plain * 0.8  # the rotation spreads the outlier channel over the head


@pytest.mark.parametrize("storage", FORMATS)
def test_each_format_matches_the_interpreter_over_chunked_prefill_and_decode(long_model, storage_package, storage):
    ids = np.random.default_rng(1).integers(0, 512, 150).tolist()
    expected = _interpreter_logits(long_model, storage, ids, 64)
    engine = llmc.load(storage_package(storage))
    model = engine.model
    seq = model.cache.add_sequence()
    got = [model.step([seq], [ids[:64]], [64]), model.step([seq], [ids[64:128]], [64])]
    got += [model.step([seq], [[token]]) for token in ids[128:]]
    # The formats differ from f32 by 1e-4 (f16) to 5e-2 (q4) here; the kernels match their reference to 1e-6.
    np.testing.assert_allclose(np.concatenate(got), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("storage", ["f32", "f16"])
@pytest.mark.parametrize("length", [2048, 4096, 8000])
def test_long_prompts_match_transformers(long_model, storage_package, storage, length):
    """The last prefilled position and 8 decoded ones: with an f32 cache within 1e-4 of transformers' logits,
    and with both caches the same greedy tokens."""
    ids = np.random.default_rng(length).integers(0, 512, length).tolist()
    with torch.no_grad():
        expected = long_model(torch.tensor([ids])).logits[0, -9:].numpy()
    model = llmc.load(storage_package(storage)).model
    seq = model.cache.add_sequence()
    chunk = model.cache.prefill_chunk
    for start in range(0, length - 8, chunk):
        last = model.step([seq], [ids[start:min(start + chunk, length - 8)]])
    got = np.concatenate([last] + [model.step([seq], [[token]]) for token in ids[length - 8:]])
    if storage == "f32":
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("storage", ["f32", "q8"])
def test_split_kv_decode_equals_the_unsplit_batch(storage_package, storage):
    """One sequence decodes with its keys split over the threads; four at once (sequences x key heads at least
    twice the threads) do not split. The merged chunks give the same logits."""
    model = llmc.load(storage_package(storage)).model
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 512, n).tolist() for n in (700, 300, 45, 1)]
    seqs = [model.cache.add_sequence() for _ in prompts]
    chunk = model.cache.prefill_chunk
    for seq, prompt in zip(seqs, prompts):
        for start in range(0, len(prompt) - 1, chunk):
            model.step([seq], [prompt[start:min(start + chunk, len(prompt) - 1)]])
    batched = model.step(seqs, [[p[-1]] for p in prompts])
    for seq, prompt in zip(seqs, prompts):
        model.cache.truncate(seq, len(prompt) - 1)
    alone = np.concatenate([model.step([seq], [[p[-1]]]) for seq, p in zip(seqs, prompts)])
    np.testing.assert_allclose(alone, batched, atol=2e-5, rtol=0)


def test_kv_bytes_per_token_shrink_and_the_default_capacity_grows(storage_package):
    packages = {name: llmc.load(storage_package(name)) for name in FORMATS}
    per_token = {name: e.model.package.metadata["kv_cache"]["bytes_per_token"] for name, e in packages.items()}
    assert per_token == {name: kv_storage(name).bytes_per_token(2, 2, 32) for name in FORMATS}
    smollm2 = {name: kv_storage(name).bytes_per_token(30, 3, 64) for name in FORMATS}  # 30 layers, 3 x 64
    assert smollm2["f32"] == 46080 and smollm2["f16"] == 23040
    assert smollm2["q8"] <= 0.27 * smollm2["f32"] and smollm2["q4"] <= 0.16 * smollm2["f32"]
    capacity = {name: e.model.cache.max_total_tokens for name, e in packages.items()}
    context = packages["f32"].model.context_length
    assert capacity["f32"] == context
    for name in ("f16", "q8", "q4"):
        assert capacity[name] == context * per_token["f32"] // per_token[name]


def test_inspect_shows_the_storage_and_bytes_per_token(storage_package):
    from llmc.inspection import describe, load_ir

    text = describe(load_ir(storage_package("q8")))
    assert "kv cache: q8, 2 layers x 2 key/value heads x 32" in text
    assert "bytes per token (0.281x f32)" in text


def test_bad_kv_cache_formats_are_refused_at_compile_time(tiny_model, tmp_path):
    with pytest.raises(LlmcError, match="unknown KV cache format 'q5'; llmc knows f32, f16, q8, q4"):
        PassOptions("f32", kv_cache="q5")
    # llama_gqa_tied has heads of 16 values: less than a quantization group.
    with pytest.raises(LlmcError, match="head size 16 is not a multiple of 32"):
        compile_model(tiny_model("llama_gqa_tied"), tmp_path / "q8", options=PassOptions("f32", kv_cache="q8"))


@pytest.mark.parametrize("target", ["cuda", "metal"])
def test_targets_without_quantized_caches_refuse_them(long_model, tmp_path, target):
    """cuda and metal keep TVM's KV cache with its own kernels: a stored format they cannot read is refused
    before any work (vulkan's formats: tests/test_vulkan.py)."""
    with pytest.raises(LlmcError, match=f"target {target} cannot store the KV cache as q8"):
        compile_model(long_model, tmp_path / target, targets=[target], options=PassOptions("f32", kv_cache="q8"))
