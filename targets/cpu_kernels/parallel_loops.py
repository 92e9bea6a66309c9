"""The CPU schedule for every kernel llmc does not hand-write: inline what can be inlined,
then run each remaining block's spatial loops as one parallel loop; an elementwise block
whose innermost loop has a constant extent divisible by 8 keeps that loop apart and runs
it on 8-lane vectors (one AVX register of float32), with the outer loops in parallel.

TVM's CPU pipeline schedules nothing, so fused elementwise kernels (SwiGLU, rotary
embedding, norms) would otherwise run on one core. This is a dlight rule: it is applied
to every PrimFunc not marked as scheduled.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline
from tvm.target import Target

LANES = 8


def _symbolic_sizes(func: tirx.PrimFunc) -> set[str]:
    """Names of the symbolic sizes in the shapes of `func`'s buffers."""
    names = set()
    for param in func.params:
        for dim in getattr(param.ty, "shape", ()):
            if not isinstance(dim, tirx.IntImm):
                names.update(v.name for v in tirx.analysis.undefined_vars(dim))
    return names


class ParallelLoops(ScheduleRule):
    """Parallelise (and vectorise) every kernel, except that those whose only symbolic size is in
    `serial_dims` are only vectorised: a parallel launch costs a few microseconds, more than
    elementwise work on a decode step's few tokens."""

    def __init__(self, serial_dims: frozenset[str] = frozenset()):
        self.serial_dims = serial_dims

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        parallel = not _symbolic_sizes(func) <= self.serial_dims
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None if parallel else s_tir.Schedule(func)
        for info in try_inline(sch, infos):
            loops = sch.get_loops(info.block_rv)
            spatial = []
            for loop, kind in zip(loops, info.dom_kind()):
                if kind != "S":
                    break
                spatial.append(loop)
            if spatial and len(spatial) == len(loops) and _vectorizable(sch, spatial[-1]):
                _, vector = sch.split(spatial.pop(), [None, LANES])
                sch.vectorize(vector)
            if spatial and parallel:
                sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
        return sch


def _vectorizable(sch: s_tir.Schedule, loop: s_tir.LoopRV) -> bool:
    extent = sch.get(loop).extent
    return isinstance(extent, tirx.IntImm) and extent.value % LANES == 0
