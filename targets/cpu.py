"""The CPU target: LLVM for the host's processor, with llmc's CPU schedules.

Kernels are compiled for the processor of the machine that compiles (as llama.cpp
builds for its host); the package records that processor.
"""

from __future__ import annotations

import os

import tvm
from tvm import relax
from tvm.target.codegen import llvm_get_system_cpu

from .base import Target


class CpuTarget(Target):
    name = "cpu"
    description = "LLVM for the host CPU"

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1})

    def relax_pipeline(self) -> tvm.transform.Pass:
        target = self.tvm_target()

        @tvm.transform.module_pass(opt_level=0)
        def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            with target:
                passes = [
                    relax.backend.DispatchSortScan(),
                    relax.transform.LegalizeOps(),
                    relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(),
                    relax.transform.FuseOps(),
                    relax.transform.FuseTIR(),
                    relax.transform.DeadCodeElimination(),
                    relax.transform.RewriteDataflowReshape(),
                    relax.transform.ToNonDataflow(),
                    relax.transform.RemovePurityChecking(),
                    relax.transform.CallTIRRewrite(),
                    relax.transform.StaticPlanBlockMemory(),
                    relax.transform.LowerAllocTensor(),
                    relax.transform.KillAfterLastUse(),
                    relax.transform.LowerRuntimeBuiltin(),
                    relax.transform.ComputePrimValue(),
                    relax.transform.VMShapeLower(),
                    relax.transform.AttachGlobalSymbol(),
                ]
                return tvm.transform.Sequential(passes)(mod)

        return pipeline

    def describe(self) -> dict:
        return {**super().describe(), "mcpu": llvm_get_system_cpu()}

    def device(self) -> tvm.runtime.Device:
        return tvm.cpu()
