"""Value types of llmc's IR: tensors with (possibly symbolic) shapes, and the KV cache.

Every value in a graph has one of these types. `TensorType` is a shape of `Dim`s plus
a dtype name (NumPy spelling). `KVCacheType` is the opaque paged KV cache that the
runtime owns; it carries what codegen needs to create one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from . import dims as D
from .dims import Dim

DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")

_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
          "int8": "i8", "uint8": "u8", "bool": "bool"}
_LONG = {v: k for k, v in _SHORT.items()}


def numpy_dtype(dtype: str) -> np.dtype:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def is_float(dtype: str) -> bool:
    return dtype in ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; llmc knows {', '.join(DTYPES)}")
        object.__setattr__(self, "shape", tuple(D.normalize(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(D.is_static(d) for d in self.shape)

    def with_shape(self, shape: tuple[Dim, ...]) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(self.shape, dtype)

    def concrete_shape(self, bindings: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(D.evaluate(d, bindings) for d in self.shape)

    def same_as(self, other: "TensorType") -> bool:
        return (isinstance(other, TensorType) and self.dtype == other.dtype and self.rank == other.rank
                and all(D.equal(a, b) for a, b in zip(self.shape, other.shape)))

    def __str__(self) -> str:
        return f"{_SHORT[self.dtype]}[{', '.join(D.to_text(d) for d in self.shape)}]"

    @staticmethod
    def parse(text: str) -> "TensorType":
        short, _, rest = text.partition("[")
        dims = [p.strip() for p in rest.rstrip("]").split(",") if p.strip()]
        return TensorType(tuple(D.parse(d) for d in dims), _LONG[short])


@dataclass(frozen=True)
class KVCacheType:
    """A paged KV cache holding K and V for `num_layers` attention layers."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    # How pages store keys and values (ir/kv_storage.py): f32, f16, q8 or q4.
    storage: str = "f32"
    # Attention-logit soft-capping (Gemma 2): every layer's scaled scores s become cap * tanh(s / cap) before the
    # softmax. The attention kernels are built for the cache, so the cap belongs to it; None for no capping.
    softcap: float | None = None
    # The sliding window of the layers whose paged_attention is `windowed` (Mistral, Gemma 2/3, Cohere 2): a query
    # sees the keys fewer than `window` positions behind it. One size for all such layers, as the kernels are
    # built for it; None when every layer attends to the whole sequence.
    window: int | None = None

    def __str__(self) -> str:
        stored = "" if self.storage == "f32" else f", stored={self.storage}"
        capped = "" if self.softcap is None else f", softcap={self.softcap!r}"
        windowed = "" if self.window is None else f", window={self.window}"
        return (f"kv_cache[layers={self.num_layers}, q_heads={self.num_q_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, {_SHORT[self.dtype]}{stored}{capped}{windowed}]")

    @staticmethod
    def parse(text: str) -> "KVCacheType":
        body = text[len("kv_cache["):-1]
        parts = [p.strip() for p in body.split(",")]
        fields = dict(p.split("=") for p in parts[:4] + parts[5:])
        return KVCacheType(int(fields["layers"]), int(fields["q_heads"]), int(fields["kv_heads"]),
                           int(fields["head_dim"]), _LONG[parts[4]], fields.get("stored", "f32"),
                           float(fields["softcap"]) if "softcap" in fields else None,
                           int(fields["window"]) if "window" in fields else None)


Type = TensorType | KVCacheType


def parse_type(text: str) -> Type:
    return KVCacheType.parse(text) if text.startswith("kv_cache[") else TensorType.parse(text)
