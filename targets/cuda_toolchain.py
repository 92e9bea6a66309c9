"""The CUDA toolchain behind the CUDA target, with no GPU or driver needed to compile.

TVM embeds device code only when its CUDA plugin is loaded, and the plugin needs the
driver library (libcuda.so.1). Where there is none, `ensure_cuda_plugin` builds a stub
with the driver's few entry points (returning "no device") and loads the plugin over it;
the stub only serves the build. `nvcc_for` makes nvcc run once per library through TVM's
compile hook, with one -gencode per architecture, and `embedded_fatbin` finds the device
code again in the library TVM wrote.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import tvm

from llmc.ir import LlmcError

COMPILE_HOOK = "tvm_callback_cuda_compile"
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
DRIVER_ENTRY_POINTS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuLaunchKernelEx", "cuModuleGetFunction",
                       "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled")
STUB_SOURCE = "\n".join(
    ["/* Build-time stand-in for the CUDA driver (llmc): every call reports that there is no device. */",
     "int cuGetErrorName(int e, const char **s) { *s = \"CUDA_ERROR_NO_DEVICE\"; return 0; }",
     "int cuGetErrorString(int e, const char **s) { *s = \"no CUDA driver (llmc build stub)\"; return 0; }"]
    + [f"int {name}() {{ return 100; }}" for name in DRIVER_ENTRY_POINTS]) + "\n"


def _stub_driver() -> Path:
    """libcuda.so.1 built from STUB_SOURCE, once per user, in the temporary folder."""
    directory = Path(tempfile.gettempdir()) / f"llmc-cuda-stub-{os.getuid()}"
    library = directory / "libcuda.so.1"
    if not library.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        source = directory / "stub.c"
        source.write_text(STUB_SOURCE)
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise LlmcError("building for CUDA without a CUDA driver needs a C compiler (cc) for a driver stub")
        subprocess.run([compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(library), str(source)],
                       check=True, capture_output=True)
    return library


def ensure_cuda_plugin() -> None:
    """Load TVM's CUDA runtime plugin, over a stub driver when the real one is missing."""
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        ctypes.CDLL(str(_stub_driver()), mode=ctypes.RTLD_GLOBAL)
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                       extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")


def _gencode_flags(architectures: tuple[str, ...]) -> list[str]:
    flags = []
    for arch in architectures:
        number = arch[3:]
        flags += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
    newest = architectures[-1][3:]
    return flags + ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]


def compile_fatbin(code: str, architectures: tuple[str, ...]) -> bytes:
    """nvcc's fatbin of `code`: a cubin per architecture, and PTX of the newest for later GPUs."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise LlmcError("compiling for CUDA needs nvcc (the CUDA toolkit) on PATH")
    with tempfile.TemporaryDirectory() as work:
        source, output = Path(work) / "kernels.cu", Path(work) / "kernels.fatbin"
        source.write_text(code)
        result = subprocess.run([nvcc, "--fatbin", "-O3", *_gencode_flags(architectures), "-o", str(output),
                                 str(source)], capture_output=True, text=True)
        if result.returncode:
            raise LlmcError(f"nvcc failed on llmc's CUDA kernels: {result.stderr.strip().splitlines()[-1]}")
        return output.read_bytes()


def embedded_fatbin(library: bytes) -> bytes:
    """The fatbin inside a library TVM built for CUDA (found by the fatbin magic number)."""
    start = library.find(FATBIN_MAGIC)
    if start < 0 or library.find(FATBIN_MAGIC, start + 1) >= 0:
        raise LlmcError("the CUDA library holds no single fatbin: TVM did not embed compiled device code")
    header_size, payload_size = struct.unpack_from("<HQ", library, start + 6)
    return library[start:start + header_size + payload_size]


@contextlib.contextmanager
def nvcc_for(architectures: tuple[str, ...]) -> Iterator[None]:
    """TVM's CUDA compile hook set, for the block, to nvcc for every one of `architectures`."""
    previous = tvm.get_global_func(COMPILE_HOOK, allow_missing=True)
    tvm.register_global_func(COMPILE_HOOK, lambda code, *rest: bytearray(compile_fatbin(code, architectures)),
                             override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm.register_global_func(COMPILE_HOOK, previous, override=True)
