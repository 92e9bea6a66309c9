"""Passes, each checked by running the IR interpreter before and after on random inputs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from llmc.frontend.torch_export import import_torch_model
from llmc.ir import GraphBuilder, Graph, KVCacheType, Module, ReferenceKVCache, TensorType, run, run_graph
from llmc.ir import dims as D
from llmc.passes import attention_patterns
from llmc.passes.kv_cache_lowering import KVCacheLoweringError, lower_kv_cache
from llmc.passes.rewrite import Rule, RewriteLimitError, match, op, rewrite, var
from tiny_models import GEMMA2_MODEL, build_tiny

TOL = 1e-5


def test_rewrite_applies_rules_until_nothing_changes():
    b = GraphBuilder()
    x = b.input("x", TensorType((4,), "float32"))
    y = b.op("negative", [b.op("negative", [b.op("negative", [b.op("negative", [x])])])])
    double_negation = Rule("double negation", op("negative", op("negative", var("x"))), lambda _, m: m["x"])
    result = rewrite(Graph("f", [x], [y]), [double_negation])
    assert result.outputs[0] is x


def test_rewrite_logs_the_rules_that_fired(caplog):
    b = GraphBuilder()
    x = b.input("x", TensorType((4,), "float32"))
    y = b.op("negative", [b.op("negative", [b.op("negative", [b.op("negative", [x])])])])
    double_negation = Rule("double negation", op("negative", op("negative", var("x"))), lambda _, m: m["x"])
    with caplog.at_level(logging.DEBUG, logger="llmc.passes"):
        rewrite(Graph("f", [x], [y]), [double_negation])
    assert "f: double negation x2" in caplog.text


def test_rules_that_never_settle_are_an_error_not_a_half_rewritten_graph():
    b = GraphBuilder()
    x = b.input("x", TensorType((4,), "float32"))
    renew = Rule("renew", op("negative", var("x")), lambda builder, m: builder.op("negative", [m["x"]]))
    with pytest.raises(RewriteLimitError, match="rewriting f did not settle in 8 rounds .rules fired: renew."):
        rewrite(Graph("f", [x], [b.op("negative", [x])]), [renew])


def test_patterns_match_commutative_operands():
    b = GraphBuilder()
    x = b.input("x", TensorType((4,), "float32"))
    two = b.op("constant", [], {"value": 2.0, "dtype": "float32"})
    product = b.op("multiply", [two, x])
    assert match(var("x") * 2.0, product)["x"] is x


def _kv_reference(module, seq_ids=(0,)):
    fields = {k: v for k, v in module.metadata["kv_cache"].items() if k != "bytes_per_token"}
    cache = ReferenceKVCache(KVCacheType(**fields))
    for s in seq_ids:
        cache.add_sequence(s)
    return cache


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_tied", "mistral_untied", GEMMA2_MODEL])
def test_kv_lowering_keeps_the_logits(name):
    model = build_tiny(name)
    module = import_torch_model(model)
    lowered = lower_kv_cache(module)
    # Mistral's config slides a window of 4096 in every layer, Gemma 2's of 8 every other layer (and caps scores).
    cache = lowered.metadata["kv_cache"]
    softcap, window, windowed = {GEMMA2_MODEL: (1.0, 8, [True, False]),
                                 "mistral_untied": (None, 4096, [True, True])}.get(name, (None, None, [False, False]))
    assert (cache["softcap"], cache["window"]) == (softcap, window)
    assert [n.attrs["windowed"] for n in lowered.functions["prefill"].nodes if n.op == "paged_attention"] == windowed
    ids = np.random.default_rng(3).integers(0, 512, (1, 13))
    (expected,) = run(module, "forward", {"input_ids": ids})
    cache = _kv_reference(lowered)
    pieces = []
    for start, end in ((0, 5), (5, 12)):
        cache.begin_forward([0], [end - start])
        (logits,) = run(lowered, "prefill", {"input_ids": ids[:, start:end], "positions": np.arange(start, end),
                                             "logit_rows": np.arange(end - start), "kv_cache": cache})
        pieces.append(logits)
    cache.begin_forward([0], [1])
    (last,) = run(lowered, "decode", {"input_ids": ids[:, 12:], "positions": np.array([12]), "kv_cache": cache})
    pieces.append(last)
    np.testing.assert_allclose(np.concatenate(pieces), expected[0], atol=TOL, rtol=0)


def test_kv_lowering_batches_sequences_of_different_lengths():
    module = import_torch_model(build_tiny("llama_gqa_tied"))
    lowered = lower_kv_cache(module)
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 512, (1, 6)), rng.integers(0, 512, (1, 9))
    cache = _kv_reference(lowered, seq_ids=(0, 1))
    cache.begin_forward([0, 1], [6, 9])
    (rows,) = run(lowered, "prefill", {"input_ids": np.concatenate([a, b], 1),
                                       "positions": np.concatenate([np.arange(6), np.arange(9)]),
                                       "logit_rows": np.array([5, 14]), "kv_cache": cache})
    np.testing.assert_allclose(rows[0], run(module, "forward", {"input_ids": a})[0][0, -1], atol=TOL, rtol=0)
    np.testing.assert_allclose(rows[1], run(module, "forward", {"input_ids": b})[0][0, -1], atol=TOL, rtol=0)


def test_kv_lowering_types_name_batch_for_decode():
    lowered = lower_kv_cache(import_torch_model(build_tiny("llama_mha_tied")))
    assert set(lowered.functions) == {"prefill", "decode"}
    decode = lowered.functions["decode"]
    assert [str(n.type) for n in decode.inputs[:2]] == ["i64[1, batch]", "i64[batch]"]
    assert str(decode.outputs[0].type) == "f32[batch, 512]"
    prefill = lowered.functions["prefill"]
    assert str(prefill.outputs[0].type) == "f32[rows, 512]"
    assert lowered.metadata["kv_cache"]["num_kv_heads"] == 4


def test_attention_written_out_eagerly_is_recognised():
    model = build_tiny("llama_gqa_untied", attn_implementation="eager")
    module = import_torch_model(model)
    assert "attention" not in module.functions["forward"].op_counts()
    lowered = lower_kv_cache(module)
    assert lowered.functions["decode"].op_counts()["paged_attention"] == 2


class BidirectionalAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, input_ids):
        x = self.embed(input_ids).reshape(1, -1, 2, 8).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(x, x, x)
        return self.head(y.transpose(1, 2).reshape(1, -1, 16))


def test_non_causal_attention_is_refused_with_its_node():
    module = import_torch_model(BidirectionalAttention())
    with pytest.raises(KVCacheLoweringError, match="not the causal mask|scaled_dot_product_attention"):
        lower_kv_cache(module)


def test_model_without_attention_is_refused():
    class NoAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(32, 16)

        def forward(self, input_ids):
            return self.embed(input_ids)

    with pytest.raises(KVCacheLoweringError, match="no attention"):
        lower_kv_cache(import_torch_model(NoAttention()))


class CausalWithExtra(torch.nn.Module):
    """Causal self-attention, then `extra` applied to the hidden states (batch 1, seq, 16)."""

    def __init__(self, extra):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.head = torch.nn.Linear(16, 32)
        self.extra = extra

    def forward(self, input_ids):
        x = self.embed(input_ids).reshape(1, -1, 2, 8).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
        return self.head(self.extra(y.transpose(1, 2).reshape(1, -1, 16)))


@pytest.mark.parametrize("extra, what", [
    (lambda h: h.cumsum(dim=1), "cumsum along the sequence axis"),
    (lambda h: h - h.mean(dim=1, keepdim=True), "mean over the sequence axis"),
    (lambda h: torch.cat([h[:, :1] * 0, h], dim=1)[:, :h.shape[1]], "slice of the sequence axis"),
])
def test_a_model_that_mixes_tokens_outside_attention_is_refused(extra, what):
    """Packed steps run every op but attention per token; a model that combines tokens elsewhere (a running sum,
    a mean over the sequence, a token shift) would decode wrongly, so the lowering names the node and refuses."""
    with pytest.raises(KVCacheLoweringError, match=f"does .*{what}.*combines tokens outside attention"):
        lower_kv_cache(import_torch_model(CausalWithExtra(extra)))


def test_positions_counted_by_a_cumulative_sum_become_the_positions_input():
    """OPT numbers its positions as cumsum(ones) - 1; the lowered graph takes them from the positions input, so a
    token decoded alone gets its own position (it once got position 0 and decoded wrong tokens)."""
    table = torch.nn.Embedding(64, 16)

    def add_positions(h):
        positions = torch.ones(1, h.shape[1]).cumsum(dim=1).long() - 1
        return h + table(positions)

    model = CausalWithExtra(add_positions)
    model.table = table
    module = import_torch_model(model)
    lowered = lower_kv_cache(module)
    assert "cumsum" not in lowered.functions["decode"].op_counts()
    ids = np.array([[3, 9, 4, 20, 7]])
    (expected,) = run(module, "forward", {"input_ids": ids})
    cache = _kv_reference(lowered)
    cache.begin_forward([0], [4])
    run(lowered, "prefill", {"input_ids": ids[:, :4], "positions": np.arange(4), "logit_rows": np.arange(4),
                             "kv_cache": cache})
    cache.begin_forward([0], [1])
    (last,) = run(lowered, "decode", {"input_ids": ids[:, 4:], "positions": np.array([4]), "kv_cache": cache})
    np.testing.assert_allclose(last[0], expected[0, 4], atol=TOL, rtol=0)


def _assert_prefill_and_decode_keep_the_forward_logits(module, lowered, length: int) -> None:
    """Prefill of `length - 1` tokens, then one decode, over the reference cache give the forward's logits."""
    ids = np.random.default_rng(4).integers(0, 512, (1, length))
    (expected,) = run(module, "forward", {"input_ids": ids})
    cache = _kv_reference(lowered)
    cache.begin_forward([0], [length - 1])
    (logits,) = run(lowered, "prefill", {"input_ids": ids[:, :-1], "positions": np.arange(length - 1),
                                         "logit_rows": np.arange(length - 1), "kv_cache": cache})
    cache.begin_forward([0], [1])
    (last,) = run(lowered, "decode", {"input_ids": ids[:, -1:], "positions": np.array([length - 1]),
                                      "kv_cache": cache})
    np.testing.assert_allclose(np.concatenate([logits, last]), expected[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("context, window", [(32, None), (256, 32)])
def test_a_sliding_window_shorter_than_the_context_is_attended(context, window):
    """Mistral's mask with a 32-token window is causal for 32 tokens: within a 32-token context the window never
    binds; in a longer one the lowering finds it, marks the layers windowed and gives the cache the window, and
    prefill and decode past it keep the logits of the whole-sequence forward."""
    import transformers

    config = transformers.MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        sliding_window=32, initializer_range=0.2)
    torch.manual_seed(4)
    module = import_torch_model(transformers.AutoModelForCausalLM.from_config(config).eval(), context)
    lowered = lower_kv_cache(module)
    assert lowered.metadata["kv_cache"]["window"] == window
    if window is not None:
        _assert_prefill_and_decode_keep_the_forward_logits(module, lowered, 45)


def test_a_window_kept_in_a_buffer_is_found_at_the_context_length():
    """GPT-Neo's local layers keep their 20-token window in a boolean buffer, applied with `where` before the
    additive mask: no constant in the mask's graph tells its size, and no short probe reaches it, so the probe at
    the context's length finds it."""
    import transformers

    config = transformers.GPTNeoConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                                       max_position_embeddings=64, attention_types=[[["global", "local"], 1]],
                                       window_size=20, initializer_range=0.2)
    torch.manual_seed(4)
    module = import_torch_model(transformers.AutoModelForCausalLM.from_config(config).eval(), 64)
    lowered = lower_kv_cache(module)
    assert lowered.metadata["kv_cache"]["window"] == 20
    _assert_prefill_and_decode_keep_the_forward_logits(module, lowered, 45)


@pytest.mark.parametrize("caps,softcap,shifted", [(None, None, False), ((2.0, 2.0), 2.0, False),
                                                   ((2.0, 3.0), "none", False), (None, None, True)])
def test_attention_patterns_build_attention_nodes(caps, softcap, shifted):
    """softmax(q @ k^T * scale) @ v becomes one attention node, also soft-capped as Gemma 2 writes it (cap *
    tanh(s / cap)), and with the scores shifted by their row's maximum before the softmax; a tanh between other
    constants is not a soft-cap and stays as it is."""
    rng = np.random.default_rng(5)
    b = GraphBuilder()
    q = b.input("q", TensorType((1, 2, 5, 4), "float32"))
    k = b.input("k", TensorType((1, 2, 5, 4), "float32"))
    v = b.input("v", TensorType((1, 2, 5, 4), "float32"))
    scores = b.op("matmul", [q, b.op("permute", [k], {"axes": [0, 1, 3, 2]})])
    scaled = b.op("multiply", [scores, b.op("constant", [], {"value": 0.5, "dtype": "float32"})])
    if caps is not None:
        inner = b.op("divide", [scaled, b.op("constant", [], {"value": caps[0], "dtype": "float32"})])
        scaled = b.op("multiply", [b.op("tanh", [inner]), b.op("constant", [], {"value": caps[1], "dtype": "float32"})])
    if shifted:
        scaled = b.op("subtract", [scaled, b.op("max", [scaled], {"axes": [3], "keepdims": True})])
    out = b.op("matmul", [b.op("softmax", [scaled], {"axis": -1}), v])
    graph = Graph("f", [q, k, v], [out])
    rewritten = rewrite(graph, attention_patterns.RULES)
    attentions = [n for n in rewritten.nodes if n.op == "attention"]
    assert [n.attrs["softcap"] for n in attentions] == ([] if softcap == "none" else [softcap])
    inputs = {n: rng.standard_normal((1, 2, 5, 4)).astype(np.float32) * 3 for n in "qkv"}
    np.testing.assert_allclose(run_graph(rewritten, inputs, {})[0], run_graph(graph, inputs, {})[0], atol=1e-6)
    assert D.equal(rewritten.outputs[0].type.shape[2], 5)


def _logits(module, function_inputs):
    return run(module, "forward", function_inputs)[0]


def test_fusion_passes_keep_the_logits_and_fuse():
    from llmc.passes.concat_linears import concat_linears
    from llmc.passes.fuse_residual import fuse_residual
    from llmc.passes.fuse_rms_norm import fuse_rms_norm

    module = import_torch_model(build_tiny("qwen2_untied"))
    ids = {"input_ids": np.random.default_rng(6).integers(0, 512, (1, 11))}
    expected = _logits(module, ids)
    normed = fuse_rms_norm(module)
    assert normed.functions["forward"].op_counts()["rms_norm"] == 5
    concatenated = concat_linears(normed)
    counts = concatenated.functions["forward"].op_counts()
    assert counts["linear"] == 2 * 4 + 1  # per layer: fused q/k/v, o, fused gate/up, down; plus the head
    assert any("{q,k,v}_proj.weight" in name for name in concatenated.weights)
    assert any("{q,k,v}_proj.bias" in name for name in concatenated.weights)
    fused = fuse_residual(concatenated)
    assert sum(1 for n in fused.functions["forward"].nodes if n.op == "linear" and n.inputs[3] is not None) == 4
    for stage in (normed, concatenated, fused):
        np.testing.assert_allclose(_logits(stage, ids), expected, atol=1e-5, rtol=0)


def test_quantization_keeps_logits_within_its_tolerance():
    from llmc.passes.quantize import quantize_module

    module = import_torch_model(build_tiny("llama_gqa_tied"))
    ids = {"input_ids": np.random.default_rng(7).integers(0, 512, (1, 9))}
    expected = _logits(module, ids)
    scale = np.abs(expected).max()
    q8 = quantize_module(module, "q8", "q8")
    q4 = quantize_module(module, "q4", "q8")
    assert q8.functions["forward"].op_counts()["quantized_linear"] == 15
    assert q8.functions["forward"].op_counts()["quantized_take"] == 1  # the tied embedding reads the q8 head
    assert not any(w.dtype == np.float32 and w.ndim == 2 for w in q8.weights.values())
    assert np.abs(_logits(q8, ids) - expected).max() / scale < 0.03
    assert np.abs(_logits(q4, ids) - expected).max() / scale < 0.3
    quantization = q4.metadata["quantization"]
    assert (quantization["layers"], quantization["head"]) == ("q4", "q8")
    assert quantization["formats"]["model.embed_tokens.weight"] == "q8"
    assert quantization["formats"]["model.layers.1.mlp.up_proj.weight"] == "q4"


def test_auto_keeps_each_source_format_and_concatenates_only_alike_weights():
    """auto runs each weight in the form the checkpoint gave it (here: q, k and o in one 4-bit form, v in
    an 8-bit one, the MLP float); q and k are then concatenated and v stays apart; the interpreter's
    logits are the float model's on the dequantized weights."""
    from llmc.ir.quant_formats import dequantize, quantize
    from llmc.passes.concat_linears import concat_linears
    from llmc.passes.quantize import SourceWeight, quantize_module

    module = import_torch_model(build_tiny("llama_gqa_tied"))
    sources = {}
    for name, weight in module.weights.items():
        if ".self_attn." in name and weight.ndim == 2:
            sources[name] = SourceWeight("Q8_0" if "v_proj" in name else "Q4_1",
                                         quantize(weight, 8 if "v_proj" in name else 4))
    dequantized = dict(module.weights)
    for name, source in sources.items():
        q = source.data
        dequantized[name] = dequantize(q.codes, q.scales, q.mins, q.bits)
    ids = {"input_ids": np.random.default_rng(9).integers(0, 512, (1, 6))}
    expected = _logits(Module(module.functions, dequantized, module.metadata), ids)
    kept = concat_linears(quantize_module(module, "auto", "auto", sources))
    counts = kept.functions["forward"].op_counts()
    # per layer: q+k fused, v, o; the float gate/up fused, down; and the float head
    assert counts["quantized_linear"] == 2 * 3 and counts["linear"] == 2 * 2 + 1
    assert {v for k, v in kept.metadata["quantization"]["formats"].items()} == {"Q4_1", "Q8_0"}
    np.testing.assert_allclose(_logits(kept, ids), expected, atol=1e-5, rtol=0)


def test_fold_transposes_removes_every_permute_around_paged_attention():
    from llmc.passes.fold_transposes import fold_transposes

    lowered = lower_kv_cache(import_torch_model(build_tiny("mistral_tied")))
    folded = fold_transposes(lowered)
    assert lowered.functions["decode"].op_counts()["permute"] == 16
    assert "permute" not in folded.functions["decode"].op_counts()
    ids = np.random.default_rng(8).integers(0, 512, (1, 7))

    def prefill(module):
        cache = _kv_reference(module)
        cache.begin_forward([0], [7])
        return run(module, "prefill", {"input_ids": ids, "positions": np.arange(7), "logit_rows": np.arange(7),
                                       "kv_cache": cache})[0]
    np.testing.assert_allclose(prefill(folded), prefill(lowered), atol=1e-6, rtol=0)
