"""The Relax pipeline every target shares: TVM's legalization, fusion and VM lowering passes, with the
target's own scheduling (dlight rules) in the middle."""

from __future__ import annotations

from typing import Sequence

import tvm
from tvm import relax
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule

from .weight_checks import add_weight_check_function, drop_per_call_weight_checks


def scheduling_passes(rules: Sequence[ScheduleRule]) -> list[tvm.transform.Pass]:
    """Legalize, fuse and schedule (under a target): Relax calls of scheduled TIR kernels."""
    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dlight.ApplyDefaultSchedule(*rules),
        relax.transform.RewriteDataflowReshape(),
    ]


def relax_pipeline(target: tvm.target.Target, rules: Sequence[ScheduleRule]) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            passes = scheduling_passes(rules) + [
                relax.transform.ToNonDataflow(),
                relax.transform.RemovePurityChecking(),
                relax.transform.CallTIRRewrite(),
                relax.transform.StaticPlanBlockMemory(),
                relax.transform.LowerAllocTensor(),
                relax.transform.KillAfterLastUse(),
                relax.transform.LowerRuntimeBuiltin(),
                relax.transform.ComputePrimValue(),
                add_weight_check_function,
                relax.transform.VMShapeLower(),
                drop_per_call_weight_checks,
                relax.transform.AttachGlobalSymbol(),
            ]
            return tvm.transform.Sequential(passes)(mod)
    return pipeline
