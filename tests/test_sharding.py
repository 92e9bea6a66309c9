"""Tensor-parallel sharding: N shards run together by the interpreter (all_reduce as a NumPy sum) compute what
the unsharded model does, in prefill and decode, for GQA and MHA models and N = 2 and 3; a model that does
not split evenly is refused; a shard alone never runs on a partial sum; a CUDA package holds one package per
shard whose library calls NCCL's all-reduce, and the runtime refuses to run it on one device."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
import transformers

import llmc
from llmc.frontend.torch_export import import_torch_model
from llmc.ir import IRError, KVCacheType, ReferenceKVCache, run, run_sharded
from llmc.passes.kv_cache_lowering import lower_kv_cache
from llmc.passes.shard import ShardingError, shard_module
from llmc.runtime.package import PackageError

TOL = 1e-5
IDS = np.random.default_rng(5).integers(0, 512, 10)


def _llama(heads: int, kv_heads: int, hidden: int, intermediate: int = 192, layers: int = 2):
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=256)
    torch.manual_seed(heads + kv_heads)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _cache(module) -> ReferenceKVCache:
    fields = {k: v for k, v in module.metadata["kv_cache"].items() if k != "bytes_per_token"}
    cache = ReferenceKVCache(KVCacheType(**fields))
    cache.add_sequence(0)
    return cache


def _steps(ids: np.ndarray) -> list[tuple[str, dict]]:
    """A prefill of all but the last token, then a decode of the last."""
    prompt = len(ids) - 1
    return [("prefill", {"input_ids": ids[None, :prompt], "positions": np.arange(prompt),
                         "logit_rows": np.arange(prompt)}),
            ("decode", {"input_ids": ids[None, prompt:], "positions": np.array([prompt])})]


@pytest.fixture(scope="module")
def lowered():
    cache = {}

    def get(kind: str):
        if kind not in cache:
            heads, kv_heads, hidden = {"gqa": (12, 6, 192), "mha": (6, 6, 96)}[kind]
            cache[kind] = lower_kv_cache(import_torch_model(_llama(heads, kv_heads, hidden)))
        return cache[kind]
    return get


@pytest.mark.parametrize("kind", ["gqa", "mha"])
@pytest.mark.parametrize("shards", [2, 3])
def test_shards_run_together_compute_the_unsharded_model(lowered, kind, shards):
    module = lowered(kind)
    parts = shard_module(module, shards)
    whole = module.metadata["kv_cache"]
    for part in parts:
        cache = part.metadata["kv_cache"]
        assert (cache["num_q_heads"], cache["num_kv_heads"]) == (whole["num_q_heads"] // shards,
                                                                  whole["num_kv_heads"] // shards)
        assert part.weights["model.layers.0.mlp.down_proj.weight"].shape[1] == 192 // shards
        assert part.functions["decode"].op_counts()["all_reduce"] == 4  # o and down projections of two layers
    reference, caches = _cache(module), [_cache(part) for part in parts]
    for function, inputs in _steps(IDS):
        rows = len(inputs["positions"])
        reference.begin_forward([0], [rows])
        (expected,) = run(module, function, {**inputs, "kv_cache": reference})
        for cache in caches:
            cache.begin_forward([0], [rows])
        outputs = run_sharded([part.functions[function] for part in parts],
                              [{**inputs, "kv_cache": cache} for cache in caches], [part.weights for part in parts])
        for (logits,) in outputs:
            np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)


def test_a_bias_of_a_row_parallel_matmul_counts_once():
    config = transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.bias = torch.nn.Parameter(torch.randn(64))
        for projection in ("q_proj", "k_proj", "v_proj"):
            getattr(model.model.layers[0].self_attn, projection).bias.normal_(0, 0.5)
    module = lower_kv_cache(import_torch_model(model))
    parts = shard_module(module, 2)
    bias = "model.layers.0.self_attn.o_proj.bias"
    np.testing.assert_array_equal(parts[0].weights[bias], module.weights[bias])
    assert not parts[1].weights[bias].any()
    function, inputs = _steps(IDS)[0]
    reference, caches = _cache(module), [_cache(part) for part in parts]
    for cache in [reference, *caches]:
        cache.begin_forward([0], [len(inputs["positions"])])
    (expected,) = run(module, function, {**inputs, "kv_cache": reference})
    outputs = run_sharded([part.functions[function] for part in parts], [{**inputs, "kv_cache": c} for c in caches],
                          [part.weights for part in parts])
    for (logits,) in outputs:
        np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("heads, kv_heads, hidden, intermediate, shards, message", [
    (12, 6, 192, 192, 4, "the model's 6 key/value heads (and 12 query heads) do not split evenly over 4 shards"),
    (6, 6, 96, 160, 3, "has 160 channels, which do not split evenly over 3 shards"),
])
def test_a_model_that_does_not_split_evenly_is_refused(heads, kv_heads, hidden, intermediate, shards, message):
    module = lower_kv_cache(import_torch_model(_llama(heads, kv_heads, hidden, intermediate, layers=1)))
    with pytest.raises(ShardingError, match=re.escape(message)):
        shard_module(module, shards)


def test_a_shard_alone_is_never_run_on_a_partial_sum(lowered):
    part = shard_module(lowered("mha"), 2)[0]
    function, inputs = _steps(IDS)[0]
    cache = _cache(part)
    cache.begin_forward([0], [len(inputs["positions"])])
    with pytest.raises(IRError, match="sums a value over 2 shards"):
        run(part, function, {**inputs, "kv_cache": cache})


def test_tensor_parallel_packages_are_for_cuda_only(tmp_path):
    from llmc.compiler import compile_model
    from llmc.passes.pipeline import PassOptions

    with pytest.raises(llmc.LlmcError, match="target cpu does not run tensor parallelism's all_reduce"):
        compile_model(_llama(8, 4, 128, 128, layers=1), tmp_path / "pkg", options=PassOptions(tensor_parallel=2))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not installed")
def test_a_cuda_package_holds_a_package_per_shard_that_the_runtime_refuses_to_run(tmp_path):
    from llmc.compiler import compile_model
    from llmc.inspection import describe, load_ir
    from llmc.passes.pipeline import PassOptions

    package = compile_model(_llama(8, 4, 128, 128, layers=1), tmp_path / "pkg", targets=["cuda"],
                            options=PassOptions("f32", tensor_parallel=2))
    for shard in ("shard-0", "shard-1"):
        assert b"runtime.disco.allreduce" in (package / shard / "lib-cuda.so").read_bytes()
    assert "tensor parallel: shard 0 of 2" in describe(load_ir(str(package)))
    for path in (package, package / "shard-1"):
        with pytest.raises(PackageError, match="is a tensor-parallel package of 2 shards"):
            llmc.load(str(path), device="cuda")
