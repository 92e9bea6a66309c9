"""Grouped weight formats: what a quantized weight is in the IR, and how to make and read one.

A weight of shape (N, K) is held as codes, a scale per group of G consecutive inputs
and, optionally, a minimum per group; the value of a code q is scale * q + minimum.
- 4-bit codes are 0..15, packed two to a byte in blocks of 32 inputs: byte j of a block
  holds input j in its low nibble and input j + 16 in its high nibble, as in llama.cpp's
  Q4_0 / Q4_1 blocks. codes: (N, K/2) uint8. Without minimums they are offset by 8, as
  Q4_0's are: the value is scale * (q - 8).
- 8-bit codes are signed bytes (-128..127; 5- and 6-bit formats fit in them). codes: (N, K) int8.
- G is 32 or 16 (llama.cpp's Q6_K scales 16 inputs at a time); scales and minimums are
  float16, or float32 where a format's scale is a product (K-quants: a 16-bit scale of
  the 256-input block times a 6- or 8-bit scale of the group) that 16 bits cannot hold.
The group size is not stored: it is K over the number of scale columns.

llmc's own formats, made from float weights by `quantize`:
- q4 is llama.cpp's Q4_1: groups of 32, fp16 scale d and minimum m, codes 0..15.
- q8 is llama.cpp's Q8_0: groups of 32, fp16 scale d, codes -127..127, no minimum
  (int8 x int8 dot products then fit the CPU's multiply-add instructions without overflow).
Quantizing weights that were dequantized from a GGUF of the same format gives back that
file's codes exactly. GGUF's other block formats are read into this form by
ir/ggml_formats.py, without loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 32
GROUP_SIZES = (32, 16)
SCALE_DTYPES = ("float16", "float32")
# A weight kept as 16-bit floats (a checkpoint's F16 or BF16) is one array, named the weight's name and this suffix.
SIXTEEN_BIT_SUFFIX = {"float16": ".f16", "bfloat16": ".bf16"}


@dataclass(frozen=True)
class Quantized:
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None

    @property
    def bits(self) -> int:
        return 8 if self.codes.dtype == np.int8 else 4


def quantize(weight: np.ndarray, bits: int) -> Quantized:
    if weight.ndim != 2 or weight.shape[1] % GROUP:
        raise ValueError(f"cannot quantize a weight of shape {weight.shape}: its last axis must be a multiple of {GROUP}")
    rows, cols = weight.shape
    groups = weight.astype(np.float32).reshape(rows, cols // GROUP, GROUP)
    if bits == 8:
        amax = np.abs(groups).max(axis=-1)
        scale = (amax / 127).astype(np.float16)
        inverse = np.divide(1.0, scale.astype(np.float32), out=np.zeros_like(amax), where=scale != 0)
        codes = np.clip(np.round(groups * inverse[..., None]), -127, 127).astype(np.int8)
        return Quantized(codes.reshape(rows, cols), scale, None)
    if bits == 4:
        low, high = groups.min(axis=-1), groups.max(axis=-1)
        scale = ((high - low) / 15).astype(np.float16)
        minimum = low.astype(np.float16)
        inverse = np.divide(1.0, scale.astype(np.float32), out=np.zeros_like(low), where=scale != 0)
        codes = np.clip(np.floor((groups - minimum.astype(np.float32)[..., None]) * inverse[..., None] + 0.5), 0, 15)
        return Quantized(pack_nibbles(codes.astype(np.uint8).reshape(rows, cols)), scale, minimum)
    raise ValueError(f"llmc quantizes to 4 or 8 bits, not {bits}")


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(N, K) codes 0..15 -> (N, K/2) bytes, in blocks of 32 (input j low, input j + 16 high)."""
    rows, cols = codes.shape
    blocks = codes.reshape(rows, cols // GROUP, GROUP)
    return (blocks[..., :GROUP // 2] | (blocks[..., GROUP // 2:] << 4)).reshape(rows, cols // 2)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_nibbles`: (N, K/2) bytes -> (N, K) codes 0..15."""
    rows, width = packed.shape
    blocks = packed.reshape(rows, width * 2 // GROUP, GROUP // 2)
    return np.concatenate([blocks & 15, blocks >> 4], axis=-1).reshape(rows, width * 2)


def input_count(codes_shape: tuple[int, int], bits: int) -> int:
    return codes_shape[1] * 2 if bits == 4 else codes_shape[1]


def dequantize(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, bits: int) -> np.ndarray:
    """The float32 weight the codes stand for: scale * code + minimum, in that order (see above for 4-bit
    codes without minimums)."""
    values = codes if bits == 8 else unpack_nibbles(codes).astype(np.int8) - np.int8(8 if mins is None else 0)
    rows, cols = values.shape
    groups = scales.shape[1]
    weight = values.astype(np.float32).reshape(rows, groups, cols // groups) * scales.astype(np.float32)[..., None]
    if mins is not None:
        weight = weight + mins.astype(np.float32)[..., None]
    return weight.reshape(rows, cols)


def code_dtype(bits: int) -> str:
    return "uint8" if bits == 4 else "int8"
