"""Open the device a package's library runs on, as the package's metadata describes it.

Each target of a package records its `device` kind and the TVM runtime libraries it
needs (the CUDA kind a plugin beside libtvm_runtime.so); an absent device, driver or
library is an error that says what is missing.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Sequence

from llmc.errors import LlmcError

METAL_ELSEWHERE = ("Metal packages run on macOS with a Metal-enabled TVM runtime; this machine has none "
                   "(on a Mac, the vulkan package runs through wgpu's Metal backend)")


def _require_cuda_driver() -> None:
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        raise LlmcError("no CUDA device is available here (no NVIDIA driver: libcuda.so.1 is missing); "
                        "use --device cpu") from None


def open_device(kind: str, runtime_libraries: Sequence[Path] = ()) -> Any:
    """The runtime device of `kind` (a TVM device, or the wgpu device for vulkan), loading
    `runtime_libraries` first for the TVM kinds."""
    if kind == "vulkan":
        from .webgpu_device import wgpu_device

        return wgpu_device()
    if kind == "metal":
        raise LlmcError(METAL_ELSEWHERE)
    from . import tvm_runtime

    if kind not in tvm_runtime.DEVICE_TYPES:
        raise LlmcError(f"unknown device {kind!r}; llmc runs packages on cpu, cuda and vulkan")
    if kind == "cuda":
        _require_cuda_driver()
    tvm_runtime.load_libraries(runtime_libraries)
    device = tvm_runtime.device(kind)
    if kind == "cuda" and not tvm_runtime.device_exists(device):
        raise LlmcError("no CUDA device is available here (the NVIDIA driver finds no GPU); use --device cpu")
    return device
