"""The vulkan target's paged KV cache: plain tensors that the runtime fills, and two TIR kernels.

TVM's paged KV cache is a C++ runtime object that a WGSL program cannot call, so the
vulkan target keeps the cache in tensors that the entry functions take as inputs: one
page pool per layer, (pages, 2, kv_heads, page_size, head_dim) with keys at 0 and
values at 1, and four small int32 tensors that the runtime computes for each step
(`STEP_FIELDS`): the pool slot of each new token (page * page_size + offset), the page
table row of each token's sequence, how many keys each token sees (its position + 1),
and the page table. `paged_attention` becomes an append kernel that writes the new keys
and values into the pool in place, then an attention kernel with one thread per (token,
query head) that walks the token's keys through the page table with an online softmax.
"""

from __future__ import annotations

from tvm import relax
from tvm.script import tirx as T

from llmc.ir import KVCacheType, Node
from llmc.runtime.webgpu_plan import STEP_FIELDS

from ..base import Kernel, OwnKVCache
from ..cpu_kernels.common import opaque

THREADS = 64


def append_kernel(kv_heads: int, head_dim: int, page_size: int, dtype: str) -> Kernel:
    width = kv_heads * head_dim

    @T.prim_func(private=True)
    def kv_append(var_k: T.handle, var_v: T.handle, var_slots: T.handle, var_pages: T.handle):
        T.func_attr({"tirx.noalias": True})
        tokens, num_pages = T.int64(), T.int64()
        k = T.match_buffer(var_k, (1, tokens, kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (1, tokens, kv_heads, head_dim), dtype)
        slots = T.match_buffer(var_slots, (tokens,), "int32")
        pages = T.match_buffer(var_pages, (num_pages, 2, kv_heads, page_size, head_dim), dtype)
        for block in T.thread_binding((tokens * width + THREADS - 1) // THREADS, thread="blockIdx.x"):
            for thread in T.thread_binding(THREADS, thread="threadIdx.x"):
                if block * THREADS + thread < tokens * width:
                    token: T.let[T.int64] = (block * THREADS + thread) // width
                    head: T.let[T.int64] = (block * THREADS + thread) % width // head_dim
                    lane: T.let[T.int64] = (block * THREADS + thread) % head_dim
                    slot: T.let[T.int64] = T.Cast("int64", slots[token])
                    pages[slot // page_size, 0, head, slot % page_size, lane] = k[0, token, head, lane]
                    pages[slot // page_size, 1, head, slot % page_size, lane] = v[0, token, head, lane]

    return Kernel(f"kv_append_{kv_heads}x{head_dim}_p{page_size}_{dtype}", opaque(kv_append))


def attention_kernel(q_heads: int, kv_heads: int, head_dim: int, page_size: int, scale: float, dtype: str) -> Kernel:
    group = q_heads // kv_heads

    @T.prim_func(private=True)
    def kv_attention(var_q: T.handle, var_pages: T.handle, var_table: T.handle, var_rows: T.handle,
                     var_lengths: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        tokens, num_pages, sequences, width = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (1, tokens, q_heads, head_dim), dtype)
        pages = T.match_buffer(var_pages, (num_pages, 2, kv_heads, page_size, head_dim), dtype)
        table = T.match_buffer(var_table, (sequences, width), "int32")
        rows = T.match_buffer(var_rows, (tokens,), "int32")
        lengths = T.match_buffer(var_lengths, (tokens,), "int32")
        out = T.match_buffer(var_out, (1, tokens, q_heads, head_dim), dtype)
        for block in T.thread_binding((tokens * q_heads + THREADS - 1) // THREADS, thread="blockIdx.x"):
            for thread in T.thread_binding(THREADS, thread="threadIdx.x"):
                acc = T.alloc_buffer((head_dim,), "float32", scope="local")
                # running max, running sum, this key's score, the rescale of what came before, this key's weight
                state = T.alloc_buffer((5,), "float32", scope="local")
                if block * THREADS + thread < tokens * q_heads:
                    token: T.let[T.int64] = (block * THREADS + thread) // q_heads
                    head: T.let[T.int64] = (block * THREADS + thread) % q_heads
                    for lane in range(head_dim):
                        acc[lane] = T.float32(0)
                    state[0] = T.float32(-3.0e38)
                    state[1] = T.float32(0)
                    for key in range(T.Cast("int64", lengths[token])):
                        page: T.let[T.int64] = T.Cast("int64", table[T.Cast("int64", rows[token]), key // page_size])
                        state[2] = T.float32(0)
                        for lane in range(head_dim):
                            state[2] = state[2] + T.Cast("float32", q[0, token, head, lane]) * T.Cast(
                                "float32", pages[page, 0, head // group, key % page_size, lane])
                        state[2] = state[2] * T.float32(scale)
                        state[3] = T.exp(state[0] - T.max(state[0], state[2]))
                        state[4] = T.exp(state[2] - T.max(state[0], state[2]))
                        state[0] = T.max(state[0], state[2])
                        state[1] = state[1] * state[3] + state[4]
                        for lane in range(head_dim):
                            acc[lane] = acc[lane] * state[3] + state[4] * T.Cast(
                                "float32", pages[page, 1, head // group, key % page_size, lane])
                    for lane in range(head_dim):
                        out[0, token, head, lane] = T.Cast(dtype, acc[lane] / state[1])

    return Kernel(f"kv_attention_{q_heads}x{kv_heads}x{head_dim}_p{page_size}_{scale:.8g}_{dtype}",
                  opaque(kv_attention))


class TensorKVCache(OwnKVCache):
    """The cache as a tuple input of tensors; `paged_attention` as calls of the two kernels above."""

    def __init__(self, page_size: int):
        self.page_size = page_size

    def relax_type(self, cache: KVCacheType, symbols) -> relax.TupleType:
        pool = relax.TensorType(self._pool_shape(cache, symbols), cache.dtype)
        tokens = relax.TensorType([symbols.var("kv_tokens")], "int32")
        table = relax.TensorType([symbols.var("kv_sequences"), symbols.var("kv_table_width")], "int32")
        return relax.TupleType([pool] * cache.num_layers + [tokens, tokens, tokens, table])

    def _pool_shape(self, cache: KVCacheType, symbols) -> list:
        return [symbols.var("kv_pages"), 2, cache.num_kv_heads, self.page_size, cache.head_dim]

    def attend(self, cx, node: Node, args: list) -> relax.Expr:
        q, k, v, cache_value = args
        cache: KVCacheType = node.inputs[3].type
        layer = node.attrs["layer"]
        layers = cache.num_layers

        def field(index: int, name: str) -> relax.Expr:
            return cx.emit(relax.TupleGetItem(cache_value, index), f"{node.name}_{name}")

        pool = field(layer, "pages")
        slots, rows, lengths, table = (field(layers + i, name) for i, name in enumerate(STEP_FIELDS))
        pool = cx.call_kernel(append_kernel(cache.num_kv_heads, cache.head_dim, self.page_size, cache.dtype),
                              [k, v, slots, pool], self._pool_shape(cache, cx.symbols), cache.dtype,
                              f"{node.name}_append", inplace=3)
        kernel = attention_kernel(cache.num_q_heads, cache.num_kv_heads, cache.head_dim, self.page_size,
                                  float(node.attrs["scale"]), cache.dtype)
        return cx.call_kernel(kernel, [q, pool, table, rows, lengths], cx.symbols.shape(node.type.shape),
                              cache.dtype, node.name)
