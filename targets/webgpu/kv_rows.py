"""The vulkan target's KV-cache rows in each storage format of ir/kv_storage.py, read and written in TIR
that WGSL can hold.

f32 and f16 rows are float pools (f16 through the device's shader-f16). WGSL has no 8-bit integers and
cannot view float16 bits, so a quantized row is kept as 32-bit words holding the bytes of the CPU's row
(codes, then one float16 scale per group of 32, padded to a word), and a scale is converted to and from
its 16 bits with integer arithmetic (round to nearest even, as the CPU's cast does). q4 rows hold
Hadamard-rotated rows (targets/hadamard_rotation.py): a query rotated the same way scores them
unchanged, and an output summed from them is rotated back.
"""

from __future__ import annotations

from typing import Any

from tvm.script import tirx as T

from llmc.ir.kv_storage import GROUP, KVStorage

from ..hadamard_rotation import row_rotation

HALF_GROUP = GROUP // 2
HALF_REBIAS = (127 - 15) << 23  # float32 bits minus float16 bits (shifted up by 13) for the same normal number
HALF_MIN_NORMAL = 0x38800000    # 2^-14 as float32 bits: below it, float16 numbers are subnormal


def pool_dtype(storage: KVStorage, dtype: str) -> str:
    """The element type of a pool of `storage` rows for activations of `dtype`."""
    return {"f32": dtype, "f16": "float16"}.get(storage.name, "int32")


def row_width(storage: KVStorage, head_dim: int) -> int:
    """Elements of a row in its pool."""
    return head_dim if not storage.scaled else storage.row_bytes(head_dim) // 4


def half_bits(x: Any) -> Any:
    """The float16 bits (in an int32) nearest to float32 `x`, which is finite and below 65520 in magnitude."""
    bits = T.reinterpret("int32", x)
    magnitude = bits & 0x7FFFFFFF
    normal = (magnitude - HALF_REBIAS + 0xFFF + ((magnitude >> 13) & 1)) >> 13
    subnormal = T.Cast("int32", T.round(T.fabs(x) * T.float32(2.0 ** 24)))
    return ((bits >> 16) & 0x8000) | T.if_then_else(magnitude < HALF_MIN_NORMAL, subnormal, normal)


def from_half_bits(h: Any) -> Any:
    """The float32 value of the float16 bits in int32 `h` (no subnormal float32 is formed on the way)."""
    magnitude = h & 0x7FFF
    value = T.if_then_else(magnitude < 0x400, T.Cast("float32", magnitude) * T.float32(2.0 ** -24),
                           T.reinterpret("float32", (magnitude << 13) + HALF_REBIAS))
    return T.if_then_else((h & 0x8000) != 0, -value, value)


class WordRows:
    """Values of the rows of a pool of `storage`, as float32; `index` is (page, k or v, head, slot)."""

    def __init__(self, storage: KVStorage, head_dim: int):
        self.storage = storage
        self.scale_word = storage.code_bytes(head_dim) // 4

    def scale(self, pages: Any, index: tuple, group: Any) -> Any:
        word = pages[(*index, self.scale_word + group // 2)]
        return from_half_bits((word >> (group % 2 * 16)) & 0xFFFF)

    def value(self, pages: Any, index: tuple, i: Any, scale: Any) -> Any:
        """Value i of the row; `scale` is the scale of its group (ignored by float rows)."""
        if not self.storage.scaled:
            return T.Cast("float32", pages[(*index, i)])
        if self.storage.code_bits == 8:
            word = pages[(*index, i // 4)]
            return T.Cast("float32", (word << (24 - i % 4 * 8)) >> 24) * scale
        byte = i // GROUP * HALF_GROUP + i % HALF_GROUP
        nibble = (pages[(*index, byte // 4)] >> (byte % 4 * 8 + i % GROUP // HALF_GROUP * 4)) & 15
        return T.Cast("float32", nibble - 8) * scale


def row_writer(storage: KVStorage, head_dim: int):
    """A macro storing float32 `row` (head_dim values, a local buffer it may change) at `index` of `pages`:
    cast for float rows; for quantized ones rotated (q4), scaled per group, packed into words."""
    groups = head_dim // GROUP
    scale_word = storage.code_bytes(head_dim) // 4
    words_per_group = GROUP * storage.code_bits // 32
    rotate = row_rotation(head_dim)

    def code(value: Any, inverse: Any) -> Any:
        if storage.code_bits == 8:
            return T.Cast("int32", T.max(T.min(T.round(value * inverse), T.float32(127)), T.float32(-127))) & 0xFF
        return T.Cast("int32", T.max(T.min(T.round(value * inverse) + T.float32(8), T.float32(15)), T.float32(0)))

    @T.macro
    def write_quantized(row, pages, page, which, head, slot):
        state = T.alloc_buffer((3,), "float32", scope="local")  # the group's extreme, scale, 1 / scale
        word = T.alloc_buffer((1,), "int32", scope="local")
        scales = T.alloc_buffer(((groups + 1) // 2,), "int32", scope="local")
        for pair in range((groups + 1) // 2):
            scales[pair] = 0
        if storage.rotated:
            rotate(row)
        for g in range(groups):
            state[0] = T.float32(0)
            for i in range(GROUP):
                if storage.code_bits == 8:
                    state[0] = T.max(state[0], T.fabs(row[g * GROUP + i]))
                elif T.fabs(row[g * GROUP + i]) > T.fabs(state[0]):
                    state[0] = row[g * GROUP + i]
            bits: T.let[T.int32] = half_bits(state[0] / T.float32(127 if storage.code_bits == 8 else -8))
            scales[g // 2] = scales[g // 2] | (bits << (g % 2 * 16))
            state[1] = from_half_bits(bits)
            state[2] = T.if_then_else(state[1] != T.float32(0), T.float32(1) / state[1], T.float32(0))
            for w in range(words_per_group):
                word[0] = 0
                for j in range(4):  # the word's bytes
                    if storage.code_bits == 8:
                        word[0] = word[0] | (code(row[g * GROUP + w * 4 + j], state[2]) << (j * 8))
                    else:
                        # byte b of the group holds value b (low nibble) and value b + 16 (high nibble)
                        low: T.let[T.int32] = code(row[g * GROUP + w * 4 + j], state[2])
                        high: T.let[T.int32] = code(row[g * GROUP + w * 4 + j + HALF_GROUP], state[2])
                        word[0] = word[0] | ((low | (high << 4)) << (j * 8))
                pages[page, which, head, slot, g * words_per_group + w] = word[0]
        for pair in range((groups + 1) // 2):
            pages[page, which, head, slot, scale_word + pair] = scales[pair]

    @T.macro
    def write_float(row, pages, page, which, head, slot):
        for i in range(head_dim):
            pages[page, which, head, slot, i] = T.Cast(pages.dtype, row[i])

    return write_quantized if storage.scaled else write_float
