"""GGUF's quantized block formats (llama.cpp's ggml types), each defined once: its block
layout, and how its blocks become the IR's grouped quantized weight (ir/quant_formats.py)
without changing one value.

A tensor of shape (N, K) in a GGUF file is N rows of K / block blocks of `block_bytes`
bytes each. `to_quantized` turns those bytes into codes, scales and minimums whose
dequantization (scale * code + minimum, ir/quant_formats.py `dequantize`) is the NumPy
reference of the format; tests hold it equal, bit for bit, to gguf-py's `dequantize` on
tensors that llama.cpp wrote.

How each format maps (d, dmin: the block's fp16 scales; q: the stored code):
- Q4_0: d * (q - 8)            -> 4-bit codes q (offset by 8: no minimum), scale d
- Q4_1: d * q + m              -> 4-bit codes q, scale d, minimum m
- Q5_0: d * (q - 16)           -> 8-bit codes q - 16, scale d
- Q5_1: d * q + m              -> 8-bit codes q (0..31), scale d, minimum m
- Q8_0: d * q                  -> 8-bit codes q, scale d
- Q4_K: d*sc * q - dmin*m      -> 4-bit codes, fp32 scale d*sc and minimum -(dmin*m) per 32
- Q5_K: the same with 5-bit q  -> 8-bit codes
- Q6_K: d*sc * (q - 32)        -> 8-bit codes q - 32, fp32 scale d*sc per 16 inputs
(The fp32 products are exact: an 11-bit significand times a 6- or 8-bit integer.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .quant_formats import Quantized, pack_nibbles, unpack_nibbles

SUPER_BLOCK = 256


@dataclass(frozen=True)
class BlockFormat:
    name: str
    block: int
    block_bytes: int
    # (N, blocks, block_bytes) uint8 -> the IR's form
    decode: Callable[[np.ndarray], Quantized]

    def to_quantized(self, raw: np.ndarray, cols: int) -> Quantized:
        """A GGUF tensor's bytes, (N, K / block * block_bytes) or flat, of a weight with K = `cols` inputs."""
        if cols % self.block:
            raise ValueError(f"{self.name} stores whole blocks of {self.block} inputs; a row has {cols}")
        blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, cols // self.block, self.block_bytes)
        return self.decode(blocks)


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 number at byte `start` of every block, as (N, blocks) float16."""
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0]


def _rows(array: np.ndarray) -> np.ndarray:
    """(N, blocks, per_block...) -> (N, blocks * per_block)."""
    return np.ascontiguousarray(array).reshape(array.shape[0], -1)


def _fifth_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """The 32 high bits of a Q5_0 / Q5_1 block (a little-endian uint32 at `start`), as 0 or 16 per input."""
    word = np.ascontiguousarray(blocks[..., start:start + 4]).view("<u4")
    return (((word >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _q4_0(blocks: np.ndarray) -> Quantized:
    return Quantized(_rows(blocks[..., 2:]), _half(blocks, 0), None)


def _q4_1(blocks: np.ndarray) -> Quantized:
    return Quantized(_rows(blocks[..., 4:]), _half(blocks, 0), _half(blocks, 2))


def _q5_0(blocks: np.ndarray) -> Quantized:
    codes = (unpack_nibbles(_rows(blocks[..., 6:])) | _rows(_fifth_bits(blocks, 2))).astype(np.int8) - np.int8(16)
    return Quantized(codes, _half(blocks, 0), None)


def _q5_1(blocks: np.ndarray) -> Quantized:
    codes = (unpack_nibbles(_rows(blocks[..., 8:])) | _rows(_fifth_bits(blocks, 4))).astype(np.int8)
    return Quantized(codes, _half(blocks, 0), _half(blocks, 2))


def _q8_0(blocks: np.ndarray) -> Quantized:
    return Quantized(_rows(blocks[..., 2:]).view(np.int8), _half(blocks, 0), None)


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: the 8 groups' fp32 scales d*sc and minimums -(dmin*m), from 6-bit sc and m packed in
    12 bytes (groups 0..3 in the low 6 bits of bytes 0..3 and 4..7; groups 4..7 split over bytes 8..11 and
    the top 2 bits of bytes 0..7)."""
    packed = blocks[..., 4:16]
    low, high, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low & 0x3F, (rest & 0x0F) | ((low >> 2) & 0x30)], axis=-1).astype(np.float32)
    m = np.concatenate([high & 0x3F, (rest >> 4) | ((high >> 2) & 0x30)], axis=-1).astype(np.float32)
    d = _half(blocks, 0).astype(np.float32)[..., None]
    dmin = _half(blocks, 2).astype(np.float32)[..., None]
    return _rows(d * sc), -_rows(dmin * m)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K low bits: 128 bytes per 256 inputs, in 4 runs of 32 bytes whose low nibbles are one group of
    32 inputs and whose high nibbles are the next. -> (N, blocks, 256) codes 0..15 in input order."""
    runs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return (runs >> np.array([0, 4], dtype=np.uint8).reshape(2, 1) & 15).reshape(*qs.shape[:-1], SUPER_BLOCK)


def _q4_k(blocks: np.ndarray) -> Quantized:
    scales, mins = _k_scales(blocks)
    return Quantized(pack_nibbles(_rows(_k_nibbles(blocks[..., 16:]))), scales, mins)


def _q5_k(blocks: np.ndarray) -> Quantized:
    scales, mins = _k_scales(blocks)
    high = blocks[..., 16:48].reshape(*blocks.shape[:-1], 1, 32)  # bit g of byte j: input 32g + j
    fifth = ((high >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1).reshape(*blocks.shape[:-1], SUPER_BLOCK)
    codes = (_k_nibbles(blocks[..., 48:]) | (fifth << 4)).astype(np.int8)
    return Quantized(_rows(codes), scales, mins)


def _q6_k(blocks: np.ndarray) -> Quantized:
    """128 bytes of low nibbles (2 halves of 128 inputs: 64 bytes, low nibbles then high ones), 64 bytes of
    2-bit high parts (2 halves: 32 bytes, bit pairs 0..3 for inputs 32*pair + j), 16 int8 scales, fp16 d."""
    lead = blocks.shape[:-1]
    low = blocks[..., 0:128].reshape(*lead, 2, 1, 64)
    low = ((low >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & 15).reshape(*lead, 2, 128)
    high = blocks[..., 128:192].reshape(*lead, 2, 1, 32)
    high = ((high >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 3).reshape(*lead, 2, 128)
    codes = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(*lead, SUPER_BLOCK)
    sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    d = _half(blocks, 208).astype(np.float32)[..., None]
    return Quantized(_rows(codes), _rows(d * sc), None)


FORMATS = {f.name: f for f in (
    BlockFormat("Q4_0", 32, 18, _q4_0),
    BlockFormat("Q4_1", 32, 20, _q4_1),
    BlockFormat("Q5_0", 32, 22, _q5_0),
    BlockFormat("Q5_1", 32, 24, _q5_1),
    BlockFormat("Q8_0", 32, 34, _q8_0),
    BlockFormat("Q4_K", SUPER_BLOCK, 144, _q4_k),
    BlockFormat("Q5_K", SUPER_BLOCK, 176, _q5_k),
    BlockFormat("Q6_K", SUPER_BLOCK, 210, _q6_k),
)}
