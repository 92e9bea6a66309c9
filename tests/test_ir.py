"""The IR itself: types and symbolic dims, op type rules and references, verifier,
printer, serialized form, interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc.ir import (Graph, GraphBuilder, IRError, Module, Node, TensorType, module_from_json, module_to_json,
                     print_module, run, run_graph, verify_graph, verify_module)
from llmc.ir import dims as D
from llmc.ir.types import KVCacheType, parse_type

SEQ = D.symbol("seq")


def test_symbolic_dims_divide_and_compare():
    assert D.equal(SEQ * 9, 9 * SEQ)
    assert D.divide_exact(576 * SEQ, 64 * SEQ) == 9
    assert D.divide_exact(SEQ * 4, 2) == 2 * SEQ
    with pytest.raises(ValueError):
        D.divide_exact(SEQ, 2)
    assert D.evaluate(SEQ + 1, {"seq": 6}) == 7
    assert D.parse(D.to_text(SEQ * 3 + 1)) == SEQ * 3 + 1


def test_types_print_and_parse():
    t = TensorType((1, SEQ, 576), "float32")
    assert str(t) == "f32[1, seq, 576]"
    assert parse_type(str(t)) == t
    for cache in (KVCacheType(30, 9, 3, 64, "float32"), KVCacheType(26, 8, 4, 256, "float32", "q8", softcap=50.0)):
        assert parse_type(str(cache)) == cache


def _mlp_graph() -> Module:
    b = GraphBuilder()
    x = b.input("x", TensorType((1, SEQ, 8), "float32"))
    w = b.param("w", TensorType((16, 8), "float32"))
    h = b.op("linear", [x, w, None, None])
    y = b.op("silu", [h])
    s = b.op("reshape", [y], {"shape": [1, SEQ, 4, -1]})
    out = b.op("softmax", [s], {"axis": -1})
    weights = {"w": np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)}
    return Module({"forward": Graph("forward", [x], [out])}, weights)


def test_type_inference_keeps_symbols_and_resolves_minus_one():
    module = _mlp_graph()
    out = module.functions["forward"].outputs[0]
    assert str(out.type) == "f32[1, seq, 4, 4]"


def test_interpreter_matches_torch_and_binds_symbols():
    module = _mlp_graph()
    x = np.random.default_rng(1).standard_normal((1, 5, 8)).astype(np.float32)
    (out,) = run(module, "forward", {"x": x})
    expected = torch.nn.functional.silu(torch.tensor(x) @ torch.tensor(module.weights["w"]).T)
    expected = torch.softmax(expected.reshape(1, 5, 4, 4), -1).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_interpreter_rejects_inputs_of_the_wrong_shape():
    module = _mlp_graph()
    with pytest.raises(IRError, match="rank 3"):
        run(module, "forward", {"x": np.zeros((5, 8), np.float32)})


def test_ops_refuse_bad_types():
    b = GraphBuilder()
    x = b.input("x", TensorType((2, 3), "float32"))
    y = b.input("y", TensorType((4, 3), "float32"))
    i = b.input("i", TensorType((2, 3), "int64"))
    with pytest.raises(IRError, match="do not broadcast"):
        b.op("add", [x, y])
    with pytest.raises(IRError, match="share one dtype"):
        b.op("add", [x, i])
    with pytest.raises(IRError, match="cannot reshape"):
        b.op("reshape", [x], {"shape": [4, -1]})
    with pytest.raises(IRError, match="needs attribute"):
        b.op("softmax", [x])


def test_attention_reference_matches_torch_sdpa_with_gqa():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 4, 6, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    b = GraphBuilder()
    nodes = [b.input(n, TensorType(a.shape, "float32")) for n, a in (("q", q), ("k", k), ("v", v))]
    out = b.op("attention", nodes + [None], {"causal": True})
    (result,) = run_graph(Graph("f", nodes, [out]), {"q": q, "k": k, "v": v}, {})
    expected = torch.nn.functional.scaled_dot_product_attention(
        torch.tensor(q), torch.tensor(k), torch.tensor(v), is_causal=True, enable_gqa=True).numpy()
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_verifier_catches_stale_types_and_unknown_weights():
    module = _mlp_graph()
    graph = module.functions["forward"]
    linear = next(n for n in graph.nodes if n.op == "linear")
    linear.type = TensorType((1, SEQ, 17), "float32")
    with pytest.raises(IRError, match="stored type"):
        verify_graph(graph)
    module = _mlp_graph()
    module.weights = {}
    with pytest.raises(IRError, match="does not have"):
        verify_module(module)


def test_verifier_catches_use_before_definition():
    b = GraphBuilder()
    x = b.input("x", TensorType((2,), "float32"))
    y = b.op("exp", [x])
    graph = Graph("f", [x], [y])
    graph.nodes.reverse()
    with pytest.raises(IRError):
        verify_graph(graph)


def test_graph_with_a_cycle_is_refused():
    b = GraphBuilder()
    x = b.input("x", TensorType((2,), "float32"))
    y = b.op("exp", [x])
    z = b.op("negative", [y])
    y.inputs = (z,)
    with pytest.raises(IRError, match="cycle"):
        Graph("f", [x], [z])


def test_serialized_form_round_trips_to_an_identical_printout():
    module = _mlp_graph()
    text = module_to_json(module)
    again = module_from_json(text, module.weights)
    assert print_module(again) == print_module(module)
    assert module_to_json(again) == text


def test_serialized_form_refuses_another_version():
    text = module_to_json(_mlp_graph()).replace('"llmc_ir_version": 1', '"llmc_ir_version": 99')
    with pytest.raises(IRError, match="version 99"):
        module_from_json(text, {})


def test_printer_shows_weights_by_reference():
    text = print_module(_mlp_graph())
    assert "param @w : f32[16, 8]" in text
    assert "linear(%x, @w, none, none)" in text


def test_node_names_are_unique():
    b = GraphBuilder()
    x = b.input("x", TensorType((2,), "float32"))
    first, second = b.op("exp", [x], name="e"), b.op("exp", [x], name="e")
    assert first.name != second.name
    assert isinstance(first, Node)
