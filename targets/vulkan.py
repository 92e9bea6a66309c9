"""The vulkan target: WGSL kernels from TVM's WebGPU codegen, run through wgpu.

This TVM has no Vulkan codegen, but its WebGPU codegen writes WGSL, which wgpu runs on
Vulkan (or on Metal, on a Mac). The library is not a TVM executable: `lib-vulkan.json`
holds every kernel's WGSL and, for each entry point, a launch plan (kernels, buffers,
grid sizes as expressions of the symbolic dimensions) that runtime/webgpu_model.py
executes. The KV cache is llmc's own (webgpu/kv_cache.py): TVM's is a C++ object no
shader can call. WGSL has neither 64-bit nor 8-bit integers, so int64 tensors are kept as
int32 and quantized codes are read as 32-bit words. Subgroups stay off: TVM's WGSL
assumes 32-lane subgroups, and devices differ (lavapipe has 8).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import tvm
from tvm import relax, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule

from llmc.ir import KVCacheType
from llmc.runtime.webgpu_plan import PLAN_FORMAT, cache_field_names

from .base import OwnKVCache
from .gpu import GPUTarget
from .pipeline import scheduling_passes
from .webgpu.kernels import compile_kernels
from .webgpu.kv_cache import TensorKVCache
from .webgpu.launch_plan import function_plan

class VulkanTarget(GPUTarget):
    name = "vulkan"
    device_kind = "vulkan"
    description = "Vulkan GPUs through wgpu (WGSL kernels; Metal on macOS)"
    executor = "wgpu"
    runtime_libraries = ()
    bytes_as_words = True
    refused_weight_dtypes = {"bfloat16": "WGSL has no bfloat16, nor a 16-bit integer to hold its bits"}
    refused_ops = {**GPUTarget.refused_ops,
                   "topk": "mixture-of-experts routing (top-k), whose kernels the WebGPU executor cannot launch yet"}

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": "webgpu", "supports_subgroups": False}, host={"kind": "llvm"})

    def schedule_rules(self) -> Sequence[ScheduleRule]:
        """LowBatchGEMV with buckets of one row first. The matmuls of prefill and decode are the same kernels
        (their row counts are both symbolic): decode gets a plain GEMV instead of a matmul tile padded to 32 rows,
        at the price of prefill reading the weights once per token."""
        return (dlight.gpu.LowBatchGEMV(1), *super().schedule_rules())

    def relax_pipeline(self) -> tvm.transform.Pass:
        """Legalize, fuse and schedule (dlight's GPU rules); the result stays Relax calls of TIR kernels,
        which `build` turns into WGSL and launch plans."""
        target, rules = self.tvm_target(), self.schedule_rules()

        @tvm.transform.module_pass(opt_level=0)
        def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            with target:
                return tvm.transform.Sequential(scheduling_passes(rules))(mod)

        return pipeline

    def tensor_dtype(self, dtype: str) -> str:
        return "int32" if dtype == "int64" else dtype

    def attends_with_own_kernels(self, cache: KVCacheType) -> bool:
        return True

    def own_kv_cache(self, page_size: int) -> OwnKVCache:
        return TensorKVCache(page_size)

    def build(self, irmodule: tvm.IRModule) -> dict[str, Any]:
        scheduled = self.relax_pipeline()(irmodule)
        functions = {gv.name_hint: f for gv, f in scheduled.functions.items() if isinstance(f, tirx.PrimFunc)}
        kernels, launches = compile_kernels(functions, self.tvm_target())
        entries = {gv.name_hint: function_plan(gv.name_hint, f, cache_field_names)
                   for gv, f in scheduled.functions.items() if isinstance(f, relax.Function)}
        return {"format": PLAN_FORMAT, "kernels": kernels, "functions": launches, "entries": entries}

    def library_file(self) -> str:
        return "lib-vulkan.json"

    def export(self, executable: dict[str, Any], path: Path) -> None:
        path.write_text(json.dumps(executable))

