"""Build an llmc module into a TVM library for one target.

Lowering (IR -> Relax), the target's pipeline (legalize, fuse, schedule) and the
export of the library file happen here. TVM's own exceptions never reach the user:
they become an `LlmcError` naming the target and the stage that failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import tvm

from llmc.ir import LlmcError, Module
from llmc.targets import Target

from .lower import lower_module


def _tvm_failure(stage: str, target: Target, error: Exception) -> LlmcError:
    """The line of a TVM error that says what went wrong (TVM puts source excerpts and carets around it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    wordy = [line for line in lines if any(c.isalpha() for c in line) and not line.startswith(("|", "-->"))]
    summary = (errors or wordy or [type(error).__name__])[-1]
    return LlmcError(f"TVM failed to {stage} for target {target.name}: {summary}")


def build_library(module: Module, target: Target, directory: Path,
                  on_lowered: Callable[[str, tvm.IRModule], None] = lambda target, irmodule: None) -> dict[str, Any]:
    """Compile `module` for `target` into `directory`; return the target's metadata entry. `on_lowered` gets the
    Relax module before the target builds it."""
    try:
        irmodule = lower_module(module, target)
    except LlmcError:
        raise
    except Exception as error:  # TVM's FFI raises TVMError, TypeError, ValueError ...
        raise _tvm_failure("lower the graph to Relax", target, error) from None
    on_lowered(target.name, irmodule)
    try:
        executable = target.build(irmodule)
    except Exception as error:
        raise _tvm_failure("compile the kernels", target, error) from None
    library = directory / target.library_file()
    try:
        target.export(executable, library)
    except LlmcError:
        raise
    except Exception as error:
        raise _tvm_failure("export the library", target, error) from None
    return {**target.describe(), "library": library.name}
