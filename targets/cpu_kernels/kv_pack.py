"""The CPU kernels around a KV cache that is not float32 (ir/kv_storage.py).

`pack_qkv` turns a step's float32 queries, keys and values into the rows TVM's runtime cache
takes: queries as their float32 bytes, keys and values stored (cast to float16, or rotated and
quantized). `unpack_output` takes the attention output back out of its rows (rotating it back
for a rotated format). `merge_states` replaces TVM's merge of two partial attention results
(the step's own keys, the cached ones), which would otherwise do arithmetic on the container.
"""

from __future__ import annotations


from tvm.script import tirx as T

from llmc.ir.kv_storage import GROUP, Geometry, KVStorage

from ..hadamard_rotation import row_rotation
from .common import opaque

HALF_GROUP = GROUP // 2


def _quantize(storage: KVStorage, head_dim: int):
    """A macro storing one row of float32 `row` into `codes` (container) and `scales` (float16) at t, slot."""
    scale_at = storage.code_bytes(head_dim) // 2

    rotate = row_rotation(head_dim)

    @T.macro
    def store(row, codes, scales, t, slot):
        if storage.rotated:
            rotate(row)
        for g in range(head_dim // GROUP):
            best = T.alloc_buffer((1,), "float32")
            best[0] = T.float32(0)
            for i in range(GROUP):
                if storage.code_bits == 8:
                    best[0] = T.max(best[0], T.fabs(row[g * GROUP + i]))
                elif T.fabs(row[g * GROUP + i]) > T.fabs(best[0]):
                    best[0] = row[g * GROUP + i]
            scale: T.let[T.float16] = T.Cast("float16", best[0] / T.float32(127 if storage.code_bits == 8 else -8))
            inverse: T.let[T.float32] = T.if_then_else(scale != T.float16(0),
                                                       T.float32(1) / T.Cast("float32", scale), T.float32(0))
            scales[t, slot, scale_at + g] = scale
            if storage.code_bits == 8:
                for i in range(GROUP):
                    codes[t, slot, g * GROUP + i] = T.Cast("int8", T.max(T.min(
                        T.round(row[g * GROUP + i] * inverse), T.float32(127)), T.float32(-127)))
            else:
                for i in range(HALF_GROUP):
                    low: T.let[T.float32] = T.max(T.min(T.round(row[g * GROUP + i] * inverse) + T.float32(8),
                                                        T.float32(15)), T.float32(0))
                    high: T.let[T.float32] = T.max(T.min(T.round(row[g * GROUP + i + HALF_GROUP] * inverse) +
                                                         T.float32(8), T.float32(15)), T.float32(0))
                    codes[t, slot, g * HALF_GROUP + i] = T.Cast("int8", T.Cast("int32", low) |
                                                                         (T.Cast("int32", high) << 4))
    return store


def pack_qkv(storage: KVStorage, shape: Geometry, num_q_heads: int, head_dim: int):
    kv_heads, width, container = shape.kv_heads, shape.width, shape.dtype
    rows = shape.q_heads + 2 * kv_heads
    row_bytes = width * (1 if container in ("int8", "uint8") else 2)
    store = _quantize(storage, head_dim) if storage.scaled else None
    rotate = row_rotation(head_dim)

    @T.prim_func
    def pack(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        tokens = T.int64()
        q = T.match_buffer(var_q, (tokens, num_q_heads, head_dim), "float32")
        k = T.match_buffer(var_k, (tokens, kv_heads, head_dim), "float32")
        v = T.match_buffer(var_v, (tokens, kv_heads, head_dim), "float32")
        out = T.match_buffer(var_out, (tokens, rows, width), container)
        as_float = T.decl_buffer((tokens, rows * row_bytes // 4), "float32", data=out.data)
        as_half = T.decl_buffer((tokens, rows, row_bytes // 2), "float16", data=out.data)
        for t in T.parallel(tokens):
            row = T.alloc_buffer((head_dim,), "float32")
            for h in range(num_q_heads):
                for d in range(head_dim):
                    row[d] = q[t, h, d]
                if storage.rotated:
                    rotate(row)
                for d in range(head_dim):
                    as_float[t, h * head_dim + d] = row[d]
            for which, h in T.grid(2, kv_heads):
                for d in range(head_dim):
                    row[d] = T.if_then_else(which == 0, k[t, h, d], v[t, h, d])
                if storage.scaled:
                    store(row, out, as_half, t, shape.q_heads + which * kv_heads + h)
                else:
                    for d in range(head_dim):
                        out[t, shape.q_heads + which * kv_heads + h, d] = T.Cast(container, row[d])
    return opaque(pack)


def unpack_output(storage: KVStorage, shape: Geometry, num_q_heads: int, head_dim: int):
    width, container = shape.width, shape.dtype
    lanes = {"float32": 1, "float16": 2}.get(container, 4)  # container elements per float32
    rotate = row_rotation(head_dim)

    @T.prim_func(s_tir=True)
    def unpack(var_packed: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        tokens = T.int64()
        packed = T.match_buffer(var_packed, (tokens, shape.q_heads, width), container)
        out = T.match_buffer(var_out, (tokens, num_q_heads, head_dim), "float32")
        # Relax checks a kernel of one input for a reshape pattern, and that check wants a root block (which
        # cannot declare a float32 view of `packed`: the floats are read with reinterpret).
        with T.sblock("root"):
            for t in T.parallel(tokens):
                row = T.alloc_buffer((head_dim,), "float32")
                for h in range(num_q_heads):
                    for d in range(head_dim):
                        at: T.let[T.int32] = (h * head_dim + d) * lanes
                        row[d] = T.reinterpret("float32", packed[t, at // width, T.Ramp(at % width, 1, lanes)])
                    if storage.rotated:
                        rotate(row)
                    for d in range(head_dim):
                        out[t, h, d] = row[d]
    return opaque(unpack)


def merge_states(shape: Geometry, num_q_heads: int, head_dim: int):
    """o, lse := the merge of (o, lse) and (o_other, lse_other), each a softmax-weighted sum with its base-2
    log-sum-exp; in place, over float32 outputs packed into the runtime's rows."""
    width, container = shape.width, shape.dtype
    row_bytes = width * {"float32": 4, "float16": 2}.get(container, 1)

    @T.prim_func
    def merge(var_o: T.handle, var_lse: T.handle, var_o_other: T.handle, var_lse_other: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int32()
        o_rows = T.match_buffer(var_o, (n, shape.q_heads, width), container)
        lse = T.match_buffer(var_lse, (n, shape.q_heads), "float32")
        other_rows = T.match_buffer(var_o_other, (n, shape.q_heads, width), container)
        lse_other = T.match_buffer(var_lse_other, (n, shape.q_heads), "float32")
        o = T.decl_buffer((n, shape.q_heads * row_bytes // 4), "float32", data=o_rows.data)
        other = T.decl_buffer((n, shape.q_heads * row_bytes // 4), "float32", data=other_rows.data)
        for t in T.parallel(n):
            for h in range(num_q_heads):
                top: T.let[T.float32] = T.max(lse[t, h], lse_other[t, h])
                mine: T.let[T.float32] = T.exp2(lse[t, h] - top)
                theirs: T.let[T.float32] = T.exp2(lse_other[t, h] - top)
                for d in T.vectorized(head_dim):
                    o[t, h * head_dim + d] = (o[t, h * head_dim + d] * mine +
                                              other[t, h * head_dim + d] * theirs) / (mine + theirs)
                lse[t, h] = top + T.log2(mine + theirs)
    return opaque(merge)
