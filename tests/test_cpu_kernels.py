"""llmc's hand-written CPU kernels against NumPy: matmuls (float and quantized, decode and
prefill paths, with and without bias and residual) and the paged-attention kernels."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from llmc.ir.ggml_formats import FORMATS
from llmc.ir.quant_formats import Quantized, dequantize, quantize
from llmc.ir.kv_storage import STORAGES
from llmc.ir.types import numpy_dtype
from llmc.targets import get_target
from llmc.targets.cpu_kernels import attention
from llmc.targets.cpu_kernels.linear import linear_float, quantized_linear

F32 = STORAGES["f32"]

N, K = 96, 512
# Where each GGUF block format keeps its fp16 numbers (scales, minimums), in bytes from the block's start.
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,)}
ROWS = (1, 5, 9, 30)  # below and above the GEMV/GEMM switch, with and without a tail of rows


def build(func):
    return tvm.tirx.build(tvm.IRModule({"main": func}), target=get_target("cpu").tvm_target())["main"]


def run(kernel, inputs, out_shape):
    out = tvm.runtime.empty(out_shape, "float32", tvm.cpu())
    kernel(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs], out)
    return out.numpy()


def random_blocks(name: str, rng: np.random.Generator, k: int) -> Quantized:
    """An (N, k) weight in GGUF format `name`: random bytes, with small positive fp16 scales."""
    form = FORMATS[name]
    raw = rng.integers(0, 256, (N, k // form.block, form.block_bytes), dtype=np.uint8)
    for start in FP16_FIELDS[name]:
        scale = rng.uniform(0.001, 0.01, (N, k // form.block)).astype(np.float16)
        raw[..., start:start + 2] = scale.view(np.uint8).reshape(N, k // form.block, 2)
    return form.to_quantized(raw, k)


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("has_residual", [False, True])
@pytest.mark.parametrize("weights", ["f32", "f16", "bf16", "q8", "q4", *FORMATS])
def test_matmul_kernels_match_numpy(weights, has_bias, has_residual):
    check_matmul(weights, has_bias, has_residual, K)


@pytest.mark.parametrize("weights", ["q8", "q4", *(name for name, form in FORMATS.items() if form.block == 32)])
def test_quantized_matmul_kernels_with_leftover_weight_groups(weights):
    """K = 544: 17 groups of 32 (34 of 16), so the decode kernel's per-group scales and offsets end with
    groups outside its 8-wide steps, as in SmolLM2's K = 576 layers."""
    check_matmul(weights, False, False, 544)


@pytest.mark.skipif(not get_target("cpu").has_vnni(), reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("weights", ["q8", "q4", *FORMATS])
def test_quantized_matmul_kernels_with_vnni_match_numpy(weights):
    check_matmul(weights, True, True, K, vnni=True)


def check_matmul(weights: str, has_bias: bool, has_residual: bool, K: int, vnni: bool = False) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((N, K), dtype=np.float32)
    bias = rng.standard_normal(N, dtype=np.float32)
    float_weights = {"f32": np.float32, "f16": np.float16, "bf16": numpy_dtype("bfloat16")}
    if weights in float_weights:
        stored = weight.astype(float_weights[weights])
        kernel = build(linear_float(N, K, stored.dtype.name, has_bias, has_residual))
        arrays, dense = [stored], stored.astype(np.float32)
    else:
        q = quantize(weight, int(weights[1])) if weights in ("q4", "q8") else random_blocks(weights, rng, K)
        group = K // q.scales.shape[1]
        kernel = build(quantized_linear(N, K, q.bits, group, q.scales.dtype.name, q.mins is not None, has_bias,
                                        has_residual, vnni))
        arrays = [q.codes, q.scales] + ([q.mins] if q.mins is not None else [])
        dense = dequantize(q.codes, q.scales, q.mins, q.bits)
    for rows in ROWS:
        x = rng.standard_normal((1, rows, K), dtype=np.float32)
        residual = rng.standard_normal((1, rows, N), dtype=np.float32)
        inputs = [x] + arrays + ([bias] if has_bias else []) + ([residual] if has_residual else [])
        # Quantized decode (few rows) quantizes activations to int8 per block of 32, as llama.cpp does.
        int8_activations = weights not in float_weights and rows < 8
        used = int8_blocks(x) if int8_activations else x
        expected = used @ dense.T + (bias if has_bias else 0) + (residual if has_residual else 0)
        error = np.abs(run(kernel, inputs, (1, rows, N)) - expected).max() / np.abs(expected).max()
        assert error < (1e-4 if int8_activations else 1e-5), (rows, error)


def int8_blocks(x: np.ndarray) -> np.ndarray:
    """`x` as the decode kernels read it: per block of 32 inputs, int8 codes times the block's amax / 127."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inverse = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)  # the kernel's arithmetic
    return (np.round(blocks * inverse) * (amax / np.float32(127))).reshape(x.shape)


def reference_scores(q, k, scale, softcap=None):
    """(heads, keys) scores of one query row, soft-capped (cap * tanh(s / cap)) when softcap is given."""
    scores = np.einsum("hd,thd->ht", q, np.repeat(k, q.shape[0] // k.shape[1], 1)) * scale
    return scores if softcap is None else softcap * np.tanh(scores / softcap)


def reference_attention(q, k, v, visible, scale, softcap=None, first=None):
    """Row r attends to keys [first[r], visible[r])."""
    group = q.shape[1] // k.shape[1]
    v = np.repeat(v, group, 1)
    out = np.zeros_like(q)
    for row in range(q.shape[0]):
        keys = slice(first[row] if first else 0, visible[row])
        scores = reference_scores(q[row], k[keys], scale, softcap)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[row] = np.einsum("ht,thd->hd", probs, v[keys])
    return out


def window_start(windowed: bool, window: int | None, distance: int) -> int:
    """The first key a query `distance` positions past key 0 sees."""
    return max(0, distance - window + 1) if windowed else 0


# (causal, soft-cap of the scores, the kernel's window, whether the layer is windowed (a negative scale)): Gemma 2's
# cap is 50, where 2 caps scores of these tests' size noticeably; a kernel built for a window runs both windowed
# layers and full ones.
VARIANTS = [(1, None, None, False), (0, None, None, False), (1, 2.0, None, False), (1, None, 5, True),
            (1, 2.0, 5, False)]


@pytest.mark.parametrize("causal,softcap,window,windowed", VARIANTS)
def test_ragged_prefill_attention_matches_numpy(causal, softcap, window, windowed):
    """Sequences of 13, 1 and 20 new tokens, after 3, 0 and 40 cached ones (their positions)."""
    rng = np.random.default_rng(1)
    lengths, past = [13, 1, 20], [3, 0, 40]
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = indptr[-1]
    q = rng.standard_normal((total, 6, 16), dtype=np.float32)
    k = rng.standard_normal((total, 2, 16), dtype=np.float32)
    v = rng.standard_normal((total, 2, 16), dtype=np.float32)
    positions = np.concatenate([offset + np.arange(n) for offset, n in zip(past, lengths)]).astype(np.int32)
    kernel = build(attention.ragged_prefill(F32, 2, 6, 16, softcap, window))
    out = tvm.runtime.empty((total, 6, 16), "float32", tvm.cpu())
    lse = tvm.runtime.empty((total, 6), "float32", tvm.cpu())
    tensors = [tvm.runtime.tensor(a) for a in (q, indptr, k, v, indptr, positions, np.array(past, np.int32))]
    kernel(*tensors, out, lse, causal, 0, 1.0, 1e4, -0.25 if windowed else 0.25)
    for b, n in enumerate(lengths):
        s = slice(indptr[b], indptr[b + 1])
        visible = [row + 1 if causal else n for row in range(n)]
        first = [window_start(windowed, window, row) for row in range(n)]
        np.testing.assert_allclose(out.numpy()[s], reference_attention(q[s], k[s], v[s], visible, 0.25, softcap, first),
                                   atol=2e-6, rtol=0)


@pytest.mark.parametrize("causal,softcap,window,windowed", [*VARIANTS[:4], (0, None, 20, True)])
def test_paged_prefill_attention_matches_numpy(causal, softcap, window, windowed):
    """Sequences of 3 and 12 new rows over 37 and 50 cached keys on pages of 16 (the first below FEW_ROWS, attending
    row by row as decode does; the second through the transposed copy of the keys), the cached keys starting at
    positions 0 and 7 (a later depth of a shared prefix). Causal, the new rows are the last keys, as TVM calls the
    kernel once they are appended; otherwise they follow the keys."""
    rng = np.random.default_rng(2)
    page, rows, keys, key_start = 16, [3, 12], [37, 50], [0, 7]
    pages_of = [-(-n // page) for n in keys]
    pages = rng.standard_normal((sum(pages_of) + 1, 2, 2, page, 16), dtype=np.float32)
    page_indptr = np.concatenate([[0], np.cumsum(pages_of)]).astype(np.int32)
    page_values = rng.permutation(sum(pages_of)).astype(np.int32)
    last = np.array([n - (p - 1) * page for n, p in zip(keys, pages_of)], np.int32)
    q_indptr = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    q = rng.standard_normal((q_indptr[-1], 6, 16), dtype=np.float32)
    first_row = [n_keys - n_rows if causal else n_keys for n_rows, n_keys in zip(rows, keys)]
    positions = np.concatenate([start + first + np.arange(n) for start, first, n in zip(key_start, first_row, rows)])
    kernel = build(attention.paged_prefill(F32, 2, 6, 16, softcap, window, page))
    out = tvm.runtime.empty(q.shape[:2] + (16,), "float32", tvm.cpu())
    lse = tvm.runtime.empty(q.shape[:2], "float32", tvm.cpu())
    tensors = [tvm.runtime.tensor(a) for a in (q, q_indptr, pages, page_indptr, page_values, last,
                                               np.array(key_start, np.int32), positions.astype(np.int32))]
    kernel(*tensors, out, lse, causal, 0, 1.0, 1e4, -0.25 if windowed else 0.25)
    assert attention.FEW_ROWS > rows[0] and attention.FEW_ROWS <= rows[1]
    for b, (n_rows, n_keys) in enumerate(zip(rows, keys)):
        ordered = pages[page_values[page_indptr[b]:page_indptr[b + 1]]]  # (pages, 2, heads, page, dim)
        k = ordered[:, 0].transpose(0, 2, 1, 3).reshape(-1, 2, 16)[:n_keys]
        v = ordered[:, 1].transpose(0, 2, 1, 3).reshape(-1, 2, 16)[:n_keys]
        visible = [n_keys - n_rows + row + 1 if causal else n_keys for row in range(n_rows)]
        first = [window_start(windowed, window, first_row[b] + row) for row in range(n_rows)]
        s = slice(q_indptr[b], q_indptr[b + 1])
        np.testing.assert_allclose(out.numpy()[s], reference_attention(q[s], k, v, visible, 0.25, softcap, first),
                                   atol=2e-6, rtol=0)


@pytest.mark.parametrize("batch,softcap,window,windowed", [(1, None, None, False), (3, None, None, False),
                                                           (3, 2.0, None, False), (3, None, 150, True),
                                                           (1, None, 150, False)])
def test_split_decode_attention_matches_numpy(batch, softcap, window, windowed):
    """Decode over 200, 3 and 0 cached keys (pages of 16), the query heads of a key head together, with at
    most 8 chunks: one sequence splits its keys into 4 chunks of at least 64, three sequences into 2, and the
    chunks' partial results merge exactly; a sequence with no keys gets zeros. A window of 150 leaves the first
    sequence's last 150 keys, still split."""
    rng = np.random.default_rng(3)
    page, keys = 16, [200, 3, 0][:batch]
    pages_of = [-(-n // page) for n in keys]
    pages = rng.standard_normal((sum(pages_of) + 1, 2, 2, page, 16), dtype=np.float32)
    page_indptr = np.concatenate([[0], np.cumsum(pages_of)]).astype(np.int32)
    page_values = rng.permutation(sum(pages_of)).astype(np.int32)
    last = np.array([n - (p - 1) * page if p else 0 for n, p in zip(keys, pages_of)], np.int32)
    q = rng.standard_normal((batch, 6, 16), dtype=np.float32)
    positions = np.array([max(n - 1, 0) for n in keys], np.int32)
    kernel = build(attention.paged_decode(F32, 2, 6, 16, softcap, window, page, max_splits=8))
    out = tvm.runtime.empty((batch, 6, 16), "float32", tvm.cpu())
    lse = tvm.runtime.empty((batch, 6), "float32", tvm.cpu())
    tensors = [tvm.runtime.tensor(a) for a in (q, pages, page_indptr, page_values, last, np.zeros(batch, np.int32),
                                               positions)]
    kernel(*tensors, out, lse, 0, 1.0, 1e4, -0.25 if windowed else 0.25)
    for b, n_keys in enumerate(keys):
        ordered = pages[page_values[page_indptr[b]:page_indptr[b + 1]]]
        first = window_start(windowed, window, n_keys - 1)
        k = ordered[:, 0].transpose(0, 2, 1, 3).reshape(-1, 2, 16)[first:n_keys]
        v = ordered[:, 1].transpose(0, 2, 1, 3).reshape(-1, 2, 16)[first:n_keys]
        expected = reference_attention(q[b:b + 1], k, v, [len(k)], 0.25, softcap) if n_keys else np.zeros((1, 6, 16))
        np.testing.assert_allclose(out.numpy()[b:b + 1], expected, atol=2e-6, rtol=0)
        if n_keys:
            scores = reference_scores(q[b], k, 0.25, softcap)
            np.testing.assert_allclose(lse.numpy()[b], np.log2(np.exp(scores).sum(-1)), atol=1e-5, rtol=0)


def test_polynomial_exp_and_sigmoid_are_as_accurate_as_libm():
    """The CPU lowering of float32 exp and sigmoid (fast_math.py), vectorised, within 2e-7 relative of
    float64 over the range where exp is a normal float32, and exactly 0 or 1 where sigmoid saturates."""
    from tvm.script import tirx as T

    from llmc.targets.cpu_kernels.fast_math import use_polynomial_exp

    use_polynomial_exp()
    size = 4096

    @T.prim_func
    def exp_and_sigmoid(x: T.Buffer((size,), "float32"), e: T.Buffer((size,), "float32"),
                        s: T.Buffer((size,), "float32")):
        for i0 in T.parallel(size // 8):
            for i1 in T.vectorized(8):
                e[i0 * 8 + i1] = T.exp(x[i0 * 8 + i1])
                s[i0 * 8 + i1] = T.sigmoid(x[i0 * 8 + i1])

    x = np.concatenate([np.linspace(-87, 88, size - 4), [-200, -100, 100, 200]]).astype(np.float32)
    e = tvm.runtime.empty((size,), "float32", tvm.cpu())
    s = tvm.runtime.empty((size,), "float32", tvm.cpu())
    build(exp_and_sigmoid)(tvm.runtime.tensor(x), e, s)
    exact = np.exp(x[:-4].astype(np.float64))
    assert np.max(np.abs(e.numpy()[:-4] - exact) / exact) < 2e-7
    sigmoid = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert np.max(np.abs(s.numpy() - sigmoid)) < 2e-7
    assert s.numpy()[-1] == 1.0 and s.numpy()[-4] < 1e-37
