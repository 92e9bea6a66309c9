"""The CUDA target: dlight GPU schedules, compiled ahead of time by nvcc into cubins for a
list of architectures plus PTX for newer GPUs, with no GPU or driver needed to compile
(the toolchain: cuda_toolchain.py).
"""

from __future__ import annotations

from pathlib import Path

import tvm

from .cuda_toolchain import embedded_fatbin, ensure_cuda_plugin, nvcc_for
from .gpu import GPUTarget

ARCHITECTURES = ("sm_80", "sm_86", "sm_89", "sm_90")


class CudaTarget(GPUTarget):
    name = "cuda"
    device_kind = "cuda"
    runtime_libraries = ("libtvm_runtime.so", "libtvm_runtime_cuda.so")
    description = f"NVIDIA GPUs ({', '.join(ARCHITECTURES)} cubins, PTX for newer)"
    refused_ops: dict[str, str] = {}

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": "cuda", "arch": ARCHITECTURES[0]}, host={"kind": "llvm"})

    def build(self, irmodule: tvm.IRModule) -> tvm.runtime.Executable:
        ensure_cuda_plugin()
        with self.tvm_target(), nvcc_for(ARCHITECTURES):
            return tvm.compile(irmodule, self.tvm_target(), relax_pipeline=self.relax_pipeline())

    def export(self, executable, path: Path) -> None:
        """The library, and beside it the device code it embeds as a plain fatbin file, which CUDA's
        tools read (`cuobjdump --list-elf lib-cuda.fatbin`); TVM keeps it inside its own module format."""
        super().export(executable, path)
        path.with_suffix(".fatbin").write_bytes(embedded_fatbin(path.read_bytes()))

    def describe(self) -> dict:
        return {**super().describe(), "architectures": list(ARCHITECTURES), "ptx": ARCHITECTURES[-1]}
