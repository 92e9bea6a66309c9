"""What every target provides: a TVM target, a compilation pipeline, a library and a device.

Codegen and the runtime ask a `Target` what to do instead of branching on its name.
Adding a device means adding one module in this folder that registers a subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc.threads import set_default_threads

set_default_threads()  # before TVM's thread pool starts, which is on the first parallel kernel the compiler runs
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from llmc.ir import KVCacheType, LlmcError, Node

_REGISTRY: dict[str, type["Target"]] = {}


@dataclass(frozen=True)
class Kernel:
    """A hand-scheduled TIR function for one IR node; `name` identifies it (equal names, equal functions),
    so layers with the same shapes share one compiled kernel."""

    name: str
    func: tvm.tirx.PrimFunc


class OwnKVCache(ABC):
    """A paged KV cache that a target keeps in plain tensors (page pools, page tables) which its
    runtime fills, instead of TVM's KV cache object; `paged_attention` becomes the target's kernels."""

    # The storage formats of ir/kv_storage.py its kernels read and write.
    storages: frozenset[str] = frozenset({"f32"})

    @abstractmethod
    def relax_type(self, cache: KVCacheType, symbols: Any) -> relax.Type:
        """The type of the entry functions' cache input (`symbols` makes the symbolic sizes)."""

    @abstractmethod
    def attend(self, cx: Any, node: Node, args: list) -> relax.Expr:
        """Lower one `paged_attention` node through the lowering context `cx`."""


COLLECTIVES = ("tensor parallelism's all_reduce, which llmc lowers to NCCL through TVM's disco (whose collectives "
               "have no other backend llmc targets), so tensor-parallel packages are for --target cuda")


class Target(ABC):
    """One kind of device llmc compiles for."""

    name: str = ""
    description: str = ""
    # What runs the libraries: TVM's Relax VM, or the runtime's executor of that name.
    executor: str = "tvm"
    # The kind of device the runtime opens (runtime/devices.py).
    device_kind: str = ""
    # The TVM runtime libraries the library needs, in load order; packages carry them.
    runtime_libraries: tuple[str, ...] = ("libtvm_runtime.so",)
    # Read 8-bit tensors (quantized codes) as the 32-bit words that hold them, for kernel
    # languages without 8-bit types (WGSL).
    bytes_as_words: bool = False
    # Weight dtypes this target's kernel language cannot hold, and why; a package for it is refused.
    refused_weight_dtypes: dict[str, str] = {}
    # IR ops this target cannot run yet, and what they do; a package that uses one is refused. Only CUDA
    # sums over tensor-parallel shards: TVM's disco runs collectives over NCCL (or RCCL, for ROCm) alone.
    refused_ops: dict[str, str] = {"all_reduce": COLLECTIVES}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls

    @abstractmethod
    def tvm_target(self) -> tvm.target.Target:
        """The TVM target the kernels are compiled for."""

    @abstractmethod
    def relax_pipeline(self) -> tvm.transform.Pass:
        """Relax -> VM-ready module: legalize, fuse, schedule, lower."""

    def kernel(self, node: Node) -> Kernel | None:
        """This target's own kernel for `node`, or None to use the generic lowering."""
        return None

    def kv_cache_kernels(self, cache: KVCacheType, page_size: int) -> dict[str, tvm.tirx.PrimFunc]:
        """Replacements for attention kernels of TVM's paged KV cache, by the name TVM gives them."""
        return {}

    def kv_row_kernels(self, cache: KVCacheType) -> tuple[Kernel, Kernel] | None:
        """For a cache not stored as float32 (ir/kv_storage.py): the kernels that pack a step's queries, keys and
        values into the runtime cache's rows and unpack the attention output; None if this target cannot store
        `cache.storage`."""
        return None

    def attends_with_own_kernels(self, cache: KVCacheType) -> bool:
        """Whether this target attends over `cache` with llmc's own kernels, which soft-cap scores and slide windows
        (KVCacheType.softcap and .window), rather than TVM's, which do neither."""
        return False

    def tensor_dtype(self, dtype: str) -> str:
        """The dtype this target keeps tensors of `dtype` in (one without 64-bit integers narrows them)."""
        return dtype

    def own_kv_cache(self, page_size: int) -> OwnKVCache | None:
        """The target's own paged KV cache, or None to use TVM's (created by the library's `create_kv_cache`)."""
        return None

    def build(self, irmodule: tvm.IRModule) -> tvm.runtime.Executable:
        """Compile the lowered module into an executable for this target."""
        return tvm.compile(irmodule, self.tvm_target(), relax_pipeline=self.relax_pipeline())

    def library_file(self) -> str:
        return f"lib-{self.name}.so"

    def export(self, executable: Any, path: Path) -> None:
        executable.export_library(str(path))

    def describe(self) -> dict[str, Any]:
        """What the package's metadata records about this target: the runtime reads it instead of
        importing the target."""
        return {"name": self.name, "tvm_target": str(self.tvm_target()), "executor": self.executor,
                "device": self.device_kind, "runtime_libraries": list(self.runtime_libraries)}

    def runtime_library_files(self) -> list[Path]:
        """The installed TVM's copies of `runtime_libraries`, which packages carry."""
        lib = Path(tvm.__file__).resolve().parent / "lib"
        return [lib / name for name in self.runtime_libraries]


def get_target(name: str) -> Target:
    if name not in _REGISTRY:
        raise LlmcError(f"unknown target {name!r}; llmc knows {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()
