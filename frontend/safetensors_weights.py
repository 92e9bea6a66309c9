"""The 16-bit weights of a Hugging Face checkpoint, kept 16-bit by `--quant auto`.

transformers loads the checkpoint as float32 (the graph path's one dtype), which holds every
float16 and bfloat16 value exactly. This module reads which tensors the safetensors files store
as F16 or BF16 (from their JSON headers: no tensor data is read) and hands back those weights
converted back to that dtype, after checking that the round trip changes no value.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from llmc.ir.types import numpy_dtype
from llmc.passes.quantize import SIXTEEN_BIT_FORMATS, SourceWeight

HEADER_LENGTH = struct.Struct("<Q")


def stored_dtypes(folder: Path) -> dict[str, str]:
    """Tensor name -> its safetensors dtype (F16, BF16, F32, ...), over every .safetensors file of `folder`."""
    dtypes: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            (length,) = HEADER_LENGTH.unpack(handle.read(HEADER_LENGTH.size))
            header = json.loads(handle.read(length))
        dtypes.update({name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"})
    return dtypes


def sixteen_bit_weights(folder: Path, model: Any) -> dict[str, SourceWeight]:
    """Parameter name -> its 16-bit values, for every 2-D parameter the checkpoint stores as F16 or BF16."""
    stored = stored_dtypes(folder)
    sources = {}
    for name, tensor in model.state_dict().items():
        kind = stored.get(name)
        if kind not in SIXTEEN_BIT_FORMATS or tensor.ndim != 2:
            continue
        values = tensor.detach().numpy()
        narrow = values.astype(numpy_dtype(SIXTEEN_BIT_FORMATS[kind]))
        if np.array_equal(narrow.astype(np.float32), values):
            sources[name] = SourceWeight(kind, narrow)
    return sources
