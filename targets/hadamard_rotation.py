"""The Hadamard rotation of a rotated KV-cache format (ir/kv_storage.py) in TIR, for every target's kernels.

A row is rotated in blocks of `rotation_size` values by the normalised Hadamard matrix, in place, with
the fast Walsh-Hadamard transform (log2(size) stages of butterflies). The matrix is its own inverse, so
the same rotation takes an output summed from rotated values back.
"""

from __future__ import annotations

import math
from typing import Any

from tvm.script import tirx as T

from llmc.ir.kv_storage import rotation_size


def row_rotation(head_dim: int):
    """A macro rotating values[0 : head_dim] in place."""
    size = rotation_size(head_dim)
    stages, half, norm = int(math.log2(size)), size // 2, 1 / math.sqrt(size)

    @T.macro
    def rotate(values):
        for block in range(head_dim // size):
            for stage in range(stages):
                for i in range(half):
                    low: T.let[T.int32] = block * size + i // (1 << stage) * (2 << stage) + i % (1 << stage)
                    high: T.let[T.int32] = low + (1 << stage)
                    a: T.let[T.float32] = values[low]
                    values[low] = a + values[high]
                    values[high] = a - values[high]
        for i in range(head_dim):
            values[i] = values[i] * T.float32(norm)

    return rotate


def hadamard_entry(i: Any, j: Any, size: int) -> Any:
    """Entry (i mod size, j mod size) of the normalised Hadamard matrix of a power-of-two `size`:
    +-1/sqrt(size), negative where i & j has an odd number of bits."""
    bits = i & j & (size - 1)
    shift = size // 2
    while shift:
        bits = bits ^ (bits >> shift)
        shift //= 2
    return T.if_then_else(bits & 1 == 1, T.float32(-1 / math.sqrt(size)), T.float32(1 / math.sqrt(size)))
