"""Reading stored KV-cache rows in the CPU attention kernels: 1 or 8 values of one token's key or
value for one head, as float32, whatever the cache's storage format (ir/kv_storage.py).

A row is read through two views of the same bytes: `rows` in the storage's container dtype (the
codes) and `scales`, the same memory as float16, where a quantized row keeps one scale per group
after its codes.
"""

from __future__ import annotations

from typing import Any

from tvm.script import tirx as T

from llmc.ir.kv_storage import GROUP, KVStorage

HALF_GROUP = GROUP // 2


def _vector(value: Any, lanes: int) -> Any:
    return value if lanes == 1 else T.Broadcast(value, lanes)


class RowReader:
    def __init__(self, storage: KVStorage, head_dim: int):
        self.storage = storage
        # Where the scales start, in float16 units from the start of the row.
        self.scale_at = storage.code_bytes(head_dim) // 2

    def load(self, rows: Any, scales: Any, index: tuple, d: Any, lanes: int) -> Any:
        """Values d .. d + lanes of the row at `index` (d a multiple of `lanes`, lanes 1 or 8)."""
        f32 = "float32" if lanes == 1 else f"float32x{lanes}"
        span = d if lanes == 1 else T.Ramp(d, 1, lanes)
        name = self.storage.name
        if name == "f32":
            return rows[(*index, span)]
        if name == "f16":
            return T.Cast(f32, rows[(*index, span)])
        scale = _vector(T.Cast("float32", scales[(*index, self.scale_at + d // GROUP)]), lanes)
        if name == "q8":
            return T.Cast(f32, rows[(*index, span)]) * scale
        byte = d // GROUP * HALF_GROUP + d % HALF_GROUP
        raw = rows[(*index, byte if lanes == 1 else T.Ramp(byte, 1, lanes))]
        shift = _vector(T.Cast("int8", d % GROUP // HALF_GROUP * 4), lanes)
        code = T.Cast(f32, (raw >> shift) & _vector(T.int8(15), lanes))
        return (code - _vector(T.float32(8), lanes)) * scale


def ragged_loader(reader: RowReader, which: int):
    """Rows of the step's own keys (which=0) or values (1): src = (k, k_scales, v, v_scales)."""
    def load(src, base, kv_head, j, d, lanes):
        return reader.load(src[2 * which], src[2 * which + 1], (base + j, kv_head), d, lanes)
    return load


def paged_loader(reader: RowReader, page_size: int, which: int):
    """Rows of a sequence's cached keys (which=0) or values (1): src = (pages, page_scales, page_values)."""
    def load(src, base, kv_head, j, d, lanes):
        page = src[2][base + j // page_size]
        return reader.load(src[0], src[1], (page, which, kv_head, j % page_size), d, lanes)
    return load
