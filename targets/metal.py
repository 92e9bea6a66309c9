"""The Metal target: MSL kernels with dlight GPU schedules, and the host code for arm64 macOS.

Linux cannot link a Mach-O library or run Metal, so the package holds a tar of the
objects (host code and the MSL) that a Metal-enabled TVM runtime on a Mac loads, plus
`lib-metal.kernels.json`, the table of kernels and their MSL. On Linux llmc checks what
it can: every kernel of the module has MSL, and the MSL passes a syntax check against a
small shim of the Metal standard library (metal_shim/). Untested on Apple hardware.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from typing import Sequence

import tvm
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule

from llmc.ir import LlmcError

from .gpu import GPUTarget

SHIM = Path(__file__).resolve().parent / "metal_shim"
UNIT = re.compile(r"^// Function: (\w+)$", re.MULTILINE)


def metal_source(executable) -> str:
    modules = executable.mod._collect_from_import_tree(lambda m: m.kind == "metal")
    return "\n".join(m.inspect_source() for m in modules)


def split_kernels(source: str) -> dict[str, str]:
    """{kernel name: its MSL}: TVM writes one self-contained unit per kernel, each headed `// Function: NAME`."""
    heads = list(UNIT.finditer(source))
    bounds = [h.start() for h in heads] + [len(source)]
    return {head.group(1): source[begin:end] for head, begin, end in zip(heads, bounds, bounds[1:])}


def check_msl(source: str) -> None:
    """Raise LlmcError unless `source` parses and type-checks with g++ against the shim."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise LlmcError("checking Metal kernels on Linux needs g++")
    with tempfile.NamedTemporaryFile("w", suffix=".metal") as handle:
        handle.write(source)
        handle.flush()
        result = subprocess.run([compiler, "-std=c++20", "-fsyntax-only", "-Wno-attributes", "-I", str(SHIM),
                                 "-x", "c++", handle.name], capture_output=True, text=True)
    if result.returncode:
        raise LlmcError(f"the generated Metal kernels fail the syntax check: {result.stderr.strip()[:500]}")


class MetalTarget(GPUTarget):
    name = "metal"
    device_kind = "metal"
    runtime_libraries = ()  # a Metal-enabled TVM runtime for macOS; this TVM wheel has none
    description = "Apple GPUs (MSL; arm64 macOS host code, tar of objects)"

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target("apple/m2-gpu")

    def schedule_rules(self) -> Sequence[ScheduleRule]:
        """Without Matmul: dlight's Matmul rule (simdgroup matmul on Metal) spends about two minutes on each matmul
        with a symbolic row count in this TVM; GEMV and the fallback schedule every kernel in seconds."""
        return [rule for rule in super().schedule_rules() if not isinstance(rule, dlight.gpu.Matmul)]

    def library_file(self) -> str:
        return "lib-metal.tar"

    def export(self, executable, path: Path) -> None:
        executable.export_library(str(path))
        kernels = split_kernels(metal_source(executable))
        if not kernels:
            raise LlmcError("the Metal build produced no kernels")
        path.with_name("lib-metal.kernels.json").write_text(json.dumps(kernels, indent=1))
