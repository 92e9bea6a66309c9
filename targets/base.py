"""What every target provides: a TVM target, a compilation pipeline, a library and a device.

Codegen and the runtime ask a `Target` what to do instead of branching on its name.
Adding a device means adding one module in this folder that registers a subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm

from llmc.ir import KVCacheType, LlmcError, Node

_REGISTRY: dict[str, type["Target"]] = {}


@dataclass(frozen=True)
class Kernel:
    """A hand-scheduled TIR function for one IR node; `name` identifies it (equal names, equal functions),
    so layers with the same shapes share one compiled kernel."""

    name: str
    func: tvm.tirx.PrimFunc


class Target(ABC):
    """One kind of device llmc compiles for."""

    name: str = ""
    description: str = ""

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

    def library_file(self) -> str:
        return f"lib-{self.name}.so"

    def export(self, executable: Any, path: Path) -> None:
        executable.export_library(str(path))

    def describe(self) -> dict[str, Any]:
        """What the package's metadata records about this target."""
        return {"name": self.name, "tvm_target": str(self.tvm_target())}

    @abstractmethod
    def device(self) -> tvm.runtime.Device:
        """The runtime device; raises LlmcError naming what is missing when absent."""


def get_target(name: str) -> Target:
    if name not in _REGISTRY:
        raise LlmcError(f"unknown target {name!r}; llmc knows {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def target_names() -> list[str]:
    return sorted(_REGISTRY)
