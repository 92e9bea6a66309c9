"""The vulkan target's paged KV cache: plain tensors that the runtime fills, and two TIR kernels.

TVM's paged KV cache is a C++ runtime object that a WGSL program cannot call, so the
vulkan target keeps the cache in tensors that the entry functions take as inputs: one
page pool per layer, (pages, 2, kv_heads, page_size, row width) with keys at 0 and
values at 1, and four small int32 tensors that the runtime computes for each step
(`STEP_FIELDS`): the pool slot of each new token (page * page_size + offset), the page
table row of each token's sequence, how many keys each token sees (its position + 1),
and the page table. `paged_attention` becomes an append kernel that writes the new keys
and values into the pool in place, in the cache's storage format (kv_rows.py), then an
attention kernel with one workgroup per (token, query head) whose threads split the token's
keys, walk them through the page table with online softmaxes, and merge their results. A
soft-capped cache (Gemma 2) caps each score as cap * tanh(s / cap), tanh written with one
exp so that it saturates cleanly at any magnitude; a windowed layer's tokens skip the keys
that are `window` or more positions behind them.
"""

from __future__ import annotations

from tvm import relax
from tvm.script import tirx as T

from llmc.ir import KVCacheType, Node
from llmc.ir.kv_storage import GROUP, STORAGES, KVStorage, kv_storage, rotation_size
from llmc.runtime.webgpu_plan import STEP_FIELDS

from ..base import Kernel, OwnKVCache
from ..cpu_kernels.common import opaque
from ..hadamard_rotation import hadamard_entry, row_rotation
from .kv_rows import WordRows, pool_dtype, row_width, row_writer

APPEND_THREADS = 64
SHARED_FLOATS = 2048  # the attention kernel's workgroup memory for partial outputs: 8 KB of WebGPU's 16


def append_kernel(storage: KVStorage, kv_heads: int, head_dim: int, page_size: int, dtype: str) -> Kernel:
    """One thread per new row (token, key or value, head): stored into its pool slot in place."""
    rows = 2 * kv_heads
    width, pool = row_width(storage, head_dim), pool_dtype(storage, dtype)
    write = row_writer(storage, head_dim)

    @T.prim_func(private=True)
    def kv_append(var_k: T.handle, var_v: T.handle, var_slots: T.handle, var_pages: T.handle):
        T.func_attr({"tirx.noalias": True})
        tokens, num_pages = T.int64(), T.int64()
        k = T.match_buffer(var_k, (1, tokens, kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (1, tokens, kv_heads, head_dim), dtype)
        slots = T.match_buffer(var_slots, (tokens,), "int32")
        pages = T.match_buffer(var_pages, (num_pages, 2, kv_heads, page_size, width), pool)
        for block in T.thread_binding((tokens * rows + APPEND_THREADS - 1) // APPEND_THREADS, thread="blockIdx.x"):
            for thread in T.thread_binding(APPEND_THREADS, thread="threadIdx.x"):
                row = T.alloc_buffer((head_dim,), "float32", scope="local")
                if block * APPEND_THREADS + thread < tokens * rows:
                    token: T.let[T.int64] = (block * APPEND_THREADS + thread) // rows
                    which: T.let[T.int64] = (block * APPEND_THREADS + thread) % rows // kv_heads
                    head: T.let[T.int64] = (block * APPEND_THREADS + thread) % kv_heads
                    slot: T.let[T.int64] = T.Cast("int64", slots[token])
                    for i in range(head_dim):
                        row[i] = T.Cast("float32", T.if_then_else(which == 0, k[0, token, head, i],
                                                                  v[0, token, head, i]))
                    write(row, pages, slot // page_size, which, head, slot % page_size)

    return Kernel(f"kv_append_{storage.name}_{kv_heads}x{head_dim}_p{page_size}_{dtype}", opaque(kv_append))


def attention_kernel(storage: KVStorage, q_heads: int, kv_heads: int, head_dim: int, page_size: int, scale: float,
                     softcap: float | None, window: int | None, dtype: str) -> Kernel:
    """One workgroup per (token, query head), its `lanes` threads splitting the token's keys (key j to thread
    j mod lanes), each with its own online softmax; the partial results merge exactly through workgroup
    memory (Flash-Decoding within a workgroup), so a single decoding sequence keeps every lane busy. A rotated
    format's query is rotated like its keys, and the output is rotated back (each lane its own values)."""
    group = q_heads // kv_heads
    lanes = max(1, min(32, SHARED_FLOATS // head_dim))
    width, pool = row_width(storage, head_dim), pool_dtype(storage, dtype)
    rows = WordRows(storage, head_dim)
    groups = head_dim // GROUP if storage.scaled else 1
    per_group = head_dim // groups
    rotate, rotation = row_rotation(head_dim), rotation_size(head_dim)
    capped, cap = softcap is not None, softcap or 1.0
    windowed = window is not None

    def first_key(length):
        """The first key a token that sees `length` keys attends to."""
        return T.max(length - T.int64(window), T.int64(0)) if windowed else T.int64(0)

    @T.prim_func(private=True)
    def kv_attention(var_q: T.handle, var_pages: T.handle, var_table: T.handle, var_rows: T.handle,
                     var_lengths: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        tokens, num_pages, sequences, table_width = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (1, tokens, q_heads, head_dim), dtype)
        pages = T.match_buffer(var_pages, (num_pages, 2, kv_heads, page_size, width), pool)
        table = T.match_buffer(var_table, (sequences, table_width), "int32")
        seq_rows = T.match_buffer(var_rows, (tokens,), "int32")
        lengths = T.match_buffer(var_lengths, (tokens,), "int32")
        out = T.match_buffer(var_out, (1, tokens, q_heads, head_dim), dtype)
        for token in T.thread_binding(tokens, thread="blockIdx.y"):
            for head in T.thread_binding(q_heads, thread="blockIdx.x"):
                part_max = T.alloc_buffer((lanes,), "float32", scope="shared")
                part_sum = T.alloc_buffer((lanes,), "float32", scope="shared")
                part_out = T.alloc_buffer((lanes, head_dim), "float32", scope="shared")
                merged = T.alloc_buffer((head_dim,), "float32", scope="shared")
                for lane in T.thread_binding(lanes, thread="threadIdx.x"):
                    query = T.alloc_buffer((head_dim,), "float32", scope="local")
                    acc = T.alloc_buffer((head_dim,), "float32", scope="local")
                    # running max, running sum, this key's score, the rescale of what came before, this key's weight,
                    # the scale of the row's group being read
                    state = T.alloc_buffer((6,), "float32", scope="local")
                    for i in range(head_dim):
                        query[i] = T.Cast("float32", q[0, token, head, i])
                        acc[i] = T.float32(0)
                    if storage.rotated:
                        rotate(query)
                    state[0] = T.float32(-3.0e38)
                    state[1] = T.float32(0)
                    state[5] = T.float32(1)
                    length: T.let[T.int64] = T.Cast("int64", lengths[token])
                    first: T.let[T.int64] = first_key(length)
                    for step in range((length - first - lane + lanes - 1) // lanes):
                        key: T.let[T.int64] = first + lane + step * lanes
                        sequence: T.let[T.int64] = T.Cast("int64", seq_rows[token])
                        page: T.let[T.int64] = T.Cast("int64", table[sequence, key // page_size])
                        state[2] = T.float32(0)
                        for g in range(groups):
                            if storage.scaled:
                                state[5] = rows.scale(pages, (page, 0, head // group, key % page_size), g)
                            for i in range(per_group):
                                state[2] = state[2] + query[g * per_group + i] * rows.value(
                                    pages, (page, 0, head // group, key % page_size), g * per_group + i, state[5])
                        state[2] = state[2] * T.float32(scale)
                        if capped:  # cap * tanh(s / cap), tanh(x) = 1 - 2 / (exp(2x) + 1)
                            state[2] = T.float32(cap) - T.float32(2 * cap) / (
                                T.exp(state[2] * T.float32(2 / cap)) + T.float32(1))
                        state[3] = T.exp(state[0] - T.max(state[0], state[2]))
                        state[4] = T.exp(state[2] - T.max(state[0], state[2]))
                        state[0] = T.max(state[0], state[2])
                        state[1] = state[1] * state[3] + state[4]
                        for g in range(groups):
                            if storage.scaled:
                                state[5] = rows.scale(pages, (page, 1, head // group, key % page_size), g)
                            for i in range(per_group):
                                acc[g * per_group + i] = acc[g * per_group + i] * state[3] + state[4] * rows.value(
                                    pages, (page, 1, head // group, key % page_size), g * per_group + i, state[5])
                    part_max[lane] = state[0]
                    part_sum[lane] = state[1]
                    for i in range(head_dim):
                        part_out[lane, i] = acc[i]
                    T.tvm_storage_sync("shared")
                    # every lane: the largest running max (state[0]) and the total weight (state[1])
                    state[0] = T.float32(-3.0e38)
                    for other in range(lanes):
                        state[0] = T.max(state[0], part_max[other])
                    state[1] = T.float32(0)
                    for other in range(lanes):
                        state[1] = state[1] + part_sum[other] * T.exp(part_max[other] - state[0])
                    for step in range((head_dim - lane + lanes - 1) // lanes):
                        state[2] = T.float32(0)
                        for other in range(lanes):
                            state[2] = state[2] + part_out[other, lane + step * lanes] * T.exp(
                                part_max[other] - state[0])
                        merged[lane + step * lanes] = state[2] / state[1]
                    T.tvm_storage_sync("shared")
                    for step in range((head_dim - lane + lanes - 1) // lanes):
                        if storage.rotated:
                            state[2] = T.float32(0)
                            for j in range(rotation):
                                state[2] = state[2] + hadamard_entry(lane + step * lanes, j, rotation) * merged[
                                    (lane + step * lanes) // rotation * rotation + j]
                            out[0, token, head, lane + step * lanes] = T.Cast(dtype, state[2])
                        else:
                            out[0, token, head, lane + step * lanes] = T.Cast(dtype, merged[lane + step * lanes])

    variant = (f"_cap{cap:.8g}" if capped else "") + (f"_window{window}" if windowed else "")
    form = f"{storage.name}_{q_heads}x{kv_heads}x{head_dim}_p{page_size}_{scale:.8g}{variant}"
    return Kernel(f"kv_attention_{form}_{dtype}", opaque(kv_attention))


class TensorKVCache(OwnKVCache):
    """The cache as a tuple input of tensors; `paged_attention` as calls of the two kernels above."""

    storages = frozenset(STORAGES)

    def __init__(self, page_size: int):
        self.page_size = page_size

    def relax_type(self, cache: KVCacheType, symbols) -> relax.TupleType:
        storage = kv_storage(cache.storage)
        pool = relax.TensorType(self._pool_shape(cache, symbols), pool_dtype(storage, cache.dtype))
        tokens = relax.TensorType([symbols.var("kv_tokens")], "int32")
        table = relax.TensorType([symbols.var("kv_sequences"), symbols.var("kv_table_width")], "int32")
        return relax.TupleType([pool] * cache.num_layers + [tokens, tokens, tokens, table])

    def _pool_shape(self, cache: KVCacheType, symbols) -> list:
        width = row_width(kv_storage(cache.storage), cache.head_dim)
        return [symbols.var("kv_pages"), 2, cache.num_kv_heads, self.page_size, width]

    def attend(self, cx, node: Node, args: list) -> relax.Expr:
        q, k, v, cache_value = args
        cache: KVCacheType = node.inputs[3].type
        storage = kv_storage(cache.storage)
        layer = node.attrs["layer"]
        layers = cache.num_layers

        def field(index: int, name: str) -> relax.Expr:
            return cx.emit(relax.TupleGetItem(cache_value, index), f"{node.name}_{name}")

        pool = field(layer, "pages")
        slots, rows, lengths, table = (field(layers + i, name) for i, name in enumerate(STEP_FIELDS))
        append = append_kernel(storage, cache.num_kv_heads, cache.head_dim, self.page_size, cache.dtype)
        pool = cx.call_kernel(append, [k, v, slots, pool], self._pool_shape(cache, cx.symbols),
                              pool_dtype(storage, cache.dtype), f"{node.name}_append", inplace=3)
        kernel = attention_kernel(storage, cache.num_q_heads, cache.num_kv_heads, cache.head_dim, self.page_size,
                                  float(node.attrs["scale"]), cache.softcap,
                                  cache.window if node.attrs["windowed"] else None, cache.dtype)
        return cx.call_kernel(kernel, [q, pool, table, rows, lengths], cx.symbols.shape(node.type.shape),
                              cache.dtype, node.name)
