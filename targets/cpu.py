"""The CPU target: LLVM for the host's processor, with llmc's CPU schedules.

Kernels are compiled for the processor of the machine that compiles (as llama.cpp
builds for its host); the package records that processor.
"""

from __future__ import annotations

import os

import tvm
from tvm.target.codegen import llvm_cpu_has_features, llvm_get_system_cpu

from llmc.ir import KVCacheType, Node
from llmc.ir.dims import DECODE_TOKENS

from .base import Kernel, Target
from .cpu_kernels import attention, linear
from .cpu_kernels.fast_math import use_polynomial_exp
from .cpu_kernels.parallel_loops import ParallelLoops
from .pipeline import relax_pipeline


class CpuTarget(Target):
    name = "cpu"
    device_kind = "cpu"
    description = "LLVM for the host CPU"

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1})

    def relax_pipeline(self) -> tvm.transform.Pass:
        use_polynomial_exp()
        return relax_pipeline(self.tvm_target(), [ParallelLoops(serial_dims=frozenset({DECODE_TOKENS}))])

    def kernel(self, node: Node) -> Kernel | None:
        if node.op == "linear" and node.type.dtype == "float32":
            n, k = node.inputs[1].type.shape
            weight = node.inputs[1].type.dtype
            has_bias, has_residual = node.inputs[2] is not None, node.inputs[3] is not None
            if linear.supported(n, k) and (weight == "float32" or self._has_f16c()):
                return Kernel(f"linear_{weight}_{n}x{k}{'_bias' * has_bias}{'_residual' * has_residual}",
                              linear.linear_float(n, k, weight, has_bias, has_residual))
        if node.op == "quantized_linear" and self._has_avx2():
            n, k = node.type.shape[-1], node.inputs[0].type.shape[-1]
            bits, scales = node.attrs["bits"], node.inputs[2].type
            group = k // scales.shape[1]
            has_mins, has_bias, has_residual = (node.inputs[i] is not None for i in (3, 4, 5))
            if linear.supported(n, k, quantized=True):
                form = f"q{bits}g{group}{'f' if scales.dtype == 'float32' else ''}{'m' if has_mins else ''}"
                return Kernel(f"linear_{form}_{n}x{k}{'_bias' * has_bias}{'_residual' * has_residual}",
                              linear.quantized_linear(n, k, bits, group, scales.dtype, has_mins, has_bias,
                                                      has_residual))
        return None

    def _has_avx2(self) -> bool:
        return bool(llvm_cpu_has_features(["avx2", "fma"], self.tvm_target()))

    def _has_f16c(self) -> bool:
        return bool(llvm_cpu_has_features(["f16c"], self.tvm_target()))

    def kv_cache_kernels(self, cache: KVCacheType, page_size: int) -> dict[str, tvm.tirx.PrimFunc]:
        if cache.dtype != "float32" or not attention.supported(cache.head_dim):
            return {}
        heads = (cache.num_kv_heads, cache.num_q_heads, cache.head_dim)
        return {
            "tir_attention_prefill_ragged_cpu": attention.ragged_prefill(*heads),
            "tir_attention_prefill_cpu": attention.paged_prefill(*heads, page_size),
            "tir_attention_decode_cpu": attention.paged_decode(*heads, page_size),
        }

    def describe(self) -> dict:
        return {**super().describe(), "mcpu": llvm_get_system_cpu()}
