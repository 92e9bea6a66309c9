"""What the GPU targets (CUDA, Metal, Vulkan) share: dlight's GPU schedule rules, listed once.

Each GPU target takes the list as it is or adjusts it in its own module, saying why (Metal drops
Matmul, Vulkan puts a one-row LowBatchGEMV first), and the shared Relax pipeline applies it.
"""

from __future__ import annotations

from typing import Sequence

import tvm
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule

from .base import Target
from .pipeline import relax_pipeline


class GPUTarget(Target):
    """A target whose kernels dlight's GPU rules schedule."""

    def schedule_rules(self) -> Sequence[ScheduleRule]:
        """dlight's GPU rules, tried in order on each kernel: tiled matmul, matrix-vector, reductions, and the
        fallback that schedules anything else."""
        return (dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(),
                dlight.gpu.Fallback())

    def relax_pipeline(self) -> tvm.transform.Pass:
        return relax_pipeline(self.tvm_target(), self.schedule_rules())
