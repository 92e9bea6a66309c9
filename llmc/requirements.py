"""What a runtime-only installation of llmc lacks, said before it is needed.

`pip install llmc` installs the runtime (run, chat, serve, bench and the Python API on
compiled packages); `pip install 'llmc[compiler]'` adds what compiling and inspecting
models needs. A command that needs the compiler checks for it first, without importing
it, and names the install command instead of failing with an ImportError.
"""

from __future__ import annotations

import importlib.util

from llmc.errors import LlmcError

COMPILER_MODULES = ("torch", "tvm", "transformers", "sympy", "gguf", "onnx", "safetensors")
COMPILER_INSTALL = "pip install torch==2.13.0 && pip install 'llmc[compiler]'"


def require_compiler(purpose: str) -> None:
    missing = [name for name in COMPILER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise LlmcError(f"{purpose} needs llmc's compiler, which this installation lacks ({', '.join(missing)} "
                        f"not installed). Install it with `{COMPILER_INSTALL}`, or pass a compiled package.")
