"""Attention kernels over TVM's paged KV cache, for the CPU.

TVM's paged KV cache runtime calls three attention kernels that it is given at creation:
`ragged` (the new tokens of each sequence attending to each other, causally), `paged
prefill` (the new tokens attending to the sequence's cached prefix) and `decode` (one
new token per sequence attending to everything cached). TVM's own CPU versions are
serial scalar loops, and its paged prefill walks every page of the whole cache; these
replacements keep the same signatures and semantics (output plus the base-2
log-sum-exp that the runtime uses to merge the ragged and paged parts) and run as
parallel, vectorised, blocked online softmax: keys are scored in blocks, each block
rescales the running output once.

llmc's caches never rotate keys (the graph applies its own rotary embedding, RoPE mode
NONE), so the rotary arguments are accepted and ignored.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .common import opaque
from .fast_math import LOG2E, exp2

BLOCK = 8
CHAINS = 4
FEW_ROWS = 8  # fewer new rows of a sequence than this attend to its cached keys row by row
EMPTY = -5e4  # the log-sum-exp of no keys, as TVM's kernels write it (the merge weighs it as nothing)


def _sum8(buffer, base):
    total = buffer[base]
    for lane in range(1, 8):
        total = total + buffer[base + lane]
    return total


def _online_softmax(head_dim: int, group: int, key, value):
    """The blocked online-softmax loop for one query row and head, as a TVMScript macro.

    `key(src_a, src_b, base, kv_head, j, lanes)` and `value(...)` are plain Python functions that
    load 8 lanes of key/value row j from the kernel's sources (expanded while TVMScript parses)."""
    vectors = head_dim // 8

    @T.macro
    def attend(q, row, head, src_a, src_b, base, n_keys, out, lse, scale):
        query = T.alloc_buffer((head_dim,), "float32")
        acc = T.alloc_buffer((head_dim,), "float32")
        scores = T.alloc_buffer((BLOCK,), "float32")
        partial = T.alloc_buffer((CHAINS * 8,), "float32")
        state = T.alloc_buffer((3,), "float32")  # running max, running sum (base 2), block max
        kv_head = head // group
        for vec in T.unroll(vectors):
            query[T.Ramp(vec * 8, 1, 8)] = q[row, head, T.Ramp(vec * 8, 1, 8)] * T.Broadcast(scale * T.float32(LOG2E), 8)
            acc[T.Ramp(vec * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
        state[0] = T.float32(EMPTY)
        state[1] = T.float32(0)
        for block in range((n_keys + BLOCK - 1) // BLOCK):
            state[2] = T.float32(EMPTY)
            for t in T.unroll(BLOCK):
                if block * BLOCK + t < n_keys:
                    for c in T.unroll(CHAINS):  # independent chains hide the multiply-add latency
                        partial[T.Ramp(c * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
                    for vec in T.unroll(vectors):
                        partial[T.Ramp(vec % CHAINS * 8, 1, 8)] = partial[T.Ramp(vec % CHAINS * 8, 1, 8)] + \
                            query[T.Ramp(vec * 8, 1, 8)] * \
                            key(src_a, src_b, base, kv_head, block * BLOCK + t, T.Ramp(vec * 8, 1, 8))
                    for c in T.unroll(1, CHAINS):
                        partial[T.Ramp(0, 1, 8)] = partial[T.Ramp(0, 1, 8)] + partial[T.Ramp(c * 8, 1, 8)]
                    scores[t] = _sum8(partial, 0)
                    state[2] = T.max(state[2], scores[t])
            rescale = T.exp2(state[0] - T.max(state[0], state[2]))
            state[0] = T.max(state[0], state[2])
            state[1] = state[1] * rescale
            for vec in T.unroll(vectors):
                acc[T.Ramp(vec * 8, 1, 8)] = acc[T.Ramp(vec * 8, 1, 8)] * T.Broadcast(rescale, 8)
            scores[T.Ramp(0, 1, BLOCK)] = exp2(scores[T.Ramp(0, 1, BLOCK)] - T.Broadcast(state[0], BLOCK))
            for t in T.unroll(BLOCK):
                if block * BLOCK + t < n_keys:
                    state[1] = state[1] + scores[t]
                    for vec in T.unroll(vectors):
                        acc[T.Ramp(vec * 8, 1, 8)] = acc[T.Ramp(vec * 8, 1, 8)] + T.Broadcast(scores[t], 8) * \
                            value(src_a, src_b, base, kv_head, block * BLOCK + t, T.Ramp(vec * 8, 1, 8))
        if n_keys > 0:
            for vec in T.unroll(vectors):
                out[row, head, T.Ramp(vec * 8, 1, 8)] = acc[T.Ramp(vec * 8, 1, 8)] / T.Broadcast(state[1], 8)
            lse[row, head] = state[0] + T.log2(state[1])
        else:
            for vec in T.unroll(vectors):
                out[row, head, T.Ramp(vec * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
            lse[row, head] = T.float32(EMPTY)
    return attend


def _max8(buffer):
    best = buffer[0]
    for lane in range(1, 8):
        best = T.max(best, buffer[lane])
    return best


def _padded(n_keys):
    """n_keys rounded up to whole blocks of keys."""
    return (n_keys + BLOCK - 1) // BLOCK * BLOCK


def _prefill_heads(head_dim: int, group: int, key, value):
    """Prefill attention of one sequence and head, all its query rows, as a TVMScript macro.

    The head's keys are first copied transposed by blocks of 8 (block, head_dim, 8; zero-padded),
    so that a block of 8 keys is scored as one 8-lane vector from 2 KB read in order: each of the
    head_dim steps is one load and one multiply-add with a broadcast query element, and no
    horizontal sums.
    `key`/`value` load 8 lanes of key/value row j, as in `_online_softmax`."""
    vectors = head_dim // 8

    @T.macro
    def attend_rows(q, first_row, rows, head, src_a, src_b, base, n_keys, causal, out, lse, scale):
        kv_head = head // group
        keys_t = T.alloc_buffer((head_dim * _padded(n_keys),), "float32")
        query = T.alloc_buffer((head_dim,), "float32")
        acc = T.alloc_buffer((head_dim,), "float32")
        scores = T.alloc_buffer((BLOCK,), "float32")
        partials = T.alloc_buffer((CHAINS * BLOCK,), "float32")
        state = T.alloc_buffer((3,), "float32")  # running max, running sum (base 2), block max
        for j in range(_padded(n_keys)):
            for d in T.unroll(head_dim):
                keys_t[(j // BLOCK * head_dim + d) * BLOCK + j % BLOCK] = T.if_then_else(
                    j < n_keys, key(src_a, src_b, base, kv_head, T.min(j, n_keys - 1), d), T.float32(0))
        for row in range(rows):
            visible: T.let[T.int32] = _visible(causal, n_keys, rows, row)
            for vec in T.unroll(vectors):
                query[T.Ramp(vec * 8, 1, 8)] = q[first_row + row, head, T.Ramp(vec * 8, 1, 8)] * \
                    T.Broadcast(scale * T.float32(LOG2E), 8)
                acc[T.Ramp(vec * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
            state[0] = T.float32(EMPTY)
            state[1] = T.float32(0)
            for block in range((visible + BLOCK - 1) // BLOCK):
                # CHAINS independent partial sums hide the multiply-add latency (one chain of head_dim would
                # serialise); unrolled, so they stay in registers.
                for c in T.unroll(CHAINS):
                    partials[T.Ramp(c * BLOCK, 1, BLOCK)] = T.Broadcast(T.float32(0), BLOCK)
                for d in T.unroll(head_dim):
                    partials[T.Ramp(d % CHAINS * BLOCK, 1, BLOCK)] = partials[T.Ramp(d % CHAINS * BLOCK, 1, BLOCK)] + \
                        T.Broadcast(query[d], BLOCK) * keys_t[T.Ramp((block * head_dim + d) * BLOCK, 1, BLOCK)]
                scores[T.Ramp(0, 1, BLOCK)] = partials[T.Ramp(0, 1, BLOCK)] + partials[T.Ramp(BLOCK, 1, BLOCK)] + \
                    partials[T.Ramp(2 * BLOCK, 1, BLOCK)] + partials[T.Ramp(3 * BLOCK, 1, BLOCK)]
                inside = T.Ramp(block * BLOCK, 1, BLOCK) < T.Broadcast(visible, BLOCK)
                scores[T.Ramp(0, 1, BLOCK)] = T.Select(inside, scores[T.Ramp(0, 1, BLOCK)],
                                                       T.Broadcast(T.float32(EMPTY), BLOCK))
                state[2] = T.max(state[0], _max8(scores))
                rescale = T.exp2(state[0] - state[2])
                state[0] = state[2]
                scores[T.Ramp(0, 1, BLOCK)] = T.Select(inside, exp2(scores[T.Ramp(0, 1, BLOCK)] -
                                                                           T.Broadcast(state[0], BLOCK)),
                                                       T.Broadcast(T.float32(0), BLOCK))
                state[1] = state[1] * rescale + _sum8(scores, 0)
                for vec in T.unroll(vectors):
                    acc[T.Ramp(vec * 8, 1, 8)] = acc[T.Ramp(vec * 8, 1, 8)] * T.Broadcast(rescale, 8)
                # Keys past the visible ones have weight 0; their (clamped, in-bounds) rows are read anyway,
                # so the block has no branches and the accumulators stay in registers.
                for t in T.unroll(BLOCK):
                    for vec in T.unroll(vectors):
                        acc[T.Ramp(vec * 8, 1, 8)] = acc[T.Ramp(vec * 8, 1, 8)] + T.Broadcast(scores[t], 8) * \
                            value(src_a, src_b, base, kv_head, T.min(block * BLOCK + t, n_keys - 1),
                                  T.Ramp(vec * 8, 1, 8))
            if visible > 0:
                for vec in T.unroll(vectors):
                    out[first_row + row, head, T.Ramp(vec * 8, 1, 8)] = \
                        acc[T.Ramp(vec * 8, 1, 8)] / T.Broadcast(state[1], 8)
                lse[first_row + row, head] = state[0] + T.log2(state[1])
            else:
                for vec in T.unroll(vectors):
                    out[first_row + row, head, T.Ramp(vec * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
                lse[first_row + row, head] = T.float32(EMPTY)
    return attend_rows


def _ragged_key(k, v, base, kv_head, j, lanes):
    return k[base + j, kv_head, lanes]


def _ragged_value(k, v, base, kv_head, j, lanes):
    return v[base + j, kv_head, lanes]


def _paged(page_size: int, which: int):
    def load(pages, page_values, base, kv_head, j, lanes):
        return pages[page_values[base + j // page_size], which, kv_head, j % page_size, lanes]
    return load


def _visible(causal, kv_len, qo_len, row):
    """Keys row `row` of `qo_len` new tokens may see among `kv_len` (TVM's causal rule)."""
    limit = T.max(T.min(kv_len - qo_len + row + 1, kv_len), 0)
    return T.if_then_else(causal > 0, limit, kv_len)


def ragged_prefill(num_kv_heads: int, num_q_heads: int, head_dim: int):
    attend_rows = _prefill_heads(head_dim, num_q_heads // num_kv_heads, _ragged_key, _ragged_value)

    @T.prim_func
    def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                                var_kv_indptr: T.handle, var_q_rope_position: T.handle,
                                var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
                                causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
                                sm_scale: T.float32):
        T.func_attr({"tirx.noalias": True})
        batch_size, qo_len, kv_len = T.int32(), T.int32(), T.int32()
        q_indptr_offset, kv_indptr_offset = T.int32(), T.int32()
        q_rope_offset, k_rope_offset = T.int32(), T.int32()
        q = T.match_buffer(var_q, (qo_len, num_q_heads, head_dim), "float32")
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        k = T.match_buffer(var_k, (kv_len, num_kv_heads, head_dim), "float32")
        v = T.match_buffer(var_v, (kv_len, num_kv_heads, head_dim), "float32")
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_offset)
        T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        output = T.match_buffer(var_output, (qo_len, num_q_heads, head_dim), "float32")
        lse = T.match_buffer(var_lse, (qo_len, num_q_heads), "float32")
        for b in range(batch_size):
            rows: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
            keys: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
            for head in T.parallel(num_q_heads):
                attend_rows(q, q_indptr[b], rows, head, k, v, kv_indptr[b], keys, causal, output, lse, sm_scale)
    return opaque(batch_prefill_ragged_kv)


def _cached_length(page_indptr, length_info, page_size, b):
    pages = page_indptr[b + 1] - page_indptr[b]
    return T.if_then_else(pages > 0, (pages - 1) * page_size + length_info[b], 0)


def paged_prefill(num_kv_heads: int, num_q_heads: int, head_dim: int, page_size: int):
    """Few new rows (a speculative draft being checked) attend row by row as decode does: copying the whole
    cached prefix transposed for them would cost more than all their scores."""
    attend_rows = _prefill_heads(head_dim, num_q_heads // num_kv_heads, _paged(page_size, 0), _paged(page_size, 1))
    attend = _online_softmax(head_dim, num_q_heads // num_kv_heads, _paged(page_size, 0), _paged(page_size, 1))

    @T.prim_func
    def batch_prefill_paged_kv_cpu(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle,
                                   var_page_indptr: T.handle, var_page_values: T.handle, var_length_info: T.handle,
                                   var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
                                   var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
                                   rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.noalias": True})
        batch_size, total_len, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32(), T.int32()
        q_indptr_offset, page_indptr_offset, page_values_offset = T.int32(), T.int32(), T.int32()
        k_rope_offset, q_rope_offset, length_info_offset = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (total_len, num_q_heads, head_dim), "float32")
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, num_kv_heads, page_size, head_dim), "float32")
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset)
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (total_len, num_q_heads, head_dim), "float32")
        lse = T.match_buffer(var_lse, (total_len, num_q_heads), "float32")
        for b in range(batch_size):
            rows: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
            keys: T.let[T.int32] = _cached_length(page_indptr, length_info, page_size, b)
            if rows < FEW_ROWS:
                for item in T.parallel(rows * num_q_heads):
                    row: T.let[T.int32] = item // num_q_heads
                    attend(q, q_indptr[b] + row, item % num_q_heads, pages, page_values, page_indptr[b],
                           _visible(causal, keys, rows, row), output, lse, sm_scale)
            else:
                for head in T.parallel(num_q_heads):
                    attend_rows(q, q_indptr[b], rows, head, pages, page_values, page_indptr[b], keys, causal, output,
                                lse, sm_scale)
    return opaque(batch_prefill_paged_kv_cpu)


def paged_decode(num_kv_heads: int, num_q_heads: int, head_dim: int, page_size: int):
    attend = _online_softmax(head_dim, num_q_heads // num_kv_heads, _paged(page_size, 0), _paged(page_size, 1))

    @T.prim_func
    def batch_decode_paged_kv(var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
                              var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
                              var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
                              rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
                              sm_scale: T.float32):
        T.func_attr({"tirx.noalias": True})
        batch_size, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32()
        page_indptr_offset, page_values_offset = T.int32(), T.int32()
        k_rope_offset, q_rope_offset, length_info_offset = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (batch_size, num_q_heads, head_dim), "float32")
        pages = T.match_buffer(var_pages, (max_num_pages, 2, num_kv_heads, page_size, head_dim), "float32")
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset)
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(var_q_rope_position, (batch_size,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (batch_size, num_q_heads, head_dim), "float32")
        lse = T.match_buffer(var_lse, (batch_size, num_q_heads), "float32")
        for item in T.parallel(batch_size * num_q_heads):
            b = item // num_q_heads
            attend(q, b, item % num_q_heads, pages, page_values, page_indptr[b],
                   _cached_length(page_indptr, length_info, page_size, b), output, lse, sm_scale)
    return opaque(batch_decode_paged_kv)


def supported(head_dim: int) -> bool:
    return head_dim % 8 == 0

