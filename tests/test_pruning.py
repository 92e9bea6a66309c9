"""Pruning passes: removing nothing is the identity; removing layers, KV groups or MLP channels computes
exactly what the unpruned graph computes with those parts zeroed (and, for heads and channels, their
mean contribution added as a bias; so GQA groups go whole, with their query heads); the most important
parts stay; a compiled pruned package computes its graph; a source format survives the cut; and requests
the model cannot meet are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import llmc
from llmc.frontend.torch_export import import_torch_model
from llmc.ir import KVCacheType, ReferenceKVCache, run
from llmc.ir.quant_formats import dequantize, quantize
from llmc.passes.kv_cache_lowering import lower_kv_cache
from llmc.passes.prune_heads import prune_heads
from llmc.passes.decoder_structure import StructureError, layer_of
from llmc.passes.prune_layers import prune_layers
from llmc.passes.prune_mlp import prune_mlp
from llmc.passes.pruning_importance import Importance, measure_importance
from llmc.passes.pruning_options import Amount, Pruning, PruningError
from llmc.passes.quantize import SourceWeight, _fitted
from llmc.passes.slice_weights import slice_weights
from tiny_models import build_tiny, save_chat_tokenizer

TOL = 1e-5
IDS = np.random.default_rng(11).integers(0, 512, 24)


def _prefill(module, ids=IDS) -> np.ndarray:
    """Logits of every position, from one prefill over the reference KV cache."""
    fields = {k: v for k, v in module.metadata["kv_cache"].items() if k != "bytes_per_token"}
    cache = ReferenceKVCache(KVCacheType(**fields))
    cache.add_sequence(0)
    cache.begin_forward([0], [len(ids)])
    (logits,) = run(module, "prefill", {"input_ids": ids[None], "positions": np.arange(len(ids)),
                                        "logit_rows": np.arange(len(ids)), "kv_cache": cache})
    return logits


def _zeroed(module, columns: dict[str, np.ndarray], importance: Importance | None = None):
    """`module` with the given input columns of weights set to zero and, given `importance`, the columns' mean
    contribution added to the weights' biases."""
    weights = dict(module.weights)
    for name, removed in columns.items():
        weights[name] = weights[name].copy()
        weights[name][:, removed] = 0
    zeroed = type(module)(module.functions, weights, module.metadata)
    if importance is None:
        return zeroed
    biases = {name: importance.compensation(name, module.weights[name], removed) for name, removed in columns.items()}
    return slice_weights(zeroed, {}, {}, {}, module.metadata, "test", biases)


@pytest.fixture(scope="module")
def measured():
    """name -> (the imported tiny model, its importance on random tokens, the KV-lowered module)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            module = import_torch_model(build_tiny(name))
            cache[name] = (module, measure_importance(module, IDS), lower_kv_cache(module))
        return cache[name]
    return get


def test_removing_nothing_is_the_identity(measured):
    module, importance, lowered = measured("qwen2_untied")
    (expected,) = run(module, "forward", {"input_ids": IDS[None]})
    (same,) = run(prune_layers(module, importance.influence, Amount(0)), "forward", {"input_ids": IDS[None]})
    np.testing.assert_array_equal(same, expected)
    lowered_logits = _prefill(lowered)
    for prune in (prune_heads, prune_mlp):
        kept = prune(lowered, importance, Amount(0))
        assert all(kept.weights[name].shape == lowered.weights[name].shape for name in lowered.weights)
        np.testing.assert_array_equal(_prefill(kept), lowered_logits)


def test_a_removed_layer_computes_as_its_zeroed_branches(measured):
    module, importance, _ = measured("llama_gqa_untied")
    pruned = prune_layers(module, importance.influence, Amount(1))
    (layer,) = pruned.metadata["pruning"]["layers"]["removed"]
    assert not any(layer_of(name) == layer for name in pruned.weights)
    outputs = {name: np.arange(w.shape[1]) for name, w in module.weights.items()
               if layer_of(name) == layer and name.endswith(("o_proj.weight", "down_proj.weight"))}
    (expected,) = run(_zeroed(module, outputs), "forward", {"input_ids": IDS[None]})
    (logits,) = run(pruned, "forward", {"input_ids": IDS[None]})
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)
    assert lower_kv_cache(pruned).metadata["kv_cache"]["num_layers"] == 1


def test_the_least_influential_layers_go():
    module = import_torch_model(build_tiny("llama_gqa_tied"))
    for influence, removed in (({0: 0.9, 1: 0.1}, [1]), ({0: 0.1, 1: 0.9}, [0])):
        assert prune_layers(module, influence, Amount(1)).metadata["pruning"]["layers"]["removed"] == removed


@pytest.mark.parametrize("name, amount, kept_heads", [("llama_gqa_untied", Amount(1), (2, 1)),
                                                      ("qwen2_tied", Amount(0.5, share=True), (2, 1)),
                                                      ("llama_mha_untied", Amount(0.5, share=True), (2, 2))])
def test_removed_kv_groups_compute_as_their_zeroed_heads(measured, name, amount, kept_heads):
    """A KV group goes with exactly its query heads: the pruned model equals the unpruned one whose output
    projections take those heads' mean instead (were a query head left reading another group's keys, it would
    not)."""
    _, importance, lowered = measured(name)
    pruned = prune_heads(lowered, importance, amount)
    cache = pruned.metadata["kv_cache"]
    assert (cache["num_q_heads"], cache["num_kv_heads"]) == kept_heads
    per_group, dim = 4 // lowered.metadata["kv_cache"]["num_kv_heads"], 16
    columns = {}
    for layer, groups in pruned.metadata["pruning"]["heads"]["removed"].items():
        heads = [g * per_group + h for g in groups for h in range(per_group)]
        columns[f"model.layers.{layer}.self_attn.o_proj.weight"] = np.concatenate(
            [np.arange(h * dim, (h + 1) * dim) for h in heads])
        assert pruned.weights[f"model.layers.{layer}.self_attn.q_proj.weight"].shape == (kept_heads[0] * dim, 64)
        assert pruned.weights[f"model.layers.{layer}.self_attn.k_proj.weight"].shape == (kept_heads[1] * dim, 64)
    np.testing.assert_allclose(_prefill(pruned), _prefill(_zeroed(lowered, columns, importance)), atol=TOL, rtol=0)


def test_removed_mlp_channels_compute_as_zeroed_channels(measured):
    _, importance, lowered = measured("mistral_untied")
    pruned = prune_mlp(lowered, importance, Amount(0.25, share=True))
    columns = {}
    for layer in (0, 1):
        down = f"model.layers.{layer}.mlp.down_proj.weight"
        assert pruned.weights[down].shape == (64, 96)
        assert pruned.weights[f"model.layers.{layer}.mlp.gate_proj.weight"].shape == (96, 64)
        kept = [np.flatnonzero((lowered.weights[down] == column[:, None]).all(axis=0))[0]
                for column in pruned.weights[down].T]
        columns[down] = np.setdiff1d(np.arange(128), kept)
        scores = importance.channel_scores(down, lowered.weights[down])
        assert scores[columns[down]].max() <= scores[kept].min()
    np.testing.assert_allclose(_prefill(pruned), _prefill(_zeroed(lowered, columns, importance)), atol=TOL, rtol=0)


def test_pruning_runs_before_quantization_and_composes_with_it(measured):
    from llmc.passes.pipeline import PassOptions, passes

    module, importance, _ = measured("llama_gqa_tied")
    results = {}
    for quantization in ("f32", "q4"):
        pruned = module
        for _, step in passes(PassOptions(quantization, prune=Pruning.parse("layers=1,heads=1,mlp=32")), None,
                              importance):
            pruned = step(pruned)
        results[quantization] = _prefill(pruned)
    assert "model.layers.0.mlp.down_proj.weight.codes" in pruned.weights or \
        "model.layers.1.mlp.down_proj.weight.codes" in pruned.weights
    scale = np.abs(results["f32"]).max()
    assert np.abs(results["q4"] - results["f32"]).max() / scale < 0.3


def test_a_pruned_package_computes_its_graph(tmp_path):
    """The compiled package's logits equal the interpreter's on the package's own (pruned, fused) graph; inspect
    says what was removed."""
    from llmc.compiler import compile_model
    from llmc.inspection import describe, load_ir
    from llmc.passes.pipeline import PassOptions

    save_chat_tokenizer(tmp_path / "tokenizer")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    options = PassOptions("f32", prune=Pruning.parse("layers=1,heads=1,mlp=25%"))
    package = compile_model(model, tmp_path / "pkg", options=options, tokenizer=tmp_path / "tokenizer")
    module = load_ir(str(package))
    logits = llmc.load(str(package)).forward(IDS)
    expected = _prefill(module)
    assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-4
    summary = describe(module)
    assert "decoder layers: 1 of 3 removed" in summary
    assert "1 of 2 KV groups removed per layer (4 -> 2 query heads, 2 -> 1 key/value heads)" in summary
    assert "128 -> 96 (25.0% removed) in 2 MLPs" in summary


def test_a_source_format_survives_the_cut():
    """A Q4_1 source cut by rows, or by whole groups of columns, keeps its codes; 16-bit values stay exact."""
    weight = np.random.default_rng(2).normal(size=(8, 128)).astype(np.float32)
    source = quantize(weight, 4)
    values = dequantize(source.codes, source.scales, source.mins, 4)
    rows = _fitted(SourceWeight("Q4_1", source), values[[1, 5, 6]])
    np.testing.assert_array_equal(rows.data.codes, source.codes[[1, 5, 6]])
    columns = _fitted(SourceWeight("Q4_1", source), np.delete(values, np.s_[32:64], axis=1))
    np.testing.assert_array_equal(columns.data.codes, np.delete(source.codes, np.s_[16:32], axis=1))
    half = weight.astype(np.float16)
    cut = _fitted(SourceWeight("F16", half), half.astype(np.float32)[:, :96])
    np.testing.assert_array_equal(cut.data, half[:, :96])


@pytest.mark.parametrize("text, message", [
    ("layers=2", "cannot remove 2 of the model's 2 decoder layers"),
    ("heads=2", "cannot remove 2 of the model's 2 KV groups of heads per layer"),
    ("mlp=128", "cannot remove 128 of the model's 128 MLP channels per layer"),
    ("mlp=120", "removing whole groups of 32 channels leaves none of the 128"),
])
def test_removing_more_than_exists_is_refused(measured, text, message):
    from llmc.passes.pipeline import PassOptions, passes

    module, importance, _ = measured("llama_gqa_tied")
    with pytest.raises(PruningError, match=message):
        for _, step in passes(PassOptions("f32", prune=Pruning.parse(text)), None, importance):
            module = step(module)


@pytest.mark.parametrize("text, message", [
    ("depth=2", "llmc prunes layers, heads, mlp"), ("layers=two", "give a count"),
    ("mlp=1.5", "a share below 1"), ("mlp=-3", "at least 0"), ("mlp=nan%", "a share below 1"),
    ("layers=1,layers=2", "names layers twice"),
])
def test_malformed_requests_are_refused(text, message):
    with pytest.raises(PruningError, match=message):
        Pruning.parse(text)


def test_fused_attention_projections_are_refused_by_head_pruning():
    config = transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    module = import_torch_model(transformers.GPT2LMHeadModel(config).eval())
    importance = measure_importance(module, IDS)
    with pytest.raises(StructureError, match="one fused projection"):
        prune_heads(lower_kv_cache(module), importance, Amount(1))


def test_pruning_without_a_tokenizer_is_refused(tmp_path):
    from llmc.compiler import compile_model
    from llmc.passes.pipeline import PassOptions

    with pytest.raises(PruningError, match="needs the model's tokenizer"):
        compile_model(build_tiny("llama_gqa_tied"), tmp_path / "pkg",
                      options=PassOptions(prune=Pruning.parse("layers=1")))


def test_importance_is_measured_on_every_layer_and_matmul(measured):
    module, importance, _ = measured("llama_gqa_tied")
    assert isinstance(importance, Importance) and sorted(importance.influence) == [0, 1]
    assert all(0 <= value <= 2 for value in importance.influence.values())
    linears = {n.inputs[1].attrs["weight"] for n in module.functions["forward"].nodes if n.op == "linear"}
    assert set(importance.inputs) == linears


def test_channel_statistics_are_those_of_the_matmul_inputs(measured):
    from llmc.ir import run_graph

    module, importance, _ = measured("llama_gqa_tied")
    graph = module.functions["forward"]
    down = next(n for n in graph.nodes
                if n.op == "linear" and n.inputs[1].attrs["weight"] == "model.layers.0.mlp.down_proj.weight")
    seen = {}
    run_graph(graph, {"input_ids": IDS[None]}, module.weights,
              lambda node, value: seen.setdefault("x", value) if node is down.inputs[0] else None)
    rows = seen["x"].reshape(-1, seen["x"].shape[-1]).astype(np.float64)
    stats = importance.inputs["model.layers.0.mlp.down_proj.weight"]
    np.testing.assert_allclose(stats.mean, rows.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.variance, rows.var(0), rtol=1e-5, atol=1e-9)
