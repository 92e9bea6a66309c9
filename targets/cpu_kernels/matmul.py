"""Loop nests shared by the CPU matmul kernels (float and quantized weights), as TVMScript macros.

- `gemv_float`: few rows (decode); each parallel task takes ROWS_PER_TASK weight rows and
  keeps 16-lane accumulators over K in registers, so W streams from memory once per call.
- `gemm_panels`: many rows (prefill); each parallel task fills an NR-column panel of W
  (transposed, float: copied or dequantized, the on-the-fly packing BLAS does) and runs
  an MR x NR register tile, broadcasting one activation per row against NR/8 vectors.
- `int8_gemv`: few rows with quantized weights; activations are quantized per block of
  32 to int8 (scale and sums kept, as llama.cpp's Q8_1), and each block's dot product runs
  on AVX2's u8 x s8 multiply-add (`vpmaddubsw`, `vpmaddwd`). 4-bit weights are read two
  blocks to a 32-byte load: the activations are also kept in the nibbles' order (see
  `pair_dot`), so the low and the high nibbles of both blocks multiply as they lie, with no
  shuffle per weight block.
Epilogues add the bias and the residual when the kernel has them.
"""

from __future__ import annotations

from tvm.script import tirx as T

from llmc.ir.quant_formats import GROUP

GEMV_ROWS = 8
ROWS_PER_TASK = 4
ROW_TILE = 2  # activation rows per unpacked weight vector in the quantized GEMV
MR = 4
LANES = 16
IDX32 = [T.int32(i) for i in range(32)]


PREFETCH_TASKS_AHEAD = 2


def prefetch(buffer, row, column):
    """Ask for buffer[row, column]'s cache line ahead of use: the weights stream from memory once per call."""
    return T.call_llvm_intrin("void", "llvm.prefetch", T.address_of(buffer[row, column]), T.int32(0), T.int32(3),
                              T.int32(1))


def lane_sum(acc, base: int, lanes: int = LANES):
    """Sum of `lanes` accumulator lanes from `base` (a PrimExpr tree, built while TVMScript parses)."""
    total = acc[base]
    for lane in range(1, lanes):
        total = total + acc[base + lane]
    return total


def panel_width(n: int) -> int | None:
    return next((w for w in (24, 16, 8) if n % w == 0), None)


def epilogue(value, bias, res, row, col):
    if bias is not None:
        value = value + bias[col]
    if res is not None:
        value = value + res[row, col]
    return value


def gemv_float(n: int, k: int):
    """Few rows times a float32, float16 or bfloat16 weight (each 16-lane load converted to float32)."""
    rows = ROWS_PER_TASK

    @T.macro
    def gemv(x, w, bias, res, y, m):
        for nb in T.parallel(n // rows):
            acc = T.alloc_buffer((rows * LANES,), "float32")
            for i in range(m):
                for r in T.unroll(rows):
                    acc[T.Ramp(r * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                for kl in range(k // LANES):
                    for r in T.unroll(rows):
                        T.evaluate(prefetch(w, T.min(nb * rows + PREFETCH_TASKS_AHEAD * rows + r, n - 1), kl * LANES))
                        acc[T.Ramp(r * LANES, 1, LANES)] = acc[T.Ramp(r * LANES, 1, LANES)] + \
                            T.Cast(f"float32x{LANES}", w[nb * rows + r, T.Ramp(kl * LANES, 1, LANES)]) * \
                            x[i, T.Ramp(kl * LANES, 1, LANES)]
                for r in T.unroll(rows):
                    y[i, nb * rows + r] = epilogue(lane_sum(acc, r * LANES), bias, res, i, nb * rows + r)
    return gemv


def gemm_panels(n: int, k: int, fill_panel):
    """`fill_panel(panel, first_row, ...)` is a macro writing W[first_row + j, kk] to panel[kk * NR + j]."""
    NR = panel_width(n)
    NV = NR // 8

    @T.macro
    def gemm(x, weights, bias, res, y, m):
        for p in T.parallel(n // NR):
            panel = T.alloc_buffer((k * NR,), "float32")
            acc = T.alloc_buffer((MR * NR,), "float32")
            fill_panel(panel, p * NR, weights)
            for mo in range(m // MR):
                for i in T.unroll(MR):
                    for v in T.unroll(NV):
                        acc[T.Ramp(i * NR + v * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
                for kk in range(k):
                    for i in T.unroll(MR):
                        for v in T.unroll(NV):
                            acc[T.Ramp(i * NR + v * 8, 1, 8)] = acc[T.Ramp(i * NR + v * 8, 1, 8)] + \
                                T.Broadcast(x[mo * MR + i, kk], 8) * panel[T.Ramp(kk * NR + v * 8, 1, 8)]
                for i in T.unroll(MR):
                    for j in range(NR):
                        y[mo * MR + i, p * NR + j] = epilogue(acc[i * NR + j], bias, res, mo * MR + i, p * NR + j)
            for tail in range(m % MR):
                row = m - m % MR + tail
                for v in T.unroll(NV):
                    acc[T.Ramp(v * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
                for kk in range(k):
                    for v in T.unroll(NV):
                        acc[T.Ramp(v * 8, 1, 8)] = acc[T.Ramp(v * 8, 1, 8)] + \
                            T.Broadcast(x[row, kk], 8) * panel[T.Ramp(kk * NR + v * 8, 1, 8)]
                for j in range(NR):
                    y[row, p * NR + j] = epilogue(acc[j], bias, res, row, p * NR + j)
    return gemm


def int8_gemv(n: int, k: int, bits: int, group: int, has_mins: bool, vnni: bool):
    """Decode matmul on grouped quantized weights (ir/quant_formats.py) with int8 activations.

    The integer dot products run per block of 32 inputs (the activations' group); a weight
    group of 16 takes the low and the high half of each block's 8 partial sums. Activation rows
    go ROW_TILE at a time, so that each weight vector loaded and unpacked serves all of them
    (a speculative draft's rows cost less than as many decode steps). With `vnni` (AVX-512 VNNI)
    the u8 x s8 products sum straight into int32 lanes (`vpdpbusd`), one instruction where AVX2
    needs two; the sums are the same integers."""
    rows = ROWS_PER_TASK
    blocks = k // GROUP
    groups = k // group
    per_block = GROUP // group
    # 4-bit weights run two blocks at a time (an odd last block alone); group-32 scales only, as 4-bit formats have.
    pairs = blocks // 2 if bits == 4 and per_block == 1 else 0

    def products(unsigned, signed, into=None):
        """int32x8 sums of 4 adjacent u8 x s8 products (added to `into`, if given)."""
        if vnni:
            start = T.Broadcast(T.int32(0), 8) if into is None else into
            return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", start, unsigned, signed)
        pairs16 = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", unsigned, signed)
        sums = T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs16, T.Broadcast(T.int16(1), 16))
        return sums if into is None else into + sums

    def group_dot(codes, xq, row, i, g):
        """int32x8 partial sums of codes(row, block g) . xq(row i, block g); lanes 4l..4l+3 hold inputs 4l..4l+3."""
        if bits == 4:  # low nibbles then high nibbles: one 16-bit shift (x86 has no 8-bit one), one mask
            packed = codes[row, T.Ramp(g * 16, 1, 16)]
            high = T.reinterpret("uint8x16", T.shift_right(T.reinterpret("uint16x8", packed),
                                                           T.Broadcast(T.uint16(4), 8)))
            unsigned = T.bitwise_and(T.Shuffle([packed, high], IDX32), T.Broadcast(T.uint8(15), 32))
            signed = xq[i, T.Ramp(g * GROUP, 1, GROUP)]
        else:  # |w| x (x with the sign of w): the operands vpmaddubsw needs, without overflow
            weights = codes[row, T.Ramp(g * GROUP, 1, GROUP)]
            unsigned = T.reinterpret("uint8x32", T.abs(weights))
            signed = T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", xq[i, T.Ramp(g * GROUP, 1, GROUP)],
                                             weights)
        return products(unsigned, signed)

    def pair_dot(codes, xn, row, i, p):
        """int32x8 partial sums of blocks 2p and 2p + 1 of codes(row) with the activations: lanes 0-3 the first
        block's, lanes 4-7 the second's. One 32-byte load holds both blocks; its low nibbles are inputs 0-15 of
        each, its high nibbles inputs 16-31, which is the order `xn` keeps the activations in. (Without VNNI the
        two int16 products add without overflow: at most 2 x 2 x 15 x 127 per lane.)"""
        packed = codes[row, T.Ramp(p * GROUP, 1, GROUP)]
        high = T.reinterpret("uint8x32", T.shift_right(T.reinterpret("uint16x16", packed),
                                                       T.Broadcast(T.uint16(4), 16)))
        nibble = T.Broadcast(T.uint8(15), 32)
        low_x, high_x = xn[i, T.Ramp(p * 2 * GROUP, 1, GROUP)], xn[i, T.Ramp(p * 2 * GROUP + GROUP, 1, GROUP)]
        if vnni:
            return products(T.bitwise_and(high, nibble), high_x, products(T.bitwise_and(packed, nibble), low_x))
        low_products = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", T.bitwise_and(packed, nibble),
                                               low_x)
        high_products = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", T.bitwise_and(high, nibble),
                                                high_x)
        return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", low_products + high_products,
                                       T.Broadcast(T.int16(1), 16))

    def pair_scale(scale, r, p):
        """The 8 lanes' float scales of blocks 2p (lanes 0-3) and 2p + 1 (lanes 4-7)."""
        return T.Shuffle([T.Broadcast(scale[r * groups + 2 * p], 4), T.Broadcast(scale[r * groups + 2 * p + 1], 4)],
                         IDX32[:8])

    def block_scale(scale, r, g):
        """The 8 lanes' float scales of block g: one scale, or (group 16) one per half."""
        if per_block == 1:
            return T.Broadcast(scale[r * groups + g], 8)
        return T.Shuffle([T.Broadcast(scale[r * groups + 2 * g], 4), T.Broadcast(scale[r * groups + 2 * g + 1], 4)],
                         IDX32[:8])

    def group_offset(scales, mins, row, h, lanes: int):
        """What weight groups add per unit of their activation sums, as float32 (x `lanes`): their minimums,
        or -8 scales for 4-bit codes without minimums (Q4_0's q - 8)."""
        dtype = "float32" if lanes == 1 else f"float32x{lanes}"
        if has_mins:
            return T.Cast(dtype, mins[row, h])
        minus_eight = T.float32(-8) if lanes == 1 else T.Broadcast(T.float32(-8), lanes)
        return T.Cast(dtype, scales[row, h]) * minus_eight

    def row_tile(tile: int):
        """The macro for `tile` activation rows from row i0 against the task's `rows` weight rows; `slot(t, r)`
        is the accumulator slot of activation row i0 + t and weight row r."""
        def slot(t, r):
            return t * rows + r

        @T.macro
        def rows_from(i0, nb, xd, xs, xq, xn, codes, scales, mins, bias, res, y, acc, offset, scale):
            # Per row pair and weight group: the weight scale times the activation scale, and the minimums' share
            # (minimum . activation sums), computed 8 groups at a time before the integer dot products.
            for t in T.unroll(tile):
                for r in T.unroll(rows):
                    acc[T.Ramp(slot(t, r) * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
                    offset[T.Ramp(slot(t, r) * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
                    for c in range(groups // 8):
                        scale[T.Ramp(slot(t, r) * groups + c * 8, 1, 8)] = \
                            T.Cast("float32x8", scales[nb * rows + r, T.Ramp(c * 8, 1, 8)]) * \
                            xd[i0 + t, T.Ramp(c * 8, 1, 8)]
                        if has_mins or bits == 4:
                            offset[T.Ramp(slot(t, r) * 8, 1, 8)] = offset[T.Ramp(slot(t, r) * 8, 1, 8)] + \
                                group_offset(scales, mins, nb * rows + r, T.Ramp(c * 8, 1, 8), 8) * \
                                xs[i0 + t, T.Ramp(c * 8, 1, 8)]
                    for h in range(groups - groups % 8, groups):
                        scale[slot(t, r) * groups + h] = T.Cast("float32", scales[nb * rows + r, h]) * xd[i0 + t, h]
                        if has_mins or bits == 4:
                            offset[slot(t, r) * 8] = offset[slot(t, r) * 8] + \
                                group_offset(scales, mins, nb * rows + r, h, 1) * xs[i0 + t, h]
            for p in range(pairs):
                for r in T.unroll(rows):
                    T.evaluate(prefetch(codes, T.min(nb * rows + PREFETCH_TASKS_AHEAD * rows + r, n - 1), p * GROUP))
                    for t in T.unroll(tile):  # the unpacked weights are the same expression for every t: computed once
                        acc[T.Ramp(slot(t, r) * 8, 1, 8)] = acc[T.Ramp(slot(t, r) * 8, 1, 8)] + \
                            T.Cast("float32x8", pair_dot(codes, xn, nb * rows + r, i0 + t, p)) * \
                            pair_scale(scale, slot(t, r), p)
            for g in range(2 * pairs, blocks):
                for r in T.unroll(rows):
                    T.evaluate(prefetch(codes, T.min(nb * rows + PREFETCH_TASKS_AHEAD * rows + r, n - 1),
                                        g * (GROUP // 2 if bits == 4 else GROUP)))
                    for t in T.unroll(tile):
                        acc[T.Ramp(slot(t, r) * 8, 1, 8)] = acc[T.Ramp(slot(t, r) * 8, 1, 8)] + \
                            T.Cast("float32x8", group_dot(codes, xq, nb * rows + r, i0 + t, g)) * \
                            block_scale(scale, slot(t, r), g)
            for t in T.unroll(tile):
                for r in T.unroll(rows):
                    y[i0 + t, nb * rows + r] = epilogue(lane_sum(offset, slot(t, r) * 8, 8) +
                                                        lane_sum(acc, slot(t, r) * 8, 8), bias, res, i0 + t,
                                                        nb * rows + r)
        return rows_from

    tiled, single = row_tile(ROW_TILE), row_tile(1)

    @T.macro
    def gemv(x, codes, scales, mins, bias, res, y, m):
        xq = T.alloc_buffer((m, k), "int8")
        xd = T.alloc_buffer((m, groups), "float32")  # the activation scale of the block holding each weight group
        xs = T.alloc_buffer((m, groups), "float32")  # that scale times the group's sum of int8 activations
        # The int8 activations in the nibbles' order: per pair of blocks, inputs 0-15 of both, then 16-31 of both.
        xn = T.alloc_buffer((m, k), "int8")
        amax = T.alloc_buffer((1,), "float32")
        for i in range(m):
            for g in range(blocks):  # one 32-lane vector per block: its largest magnitude, codes and code sums
                amax[0] = T.call_llvm_pure_intrin("float32", "llvm.vector.reduce.fmax",
                                                  T.abs(x[i, T.Ramp(g * GROUP, 1, GROUP)]))
                xq[i, T.Ramp(g * GROUP, 1, GROUP)] = T.Cast(f"int8x{GROUP}", T.round(
                    x[i, T.Ramp(g * GROUP, 1, GROUP)] * T.Broadcast(T.if_then_else(
                        amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0)), GROUP)))
                for part in range(per_block):
                    xd[i, g * per_block + part] = amax[0] / T.float32(127)
                    code_sum = T.call_llvm_pure_intrin(
                        "int32", "llvm.vector.reduce.add",
                        T.Cast(f"int32x{group}", xq[i, T.Ramp(g * GROUP + part * group, 1, group)]))
                    xs[i, g * per_block + part] = xd[i, g * per_block + part] * T.Cast("float32", code_sum)
            for p in range(pairs):
                for half in range(2):
                    for b in range(2):
                        xn[i, T.Ramp(p * 64 + half * 32 + b * 16, 1, 16)] = \
                            xq[i, T.Ramp((2 * p + b) * GROUP + half * 16, 1, 16)]
        for nb in T.parallel(n // rows):
            acc = T.alloc_buffer((ROW_TILE * rows * 8,), "float32")
            offset = T.alloc_buffer((ROW_TILE * rows * 8,), "float32")
            scale = T.alloc_buffer((ROW_TILE * rows * groups,), "float32")
            for it in range(m // ROW_TILE):
                tiled(it * ROW_TILE, nb, xd, xs, xq, xn, codes, scales, mins, bias, res, y, acc, offset, scale)
            for i in range(m - m % ROW_TILE, m):
                single(i, nb, xd, xs, xq, xn, codes, scales, mins, bias, res, y, acc, offset, scale)
    return gemv
