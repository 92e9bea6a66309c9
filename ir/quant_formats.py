"""Grouped weight formats: what a quantized weight is, and how to make and read one.

- q4 is llama.cpp's Q4_1: per group of 32 consecutive inputs, an fp16 scale d and an
  fp16 minimum m, and 4-bit codes q in 0..15 with value d*q + m. Byte j of a group holds
  element j in its low nibble and element j+16 in its high nibble, as in GGUF files.
- q8 is llama.cpp's Q8_0: per group of 32, an fp16 scale d and int8 codes q, value d*q.
  (Symmetric, without a minimum: int8 x int8 dot products then fit the CPU's
  multiply-add instructions without overflow.)

A weight of shape (N, K) becomes `codes` (N, K/2) uint8 or (N, K) int8, `scales`
(N, K/32) float16 and, for q4, `mins` (N, K/32) float16. Quantizing weights that were
dequantized from a GGUF of the same format gives back that file's codes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 32


@dataclass(frozen=True)
class Quantized:
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None


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
        codes = codes.astype(np.uint8)
        packed = codes[..., :GROUP // 2] | (codes[..., GROUP // 2:] << 4)
        return Quantized(packed.reshape(rows, cols // 2), scale, minimum)
    raise ValueError(f"llmc quantizes to 4 or 8 bits, not {bits}")


def dequantize(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, bits: int) -> np.ndarray:
    rows = codes.shape[0]
    groups = scales.shape[1]
    scale = scales.astype(np.float32)[..., None]
    if bits == 8:
        return (codes.astype(np.float32).reshape(rows, groups, GROUP) * scale).reshape(rows, groups * GROUP)
    packed = codes.reshape(rows, groups, GROUP // 2)
    values = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float32)
    return (values * scale + mins.astype(np.float32)[..., None]).reshape(rows, groups * GROUP)


def code_shape(rows: int, cols: int, bits: int) -> tuple[int, int]:
    return (rows, cols // 2) if bits == 4 else (rows, cols)


def code_dtype(bits: int) -> str:
    return "uint8" if bits == 4 else "int8"
