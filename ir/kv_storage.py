"""How the paged KV cache stores keys and values: f32, f16, q8 or q4, defined once.

A quantized row (one token's key or value for one head) holds its codes first, then one
float16 scale per group of 32 values, as llama.cpp's q8_0 and q4_0 blocks do:

- q8: code = round(x / d) in [-127, 127], d = max|x| / 127; 8.5 bits per value.
- q4: code = round(x / d) + 8 in [0, 15], d = (the value of largest magnitude) / -8; byte i of a
  group holds value i in its low nibble and value i + 16 in its high one; 4.5 bits per value.
- q4 first rotates the row by the normalised Hadamard matrix in blocks of `rotation_size` (the
  whole head where its size is a power of two), which spreads an outlier channel over the block
  (llama.cpp's PR #21038); on SmolLM2 rotating whole heads of 64 costs less perplexity than groups
  of 32 (benchmarks/RESULTS.md). The rotation is orthonormal and symmetric: queries are rotated the
  same way, so q . k is unchanged, and the attention output is rotated back.

TVM's runtime cache holds pages of one dtype whose rows are as wide as the queries it is given,
so a cache that is not f32 is described to it in *container* terms (`Geometry`): rows of
`row_bytes` bytes, and queries and outputs packed as float32 bytes into rows of that width. The
NumPy functions here are the reference that the interpreter and the tests use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import IRError

GROUP = 32


@dataclass(frozen=True)
class KVStorage:
    name: str
    description: str
    container: str      # the dtype of the runtime's pages
    code_bits: int      # bits per stored value (scales not counted)
    scaled: bool        # one float16 scale per GROUP values after the codes
    rotated: bool       # a Hadamard rotation of the row (blocks of rotation_size) before quantizing

    def code_bytes(self, head_dim: int) -> int:
        """Bytes of a row's codes; its float16 scales follow them."""
        return head_dim * self.code_bits // 8

    def row_bytes(self, head_dim: int) -> int:
        """Bytes of one token's key (or value) for one head: codes and scales, padded to whole float32 words
        (queries and outputs are float32 packed into the same rows)."""
        size = self.code_bytes(head_dim) + (head_dim // GROUP * 2 if self.scaled else 0)
        return -(-size // 4) * 4

    def bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        return 2 * num_layers * num_kv_heads * self.row_bytes(head_dim)

    def check(self, head_dim: int) -> None:
        if self.scaled and head_dim % GROUP:
            raise IRError(f"a {self.name} KV cache quantizes groups of {GROUP} values; this model's head size "
                          f"{head_dim} is not a multiple of {GROUP} (use --kv-cache f16 or f32)")
        if head_dim % 8:
            raise IRError(f"llmc's attention kernels read heads in vectors of 8; head size {head_dim} is not a "
                          "multiple of 8")

    def round_trip(self, x: np.ndarray) -> np.ndarray:
        """What attention sees of keys or values `x` (..., head_dim) after storing them."""
        if self.name == "f32":
            return x.astype(np.float32)
        if self.name == "f16":
            return x.astype(np.float16).astype(np.float32)
        rotation = block_hadamard(x.shape[-1]) if self.rotated else None
        rows = x.astype(np.float32) if rotation is None else x.astype(np.float32) @ rotation
        groups = rows.reshape(*x.shape[:-1], -1, GROUP)
        if self.code_bits == 8:
            scale = (np.abs(groups).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
            inverse = np.where(scale > 0, 1 / np.where(scale > 0, scale, 1), 0)
            codes = np.clip(np.rint(groups * inverse), -127, 127)
        else:
            index = np.abs(groups).argmax(-1)[..., None]
            scale = (np.take_along_axis(groups, index, -1) / -8).astype(np.float16).astype(np.float32)
            inverse = np.where(scale != 0, 1 / np.where(scale != 0, scale, 1), 0)
            codes = np.clip(np.rint(groups * inverse) + 8, 0, 15) - 8
        values = (codes * scale).reshape(x.shape)
        if rotation is not None:
            values = values @ rotation
        return values.astype(np.float32)


STORAGES = {s.name: s for s in (
    KVStorage("f32", "float32", "float32", 32, False, False),
    KVStorage("f16", "float16", "float16", 16, False, False),
    KVStorage("q8", "8-bit codes, a float16 scale per 32 values (q8_0)", "int8", 8, True, False),
    KVStorage("q4", "4-bit codes, a float16 scale per 32, Hadamard-rotated heads (q4_0 + rotation)", "int8", 4,
              True, True),
)}


def kv_storage(name: str) -> KVStorage:
    if name not in STORAGES:
        raise IRError(f"unknown KV cache format {name!r}; llmc knows {', '.join(STORAGES)}")
    return STORAGES[name]


def rotation_size(head_dim: int) -> int:
    """The block of a rotated format's Hadamard rotation: the largest power of two dividing the head size."""
    return head_dim & -head_dim


def block_hadamard(head_dim: int) -> np.ndarray:
    """The rotation of a whole row: Hadamard blocks of `rotation_size` on the diagonal."""
    return np.kron(np.eye(head_dim // rotation_size(head_dim), dtype=np.float32), hadamard(rotation_size(head_dim)))


def hadamard(size: int) -> np.ndarray:
    """The normalised Sylvester-Hadamard matrix of a power-of-two size (orthonormal and symmetric)."""
    matrix = np.ones((1, 1), dtype=np.float32)
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix / np.float32(np.sqrt(size))


@dataclass(frozen=True)
class Geometry:
    """The cache as TVM's runtime sees it: `q_heads` rows of queries (and outputs) and `kv_heads` rows
    of keys and values per token, each `width` elements of `dtype`."""

    dtype: str
    q_heads: int
    kv_heads: int
    width: int


def geometry(storage: KVStorage, num_q_heads: int, num_kv_heads: int, head_dim: int) -> Geometry:
    if storage.name == "f32":
        return Geometry("float32", num_q_heads, num_kv_heads, head_dim)
    itemsize = np.dtype(storage.container).itemsize
    width = storage.row_bytes(head_dim) // itemsize
    query_bytes = num_q_heads * head_dim * 4
    rows = -(-query_bytes // (width * itemsize))
    rows = -(-rows // num_kv_heads) * num_kv_heads  # whole groups of query heads per key head
    return Geometry(storage.container, rows, num_kv_heads, width)
