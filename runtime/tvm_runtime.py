"""TVM's runtime without TVM's compiler: apache-tvm-ffi plus the runtime libraries a package names.

The VM, the paged KV cache and the device APIs live in `libtvm_runtime.so` (and a plugin per
GPU kind), which register themselves with tvm-ffi when loaded; the `tvm` Python package, its
260 MB compiler library and what it imports are never needed to run a package. Packages
carry the runtime libraries they were built against. Where the installed `tvm` holds the
same file, that one is loaded instead, so that a process which later imports the compiler
(tests, `llmc run MODEL`) never loads a second copy, whose registrations would clash.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llmc.errors import LlmcError
from llmc.threads import set_default_threads

# apache-tvm-ffi imports torch and ml_dtypes when they are installed (a work-around for a Windows symbol
# clash, and bfloat16 arrays); the runtime passes neither torch tensors nor bfloat16 arrays, and the two
# imports cost seconds, so they are hidden while tvm-ffi loads unless the process already has them.
_OPTIONAL_IMPORTS_OF_FFI = ("torch", "ml_dtypes")

DEVICE_TYPES = {"cpu": 1, "cuda": 2, "metal": 8}


def _import_ffi() -> Any:
    if "tvm_ffi" in sys.modules:
        return sys.modules["tvm_ffi"]
    hidden = [name for name in _OPTIONAL_IMPORTS_OF_FFI if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  (makes `import name` raise ImportError)
    try:
        import tvm_ffi
    except ImportError:
        raise LlmcError("running a package needs apache-tvm-ffi: pip install apache-tvm-ffi==0.1.14.post0") from None
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return tvm_ffi


set_default_threads()  # before TVM's thread pool starts, which is on the first parallel kernel
ffi = _import_ffi()
Shape = ffi.Shape


def installed_library(name: str) -> Path | None:
    """`name` inside the installed `tvm` package, found without importing it."""
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "lib" / name
    return path if path.is_file() else None


def _loaded(name: str) -> bool:
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL | getattr(ctypes, "RTLD_NOLOAD", 4))
        return True
    except OSError:
        return False


def load_libraries(paths: Sequence[Path]) -> None:
    """Load runtime libraries in order (each after those it needs); one already in the process stays."""
    for path in paths:
        if _loaded(path.name):
            continue
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            missing = str(error).split(":")[0]
            raise LlmcError(f"cannot load the TVM runtime library {path}: {error}. "
                            + (f"It needs {missing}, which is not installed here." if missing != str(path) else "")
                            ) from None


def global_func(name: str) -> Any:
    function = ffi.get_global_func(name, allow_missing=True)
    if function is None:
        raise LlmcError(f"the TVM runtime has no function {name!r}: the package's runtime library is not loaded "
                        "or is of another TVM version")
    return function


def device(kind: str, index: int = 0) -> Any:
    return ffi.device(kind, index)


def device_exists(dev: Any) -> bool:
    return int(global_func("runtime.GetDeviceAttr")(dev.dlpack_device_type(), dev.index, 0)) != 0


def load_module(path: Path) -> Any:
    return ffi.load_module(str(path))


def to_device(array: np.ndarray, dev: Any, dtype: str | None = None) -> Any:
    """A tensor on `dev` holding `array`: the array itself, without a copy, on the CPU (it must stay
    writable, as DLPack has no read-only tensors, and alive as long as the tensor). With `dtype`, the
    array holds that dtype's bits (bfloat16 as uint16) and the tensor is viewed as it."""
    array = np.ascontiguousarray(array).reshape(array.shape)  # ascontiguousarray makes a 0-d array 1-d
    if dev.dlpack_device_type() == DEVICE_TYPES["cpu"]:
        tensor = ffi.from_dlpack(array)
    else:
        tensor = global_func("runtime.TVMTensorAllocWithScope")(Shape(array.shape), ffi.dtype(str(array.dtype)), dev,
                                                                None)
        global_func("runtime.TVMTensorCopyFromBytes")(tensor, array.ctypes.data, array.nbytes)
    if dtype is None or dtype == str(array.dtype):
        return tensor
    return global_func("runtime.TVMTensorCreateView")(tensor, Shape(array.shape), ffi.dtype(dtype), 0)


def to_numpy(tensor: Any) -> np.ndarray:
    if tensor.device.dlpack_device_type() == DEVICE_TYPES["cpu"]:
        return np.from_dlpack(tensor)
    array = np.empty(tuple(tensor.shape), dtype=str(tensor.dtype))
    global_func("runtime.TVMTensorCopyToBytes")(tensor, array.ctypes.data, array.nbytes)
    return array
