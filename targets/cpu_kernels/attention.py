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

Decode attends per sequence and key head: the queries of the heads that share a key head
are scored together, so each cached key and value is read once per step, and the keys are
split into chunks over the threads when sequences x key heads is less than twice the threads
(Flash-Decoding); the chunks' partial results are merged exactly by their log-sum-exp.

The pages may hold any storage format of ir/kv_storage.py (rows read through kv_rows); for
formats other than float32 the runtime's query and output tensors hold float32 bytes packed
into its rows (kv_pack), which the kernels view as float32.

A soft-capped cache (KVCacheType.softcap, Gemma 2) caps each block's scores as soon as they are
summed: scores are kept in base 2 (the queries are pre-scaled by scale * log2(e)), so the cap is
too.

A cache with a sliding window (KVCacheType.window) runs some layers windowed: a query sees only
the keys fewer than `window` positions behind it. TVM's runtime hands each kernel only the layer's
attention scale, the same kernel serves every layer, and the ragged kernel is not told the layer
at all; so llmc marks a windowed layer by a negative scale (codegen/relax_ops.py), and these
kernels, built for the cache's window, attend with its magnitude over the keys inside the window.
A key's position is the sequence's offset for the kernel's keys plus its index; a query's is
TVM's query position map.

llmc's caches never rotate keys (the graph applies its own rotary embedding, RoPE mode
NONE), so the rotary arguments are accepted and ignored.
"""

from __future__ import annotations

from tvm.script import tirx as T

from llmc.ir.kv_storage import Geometry, KVStorage, geometry

from .common import opaque
from .fast_math import LOG2E, exp2
from .kv_rows import RowReader, paged_loader, ragged_loader

BLOCK = 8
CHAINS = 4
FEW_ROWS = 8  # fewer new rows of a sequence than this attend to its cached keys row by row
EMPTY = -5e4  # the log-sum-exp of no keys, as TVM's kernels write it (the merge weighs it as nothing)
MIN_CHUNK = 64  # decode splits a sequence's keys into chunks of at least this many


def _capping(softcap: float | None, lanes: int):
    """Soft-capping of `lanes` base-2 scores (cap * tanh(s / cap), the cap in base 2 as well), or None for none."""
    if softcap is None:
        return lambda scores: scores
    cap = softcap * LOG2E
    if lanes == 1:
        return lambda scores: T.float32(cap) * T.tanh(scores * T.float32(1 / cap))
    return lambda scores: T.Broadcast(T.float32(cap), lanes) * T.tanh(scores * T.Broadcast(T.float32(1 / cap), lanes))


def _window_start(window: int | None):
    """(windowed, distance) -> the first key a query sees, `distance` positions past key 0: under the sliding
    window in a windowed layer, else key 0."""
    if window is None:
        return lambda windowed, distance: 0
    return lambda windowed, distance: T.if_then_else(windowed, T.max(distance - (window - 1), 0), 0)


def _sum8(buffer, base):
    total = buffer[base]
    for lane in range(1, 8):
        total = total + buffer[base + lane]
    return total


def _online_softmax(head_dim: int, group: int, key, value, softcap: float | None):
    """The blocked online-softmax loop for one query row and head, as a TVMScript macro.

    `key(src, base, kv_head, j, d, lanes)` and `value(...)` are plain Python functions (kv_rows) that
    load `lanes` values from d of key/value row j from the kernel's sources (expanded while TVMScript parses)."""
    vectors = head_dim // 8
    capped = _capping(softcap, 1)

    @T.macro
    def attend(q, row, head, src, base, first, n_keys, out, lse, scale):
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
        for block in range((n_keys - first + BLOCK - 1) // BLOCK):
            state[2] = T.float32(EMPTY)
            for t in T.unroll(BLOCK):
                if first + block * BLOCK + t < n_keys:
                    for c in T.unroll(CHAINS):  # independent chains hide the multiply-add latency
                        partial[T.Ramp(c * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
                    for vec in T.unroll(vectors):
                        partial[T.Ramp(vec % CHAINS * 8, 1, 8)] = partial[T.Ramp(vec % CHAINS * 8, 1, 8)] + \
                            query[T.Ramp(vec * 8, 1, 8)] * \
                            key(src, base, kv_head, first + block * BLOCK + t, vec * 8, 8)
                    for c in T.unroll(1, CHAINS):
                        partial[T.Ramp(0, 1, 8)] = partial[T.Ramp(0, 1, 8)] + partial[T.Ramp(c * 8, 1, 8)]
                    scores[t] = capped(_sum8(partial, 0))
                    state[2] = T.max(state[2], scores[t])
            rescale = T.exp2(state[0] - T.max(state[0], state[2]))
            state[0] = T.max(state[0], state[2])
            state[1] = state[1] * rescale
            for vec in T.unroll(vectors):
                acc[T.Ramp(vec * 8, 1, 8)] = acc[T.Ramp(vec * 8, 1, 8)] * T.Broadcast(rescale, 8)
            scores[T.Ramp(0, 1, BLOCK)] = exp2(scores[T.Ramp(0, 1, BLOCK)] - T.Broadcast(state[0], BLOCK))
            for t in T.unroll(BLOCK):
                if first + block * BLOCK + t < n_keys:
                    state[1] = state[1] + scores[t]
                    for vec in T.unroll(vectors):
                        acc[T.Ramp(vec * 8, 1, 8)] = acc[T.Ramp(vec * 8, 1, 8)] + T.Broadcast(scores[t], 8) * \
                            value(src, base, kv_head, first + block * BLOCK + t, vec * 8, 8)
        if n_keys > first:
            for vec in T.unroll(vectors):
                out[row, head, T.Ramp(vec * 8, 1, 8)] = acc[T.Ramp(vec * 8, 1, 8)] / T.Broadcast(state[1], 8)
            lse[row, head] = state[0] + T.log2(state[1])
        else:
            for vec in T.unroll(vectors):
                out[row, head, T.Ramp(vec * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
            lse[row, head] = T.float32(EMPTY)
    return attend


def _max8(buffer, base=0):
    best = buffer[base]
    for lane in range(1, 8):
        best = T.max(best, buffer[base + lane])
    return best


def _padded(n_keys):
    """n_keys rounded up to whole blocks of keys."""
    return (n_keys + BLOCK - 1) // BLOCK * BLOCK


def _prefill_heads(head_dim: int, group: int, key, value, softcap: float | None, window: int | None):
    """Prefill attention of one sequence and head, all its query rows, as a TVMScript macro.

    The head's keys are first copied transposed by blocks of 8 (block, head_dim, 8; zero-padded),
    so that a block of 8 keys is scored as one 8-lane vector from 2 KB read in order: each of the
    head_dim steps is one load and one multiply-add with a broadcast query element, and no
    horizontal sums.
    `key`/`value` load 8 lanes of key/value row j, as in `_online_softmax`. In a windowed layer, row r sees keys
    from `_window_start(window)(windowed, q_offset + r)` (q_offset: the first row's position past key 0's)."""
    vectors = head_dim // 8
    capped = _capping(softcap, BLOCK)
    start = _window_start(window)

    def inside(block, lo, visible):
        lanes = T.Ramp(block * BLOCK, 1, BLOCK)
        below = lanes < T.Broadcast(visible, BLOCK)
        return below if window is None else T.And(below, lanes >= T.Broadcast(lo, BLOCK))

    @T.macro
    def attend_rows(q, first_row, rows, head, src, base, n_keys, causal, out, lse, scale, windowed, q_offset):
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
                    j < n_keys, key(src, base, kv_head, T.min(j, n_keys - 1), d, 1), T.float32(0))
        for row in range(rows):
            visible: T.let[T.int32] = _visible(causal, n_keys, rows, row)
            lo: T.let[T.int32] = start(windowed, q_offset + row)
            for vec in T.unroll(vectors):
                query[T.Ramp(vec * 8, 1, 8)] = q[first_row + row, head, T.Ramp(vec * 8, 1, 8)] * \
                    T.Broadcast(scale * T.float32(LOG2E), 8)
                acc[T.Ramp(vec * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
            state[0] = T.float32(EMPTY)
            state[1] = T.float32(0)
            for block in range(lo // BLOCK, (visible + BLOCK - 1) // BLOCK):
                # CHAINS independent partial sums hide the multiply-add latency (one chain of head_dim would
                # serialise); unrolled, so they stay in registers.
                for c in T.unroll(CHAINS):
                    partials[T.Ramp(c * BLOCK, 1, BLOCK)] = T.Broadcast(T.float32(0), BLOCK)
                for d in T.unroll(head_dim):
                    partials[T.Ramp(d % CHAINS * BLOCK, 1, BLOCK)] = partials[T.Ramp(d % CHAINS * BLOCK, 1, BLOCK)] + \
                        T.Broadcast(query[d], BLOCK) * keys_t[T.Ramp((block * head_dim + d) * BLOCK, 1, BLOCK)]
                scores[T.Ramp(0, 1, BLOCK)] = capped(partials[T.Ramp(0, 1, BLOCK)] + partials[T.Ramp(BLOCK, 1, BLOCK)] +
                                                     partials[T.Ramp(2 * BLOCK, 1, BLOCK)] +
                                                     partials[T.Ramp(3 * BLOCK, 1, BLOCK)])
                keep = inside(block, lo, visible)
                scores[T.Ramp(0, 1, BLOCK)] = T.Select(keep, scores[T.Ramp(0, 1, BLOCK)],
                                                       T.Broadcast(T.float32(EMPTY), BLOCK))
                state[2] = T.max(state[0], _max8(scores))
                rescale = T.exp2(state[0] - state[2])
                state[0] = state[2]
                scores[T.Ramp(0, 1, BLOCK)] = T.Select(keep, exp2(scores[T.Ramp(0, 1, BLOCK)] -
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
                            value(src, base, kv_head, T.min(block * BLOCK + t, n_keys - 1), vec * 8, 8)
            if visible > lo:
                for vec in T.unroll(vectors):
                    out[first_row + row, head, T.Ramp(vec * 8, 1, 8)] = \
                        acc[T.Ramp(vec * 8, 1, 8)] / T.Broadcast(state[1], 8)
                lse[first_row + row, head] = state[0] + T.log2(state[1])
            else:
                for vec in T.unroll(vectors):
                    out[first_row + row, head, T.Ramp(vec * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
                lse[first_row + row, head] = T.float32(EMPTY)
    return attend_rows


def _visible(causal, kv_len, qo_len, row):
    """Keys row `row` of `qo_len` new tokens may see among `kv_len` (TVM's causal rule)."""
    limit = T.max(T.min(kv_len - qo_len + row + 1, kv_len), 0)
    return T.if_then_else(causal > 0, limit, kv_len)


def _bytes(shape: Geometry) -> int:
    """Bytes of one row of the runtime's query, key, value and output tensors."""
    return shape.width * {"float32": 4, "float16": 2}.get(shape.dtype, 1)


def _query_strides(shape: Geometry, head_dim: int) -> tuple[int, int, int]:
    """Strides of the float32 view of the runtime's queries and outputs: a token's float32s fill its rows."""
    return (shape.q_heads * _bytes(shape) // 4, head_dim, 1)


def _magnitude(window: int | None, sm_scale):
    """The attention scale a kernel attends with: a cache with a window marks windowed layers by its sign."""
    return sm_scale if window is None else T.fabs(sm_scale)


def _first_position(positions, indptr, b, total):
    """The position of sequence b's first query row (clamped in bounds for a sequence with none)."""
    return positions[T.min(indptr[b], total - 1)]


def ragged_prefill(storage: KVStorage, num_kv_heads: int, num_q_heads: int, head_dim: int, softcap: float | None,
                   window: int | None):
    shape = geometry(storage, num_q_heads, num_kv_heads, head_dim)
    reader = RowReader(storage, head_dim)
    attend_rows = _prefill_heads(head_dim, num_q_heads // num_kv_heads, ragged_loader(reader, 0),
                                 ragged_loader(reader, 1), softcap, window)
    row_bytes = _bytes(shape)
    strides = _query_strides(shape, head_dim)

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
        q_rows = T.match_buffer(var_q, (qo_len, shape.q_heads, shape.width), shape.dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        k = T.match_buffer(var_k, (kv_len, num_kv_heads, shape.width), shape.dtype)
        v = T.match_buffer(var_v, (kv_len, num_kv_heads, shape.width), shape.dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_offset)
        q_positions = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_offset)
        k_offsets = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        output_rows = T.match_buffer(var_output, (qo_len, shape.q_heads, shape.width), shape.dtype)
        lse = T.match_buffer(var_lse, (qo_len, shape.q_heads), "float32")
        q = T.decl_buffer((qo_len, num_q_heads, head_dim), "float32", data=q_rows.data, strides=strides)
        output = T.decl_buffer((qo_len, num_q_heads, head_dim), "float32", data=output_rows.data,
                                strides=strides)
        k_scales = T.decl_buffer((kv_len, num_kv_heads, row_bytes // 2), "float16", data=k.data)
        v_scales = T.decl_buffer((kv_len, num_kv_heads, row_bytes // 2), "float16", data=v.data)
        for b in range(batch_size):
            rows: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
            keys: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
            q_offset: T.let[T.int32] = _first_position(q_positions, q_indptr, b, qo_len) - k_offsets[b]
            for head in T.parallel(num_q_heads):
                attend_rows(q, q_indptr[b], rows, head, (k, k_scales, v, v_scales), kv_indptr[b], keys, causal,
                            output, lse, _magnitude(window, sm_scale), sm_scale < T.float32(0), q_offset)
    return opaque(batch_prefill_ragged_kv)


def _cached_length(page_indptr, length_info, page_size, b):
    pages = page_indptr[b + 1] - page_indptr[b]
    return T.if_then_else(pages > 0, (pages - 1) * page_size + length_info[b], 0)


def paged_prefill(storage: KVStorage, num_kv_heads: int, num_q_heads: int, head_dim: int, softcap: float | None,
                  window: int | None, page_size: int):
    """Few new rows (a speculative draft being checked) attend row by row as decode does: copying the whole
    cached prefix transposed for them would cost more than all their scores."""
    shape = geometry(storage, num_q_heads, num_kv_heads, head_dim)
    reader = RowReader(storage, head_dim)
    key, value = paged_loader(reader, page_size, 0), paged_loader(reader, page_size, 1)
    attend_rows = _prefill_heads(head_dim, num_q_heads // num_kv_heads, key, value, softcap, window)
    attend = _online_softmax(head_dim, num_q_heads // num_kv_heads, key, value, softcap)
    start = _window_start(window)
    row_bytes = _bytes(shape)
    strides = _query_strides(shape, head_dim)

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
        q_rows = T.match_buffer(var_q, (total_len, shape.q_heads, shape.width), shape.dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, num_kv_heads, page_size, shape.width), shape.dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset)
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_offset)
        k_offsets = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        q_positions = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_offset)
        output_rows = T.match_buffer(var_output, (total_len, shape.q_heads, shape.width), shape.dtype)
        lse = T.match_buffer(var_lse, (total_len, shape.q_heads), "float32")
        q = T.decl_buffer((total_len, num_q_heads, head_dim), "float32", data=q_rows.data, strides=strides)
        output = T.decl_buffer((total_len, num_q_heads, head_dim), "float32", data=output_rows.data,
                                strides=strides)
        page_scales = T.decl_buffer((max_num_pages, 2, num_kv_heads, page_size, row_bytes // 2), "float16",
                                    data=pages.data)
        for b in range(batch_size):
            rows: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
            keys: T.let[T.int32] = _cached_length(page_indptr, length_info, page_size, b)
            q_offset: T.let[T.int32] = _first_position(q_positions, q_indptr, b, total_len) - k_offsets[b]
            if rows < FEW_ROWS:
                for item in T.parallel(rows * num_q_heads):
                    row: T.let[T.int32] = item // num_q_heads
                    attend(q, q_indptr[b] + row, item % num_q_heads, (pages, page_scales, page_values),
                           page_indptr[b], start(sm_scale < T.float32(0), q_offset + row),
                           _visible(causal, keys, rows, row), output, lse, _magnitude(window, sm_scale))
            else:
                for head in T.parallel(num_q_heads):
                    attend_rows(q, q_indptr[b], rows, head, (pages, page_scales, page_values), page_indptr[b], keys,
                                causal, output, lse, _magnitude(window, sm_scale), sm_scale < T.float32(0), q_offset)
    return opaque(batch_prefill_paged_kv_cpu)


def _grouped_softmax(head_dim: int, group: int, key, value, softcap: float | None):
    """Decode attention of the `group` query heads that share one key head, over keys [first, last) of one
    sequence, as a TVMScript macro: each key and value row is loaded (and dequantized) once for all of them.
    Writes the chunk's normalised output and base-2 log-sum-exp into `part_out`/`part_lse` at `split`."""
    vectors = head_dim // 8
    capped = _capping(softcap, 1)

    @T.macro
    def attend(q, b, kv_head, src, base, first, last, part_out, part_lse, split, scale):
        query = T.alloc_buffer((group * head_dim,), "float32")
        acc = T.alloc_buffer((group * head_dim,), "float32")
        row = T.alloc_buffer((head_dim,), "float32")
        scores = T.alloc_buffer((group * BLOCK,), "float32")
        partial = T.alloc_buffer((CHAINS * 8,), "float32")
        state = T.alloc_buffer((2 * group,), "float32")  # per head: running max, running sum (base 2)
        # The chunk's bounds go through memory: as let-bound expressions, TVM's simplifier would expand them into
        # every unrolled index and take minutes.
        span = T.alloc_buffer((2,), "int32")
        span[0] = first
        span[1] = last - first
        for g in T.unroll(group):
            for vec in T.unroll(vectors):
                query[T.Ramp(g * head_dim + vec * 8, 1, 8)] = \
                    q[b, kv_head * group + g, T.Ramp(vec * 8, 1, 8)] * T.Broadcast(scale * T.float32(LOG2E), 8)
                acc[T.Ramp(g * head_dim + vec * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
            state[2 * g] = T.float32(EMPTY)
            state[2 * g + 1] = T.float32(0)
        for block in range((span[1] + BLOCK - 1) // BLOCK):
            # Keys past the chunk score EMPTY and weigh 0; their rows (clamped, in bounds) are read anyway, so the
            # block has no branches.
            for t in T.unroll(BLOCK):
                for vec in T.unroll(vectors):
                    row[T.Ramp(vec * 8, 1, 8)] = key(
                        src, base, kv_head, span[0] + T.min(block * BLOCK + t, span[1] - 1), vec * 8, 8)
                for g in T.unroll(group):
                    for c in T.unroll(CHAINS):
                        partial[T.Ramp(c * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
                    for vec in T.unroll(vectors):
                        partial[T.Ramp(vec % CHAINS * 8, 1, 8)] = partial[T.Ramp(vec % CHAINS * 8, 1, 8)] + \
                            query[T.Ramp(g * head_dim + vec * 8, 1, 8)] * row[T.Ramp(vec * 8, 1, 8)]
                    for c in T.unroll(1, CHAINS):
                        partial[T.Ramp(0, 1, 8)] = partial[T.Ramp(0, 1, 8)] + partial[T.Ramp(c * 8, 1, 8)]
                    scores[g * BLOCK + t] = capped(_sum8(partial, 0))
            inside = T.Ramp(block * BLOCK, 1, BLOCK) < T.Broadcast(span[1], BLOCK)
            for g in T.unroll(group):
                scores[T.Ramp(g * BLOCK, 1, BLOCK)] = T.Select(inside, scores[T.Ramp(g * BLOCK, 1, BLOCK)],
                                                               T.Broadcast(T.float32(EMPTY), BLOCK))
                top: T.let[T.float32] = T.max(state[2 * g], _max8(scores, g * BLOCK))
                rescale: T.let[T.float32] = T.exp2(state[2 * g] - top)
                state[2 * g] = top
                scores[T.Ramp(g * BLOCK, 1, BLOCK)] = T.Select(
                    inside, exp2(scores[T.Ramp(g * BLOCK, 1, BLOCK)] - T.Broadcast(top, BLOCK)),
                    T.Broadcast(T.float32(0), BLOCK))
                state[2 * g + 1] = state[2 * g + 1] * rescale + _sum8(scores, g * BLOCK)
                for vec in T.unroll(vectors):
                    acc[T.Ramp(g * head_dim + vec * 8, 1, 8)] = acc[T.Ramp(g * head_dim + vec * 8, 1, 8)] * \
                        T.Broadcast(rescale, 8)
            for t in T.unroll(BLOCK):
                for vec in T.unroll(vectors):
                    row[T.Ramp(vec * 8, 1, 8)] = value(src, base, kv_head,
                                                       span[0] + T.min(block * BLOCK + t, span[1] - 1), vec * 8, 8)
                for g in T.unroll(group):
                    for vec in T.unroll(vectors):
                        acc[T.Ramp(g * head_dim + vec * 8, 1, 8)] = acc[T.Ramp(g * head_dim + vec * 8, 1, 8)] + \
                            T.Broadcast(scores[g * BLOCK + t], 8) * row[T.Ramp(vec * 8, 1, 8)]
        for g in T.unroll(group):
            if span[1] > 0:
                for vec in T.unroll(vectors):
                    part_out[b, kv_head * group + g, split, T.Ramp(vec * 8, 1, 8)] = \
                        acc[T.Ramp(g * head_dim + vec * 8, 1, 8)] / T.Broadcast(state[2 * g + 1], 8)
                part_lse[b, kv_head * group + g, split] = state[2 * g] + T.log2(state[2 * g + 1])
            else:
                for vec in T.unroll(vectors):
                    part_out[b, kv_head * group + g, split, T.Ramp(vec * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
                part_lse[b, kv_head * group + g, split] = T.float32(EMPTY)
    return attend


def paged_decode(storage: KVStorage, num_kv_heads: int, num_q_heads: int, head_dim: int, softcap: float | None,
                 window: int | None, page_size: int, max_splits: int):
    """One new token per sequence. Work items are (sequence, key head, chunk of keys); a sequence's keys are
    split into as many chunks (at most `max_splits`, each of at least MIN_CHUNK keys) as make about
    `max_splits` items; 1 turns the split off."""
    shape = geometry(storage, num_q_heads, num_kv_heads, head_dim)
    reader = RowReader(storage, head_dim)
    group = num_q_heads // num_kv_heads
    attend = _grouped_softmax(head_dim, group, paged_loader(reader, page_size, 0), paged_loader(reader, page_size, 1),
                              softcap)
    start = _window_start(window)
    row_bytes = _bytes(shape)
    strides = _query_strides(shape, head_dim)

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
        q_rows = T.match_buffer(var_q, (batch_size, shape.q_heads, shape.width), shape.dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, num_kv_heads, page_size, shape.width), shape.dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset)
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_offset)
        k_offsets = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        q_positions = T.match_buffer(var_q_rope_position, (batch_size,), "int32", elem_offset=q_rope_offset)
        output_rows = T.match_buffer(var_output, (batch_size, shape.q_heads, shape.width), shape.dtype)
        lse = T.match_buffer(var_lse, (batch_size, shape.q_heads), "float32")
        q = T.decl_buffer((batch_size, num_q_heads, head_dim), "float32", data=q_rows.data, strides=strides)
        output = T.decl_buffer((batch_size, num_q_heads, head_dim), "float32", data=output_rows.data,
                                strides=strides)
        page_scales = T.decl_buffer((max_num_pages, 2, num_kv_heads, page_size, row_bytes // 2), "float16",
                                    data=pages.data)
        part_out = T.alloc_buffer((batch_size, num_q_heads, max_splits, head_dim), "float32")
        part_lse = T.alloc_buffer((batch_size, num_q_heads, max_splits), "float32")
        splits: T.let[T.int32] = T.max(1, T.min(max_splits, (max_splits + batch_size * num_kv_heads - 1) //
                                                (batch_size * num_kv_heads)))
        for item in T.parallel(batch_size * num_kv_heads * splits):
            b: T.let[T.int32] = item // (num_kv_heads * splits)
            kv_head: T.let[T.int32] = item // splits % num_kv_heads
            split: T.let[T.int32] = item % splits
            keys: T.let[T.int32] = _cached_length(page_indptr, length_info, page_size, b)
            first: T.let[T.int32] = start(sm_scale < T.float32(0), q_positions[b] - k_offsets[b])
            chunk: T.let[T.int32] = T.max((keys - first + splits - 1) // splits, MIN_CHUNK)
            attend(q, b, kv_head, (pages, page_scales, page_values), page_indptr[b],
                   T.min(first + split * chunk, keys), T.min(first + split * chunk + chunk, keys), part_out, part_lse,
                   split, _magnitude(window, sm_scale))
        for item in T.parallel(batch_size * num_q_heads):
            b: T.let[T.int32] = item // num_q_heads
            head: T.let[T.int32] = item % num_q_heads
            top = T.alloc_buffer((2,), "float32")  # the largest log-sum-exp, then the sum of the chunks' weights
            top[0] = T.float32(EMPTY)
            for split in range(splits):
                top[0] = T.max(top[0], part_lse[b, head, split])
            top[1] = T.float32(0)
            for vec in T.unroll(head_dim // 8):
                output[b, head, T.Ramp(vec * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
            for split in range(splits):
                weight: T.let[T.float32] = T.exp2(part_lse[b, head, split] - top[0])
                top[1] = top[1] + weight
                for vec in T.unroll(head_dim // 8):
                    output[b, head, T.Ramp(vec * 8, 1, 8)] = output[b, head, T.Ramp(vec * 8, 1, 8)] + \
                        T.Broadcast(weight, 8) * part_out[b, head, split, T.Ramp(vec * 8, 1, 8)]
            for vec in T.unroll(head_dim // 8):
                output[b, head, T.Ramp(vec * 8, 1, 8)] = output[b, head, T.Ramp(vec * 8, 1, 8)] / \
                    T.Broadcast(top[1], 8)
            lse[b, head] = top[0] + T.log2(top[1])
    return opaque(batch_decode_paged_kv)


def supported(storage: KVStorage, head_dim: int) -> bool:
    return head_dim % 8 == 0 and (not storage.scaled or head_dim % 32 == 0)
