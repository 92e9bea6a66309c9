"""The bundled SmolLM2 GGUF re-encoded by llama.cpp's own quantizer into other formats
(f32, Q8_0, Q4_K_M, Q6_K, ...), written once into a folder and reused.

Benchmarks and tests use these files to compare llmc with llama.cpp on the very bytes
llama.cpp writes; nothing large is committed. Re-encoding starts from the Q4_1 file's
weights (llama.cpp's `allow_requantize`), as a user re-quantizing a download would.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

MODEL = "smollm2-135m"

# llama.cpp's LLAMA_FTYPE_* numbers, by the name its quantize tool gives them.
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q3_K_S": 11, "Q4_K_M": 15, "Q5_K_M": 17,
              "Q6_K": 18, "BF16": 32}


def requantized_gguf(file_type: str, folder: Path) -> Path:
    """SmolLM2 as llama.cpp writes it in `file_type` (a key of FILE_TYPES), inside `folder`."""
    import llama_cpp

    from llmc.frontend.checkpoint import resolve_model

    path = Path(folder) / f"SmolLM2-135M-Instruct.{file_type}.gguf"
    if not path.is_file():
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_quantize_default_params()
        params.nthread, params.ftype, params.allow_requantize = 2, FILE_TYPES[file_type], True
        partial = path.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(resolve_model(MODEL).path).encode(), str(partial).encode(),
                                          ctypes.byref(params)):
            raise RuntimeError(f"llama.cpp could not write SmolLM2 as {file_type}")
        partial.rename(path)
    return path
