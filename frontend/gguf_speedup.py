"""Make transformers' GGUF loading fast enough for a one-minute compile.

transformers parses the same GGUF file once for the config, once for the weights and
once for the tokenizer, and `gguf.GGUFReader` takes about six seconds per parse of a
file with a 49k-token vocabulary; it also rebuilds gguf's tensor-name map (a costly
constructor) once per tensor. Inside `shared_gguf_readers()`, both are memoized, so a
file is parsed once and each name map is built once. The reader also slices a plain
array view of its memory map rather than the `np.memmap` itself: every slice of a
memmap runs Python-level bookkeeping, and parsing takes millions of slices (2.3 s
instead of 6 s here). Nothing else changes: the same library code reads the same data.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import gguf
import numpy as np


class _PlainArrayReader(gguf.GGUFReader):
    """GGUFReader over an ndarray view of its memory map (same bytes, cheaper slices)."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value


@contextlib.contextmanager
def shared_gguf_readers() -> Iterator[None]:
    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], gguf.GGUFReader] = {}

    def reader(path, mode: str = "r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = _PlainArrayReader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map
