"""The CPU target: LLVM for the host's processor, with llmc's CPU schedules.

Kernels are compiled for the processor of the machine that compiles (as llama.cpp
builds for its host), or for the one that `LLMC_CPU` names (an LLVM CPU name such as
`haswell` or `x86-64-v3`, for packages that must run on older processors). The package
records that processor and the instruction-set extensions its code may use, which the
runtime checks before loading the library (runtime/cpu_features.py).
"""

from __future__ import annotations

import os

import tvm
from tvm.target.codegen import (llvm_cpu_has_features, llvm_get_cpu_features, llvm_get_system_cpu,
                                llvm_get_system_triple, llvm_is_valid_cpu)

from llmc.errors import LlmcError
from llmc.ir import KVCacheType, Node
from llmc.ir.dims import DECODE_TOKENS
from llmc.ir.kv_storage import geometry, kv_storage

from .base import Kernel, Target
from .cpu_kernels import attention, kv_pack, linear, matmul
from .cpu_kernels.fast_math import use_polynomial_exp
from .cpu_kernels.parallel_loops import ParallelLoops
from .pipeline import relax_pipeline

CPU_VARIABLE = "LLMC_CPU"

# The x86 extensions whose absence makes a library die of an illegal instruction, by LLVM's names;
# the package records those its processor has, and the runtime compares them with the host's.
ISA_EXTENSIONS = frozenset({
    "sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi", "bmi2", "avxvnni",
    "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512vnni", "avx512bf16", "avx512fp16",
    "avx512vbmi", "avx512vbmi2", "avx512bitalg", "avx512vpopcntdq", "avx512ifma", "gfni", "vaes",
    "vpclmulqdq", "amx-tile", "amx-int8", "amx-bf16",
})


def decode_splits() -> int:
    """At most how many chunks decode attention splits a sequence's keys into: enough for two work items a
    core when one sequence with one key head is decoding (fewer key heads or sequences than cores)."""
    return 2 * (os.cpu_count() or 1)


def compile_cpu() -> str:
    """The LLVM CPU that kernels are compiled for: `LLMC_CPU`, else this machine's processor."""
    cpu = os.environ.get(CPU_VARIABLE) or llvm_get_system_cpu()
    if not llvm_is_valid_cpu(cpu, llvm_get_system_triple()):
        raise LlmcError(f"{CPU_VARIABLE}={cpu!r} is not a CPU that LLVM knows for {llvm_get_system_triple()}; "
                        f"use a name such as haswell, skylake-avx512, znver3 or x86-64-v3 "
                        f"(this machine's is {llvm_get_system_cpu()})")
    return cpu


class CpuTarget(Target):
    name = "cpu"
    device_kind = "cpu"
    description = "LLVM for the host CPU"

    def __init__(self) -> None:
        self.cpu = compile_cpu()  # a bad LLMC_CPU is refused when the target is chosen, before any work

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": "llvm", "mcpu": self.cpu, "num-cores": os.cpu_count() or 1})

    def relax_pipeline(self) -> tvm.transform.Pass:
        use_polynomial_exp()
        return relax_pipeline(self.tvm_target(), [ParallelLoops(serial_dims=frozenset({DECODE_TOKENS}))])

    def kernel(self, node: Node) -> Kernel | None:
        if node.op == "linear" and node.type.dtype == "float32":
            n, k = node.inputs[1].type.shape
            weight = node.inputs[1].type.dtype
            has_bias, has_residual = node.inputs[2] is not None, node.inputs[3] is not None
            if linear.supported(n, k) and (weight != "float16" or self._has_f16c()):
                return Kernel(f"linear_{weight}_{n}x{k}{'_bias' * has_bias}{'_residual' * has_residual}",
                              linear.linear_float(n, k, weight, has_bias, has_residual))
        if node.op == "expert_linear" and node.type.dtype == "float32" and node.inputs[1].type.dtype == "float32":
            experts, n, k = node.inputs[1].type.shape
            if n % matmul.ROWS_PER_TASK == 0 and k % matmul.LANES == 0:
                return Kernel(f"expert_linear_{experts}x{n}x{k}", linear.expert_linear(experts, n, k))
        if node.op == "quantized_linear" and self._has_avx2():
            n, k = node.type.shape[-1], node.inputs[0].type.shape[-1]
            bits, scales = node.attrs["bits"], node.inputs[2].type
            group = k // scales.shape[1]
            has_mins, has_bias, has_residual = (node.inputs[i] is not None for i in (3, 4, 5))
            if linear.supported(n, k, quantized=True):
                form = f"q{bits}g{group}{'f' if scales.dtype == 'float32' else ''}{'m' if has_mins else ''}"
                return Kernel(f"linear_{form}_{n}x{k}{'_bias' * has_bias}{'_residual' * has_residual}",
                              linear.quantized_linear(n, k, bits, group, scales.dtype, has_mins, has_bias,
                                                      has_residual, self.has_vnni()))
        return None

    def _has_avx2(self) -> bool:
        return bool(llvm_cpu_has_features(["avx2", "fma"], self.tvm_target()))

    def has_vnni(self) -> bool:
        """AVX-512 VNNI (with 256-bit forms): the quantized GEMV sums u8 x s8 products in one instruction."""
        return bool(llvm_cpu_has_features(["avx512vnni", "avx512vl"], self.tvm_target()))

    def _has_f16c(self) -> bool:
        return bool(llvm_cpu_has_features(["f16c"], self.tvm_target()))

    def attends_with_own_kernels(self, cache: KVCacheType) -> bool:
        return cache.dtype == "float32" and attention.supported(kv_storage(cache.storage), cache.head_dim)

    def kv_cache_kernels(self, cache: KVCacheType, page_size: int) -> dict[str, tvm.tirx.PrimFunc]:
        if not self.attends_with_own_kernels(cache):
            return {}
        storage = kv_storage(cache.storage)
        heads = (storage, cache.num_kv_heads, cache.num_q_heads, cache.head_dim, cache.softcap, cache.window)
        shape = geometry(storage, cache.num_q_heads, cache.num_kv_heads, cache.head_dim)
        return {
            "tir_attention_prefill_ragged_cpu": attention.ragged_prefill(*heads),
            "tir_attention_prefill_cpu": attention.paged_prefill(*heads, page_size),
            "tir_attention_decode_cpu": attention.paged_decode(*heads, page_size, decode_splits()),
            "tir_attention_merge_state_cpu": kv_pack.merge_states(shape, cache.num_q_heads, cache.head_dim),
        }

    def kv_row_kernels(self, cache: KVCacheType) -> tuple[Kernel, Kernel] | None:
        if not self.attends_with_own_kernels(cache):
            return None
        storage = kv_storage(cache.storage)
        shape = geometry(storage, cache.num_q_heads, cache.num_kv_heads, cache.head_dim)
        form = f"{storage.name}_{cache.num_q_heads}x{cache.num_kv_heads}x{cache.head_dim}"
        return (Kernel(f"kv_pack_{form}", kv_pack.pack_qkv(storage, shape, cache.num_q_heads, cache.head_dim)),
                Kernel(f"kv_unpack_{form}", kv_pack.unpack_output(storage, shape, cache.num_q_heads, cache.head_dim)))

    def describe(self) -> dict:
        target = self.tvm_target()
        extensions = {str(feature) for feature in llvm_get_cpu_features(target)} & ISA_EXTENSIONS
        # Steps of up to this many tokens run the matrix-vector kernels, whose cost grows with each token; more
        # switch to the matrix-matrix ones, which cost several decode steps at once (runtime/speculation.py).
        vector_tokens = matmul.GEMV_ROWS - 1
        return {**super().describe(), "mcpu": self.cpu, "cpu_features": sorted(extensions),
                "vector_step_tokens": vector_tokens}
