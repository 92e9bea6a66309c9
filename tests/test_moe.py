"""Mixture-of-experts models: top-k routing, with each token's chosen experts' weights gathered by index.

Token-exactness against transformers for every MoE family is in tests/test_architectures.py (Mixtral, Qwen2-MoE,
OLMoE, ...). This file checks what that cannot see: that decode reads only the chosen experts' weights, and the
routing op itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import llmc
from llmc.compiler import compile_model
from llmc.frontend.torch_export import import_torch_model
from llmc.ir import Graph, IRError, KVCacheType, LlmcError, Node, ReferenceKVCache, TensorType, dims, ops, run
from llmc.passes.pipeline import PassOptions, run_pipeline

EXPERTS, CHOSEN = 4, 2


@pytest.fixture(scope="module")
def tiny_mixtral() -> torch.nn.Module:
    config = transformers.MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        num_local_experts=EXPERTS, num_experts_per_tok=CHOSEN)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _source_ops(node: Node) -> set[str]:
    """The ops that `node`'s value is computed from, through any reshapes and casts."""
    seen, stack, found = set(), [node], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.add(current.op)
        stack.extend(n for n in current.inputs if n is not None)
    return found


# Each op that reads an expert weight -> the position of its indices: f32 weights are read in place by
# expert_linear, 16-bit and quantized ones gathered (then dequantized) by index.
GATHERS = {"expert_linear": 2, "index": 1, "take": 1, "quantized_take": 3}


def expert_weight_reads(graph: Graph) -> dict[str, list[Node]]:
    """Each expert weight (a parameter with one leading slice per expert: the weight, or its codes, scales and
    minimums) -> the nodes that read it."""
    users = graph.users()
    return {param.name: users[id(param)] for param in graph.params() if ".experts." in param.name}


@pytest.mark.parametrize("quantization, arrays_per_weight, reader", [("f32", 1, "expert_linear"), ("f16", 1, "take"),
                                                                    ("q4", 3, "quantized_take"),
                                                                    ("q8", 2, "quantized_take")])
def test_decode_reads_only_the_chosen_experts_weights(tiny_mixtral, quantization, arrays_per_weight, reader):
    """In the decode step every expert weight, in each format, is read only by a gather whose indices come from
    the router's top-k: the chosen experts' slices, CHOSEN of EXPERTS per token, not the whole weight."""
    (module,) = run_pipeline(import_torch_model(tiny_mixtral, 256), PassOptions(quantization))
    reads = expert_weight_reads(module.functions["decode"])
    assert len(reads) == 2 * 2 * arrays_per_weight  # gate_up and down, in each of the 2 layers
    for name, readers in reads.items():
        assert [r.op for r in readers] == [reader], f"{name} is read by {readers}"
        indices = readers[0].inputs[GATHERS[readers[0].op]]
        assert "topk" in _source_ops(indices), f"{name} is indexed by something other than the router"
        slices_read = dims.product(indices.type.shape)
        assert dims.evaluate(slices_read, {"batch": 1}) == CHOSEN  # per sequence of the decode batch


def test_quantized_experts_compile_to_what_the_interpreter_computes(tiny_mixtral, tmp_path):
    """q4 experts, gathered and dequantized by the compiled library, give the interpreter's logits for a
    prefill of the quantized graph (a prefill's matmuls keep float activations, so the two agree closely)."""
    (module,) = run_pipeline(import_torch_model(tiny_mixtral, 256), PassOptions("q4"))
    ids = np.random.default_rng(5).integers(0, 512, 12)
    fields = {k: v for k, v in module.metadata["kv_cache"].items() if k != "bytes_per_token"}
    cache = ReferenceKVCache(KVCacheType(**fields))
    cache.add_sequence(0)
    cache.begin_forward([0], [len(ids)])
    (expected,) = run(module, "prefill", {"input_ids": ids[None], "positions": np.arange(len(ids)),
                                          "logit_rows": np.arange(len(ids)), "kv_cache": cache})
    engine = llmc.load(compile_model(tiny_mixtral, tmp_path / "pkg", options=PassOptions("q4")))
    got = engine.model.score(ids.tolist())
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_the_vulkan_target_refuses_expert_routing_at_compile_time(tiny_mixtral, tmp_path):
    with pytest.raises(LlmcError, match=r"target vulkan does not run mixture-of-experts routing .top-k.*: node %topk"):
        compile_model(tiny_mixtral, tmp_path / "pkg", targets=["vulkan"])


def test_topk_keeps_the_largest_first_and_ties_in_order():
    x = np.array([[0.1, 0.7, 0.2, 0.7], [3.0, -1.0, 2.0, 0.0]], np.float32)
    topk = ops.get("topk")
    values = topk.reference([x], {"k": 2, "axis": -1, "output": "values"}, (2, 2))
    indices = topk.reference([x], {"k": 2, "axis": -1, "output": "indices"}, (2, 2))
    np.testing.assert_array_equal(indices, [[1, 3], [0, 2]])
    np.testing.assert_array_equal(values, np.array([[0.7, 0.7], [3.0, 2.0]], np.float32))
    assert topk.infer([TensorType(("seq", 4), "float32")], {"k": 2, "axis": -1, "output": "indices"}) == \
        TensorType(("seq", 2), "int64")


@pytest.mark.parametrize("k, message", [(5, "k must be an integer from 1 to the axis' size 4"),
                                        (0, "k must be an integer from 1")])
def test_topk_refuses_a_k_the_axis_cannot_give(k, message):
    with pytest.raises(IRError, match=message):
        ops.get("topk").infer([TensorType(("seq", 4), "float32")], {"k": k, "axis": -1, "output": "values"})
