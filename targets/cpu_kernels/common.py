"""What every hand-written CPU kernel needs: one signature for all its variants, and marks
that keep TVM's pipeline from re-scheduling or fusing it."""

from __future__ import annotations

from tvm import tirx
from tvm.tirx import analysis

OPAQUE = 8  # relax's OpPatternKind.kOpaque: FuseOps leaves the call alone


def opaque(func: tirx.PrimFunc) -> tirx.PrimFunc:
    return func.with_attr("op_pattern", OPAQUE).with_attr("tirx.is_scheduled", True)


def without_unused_params(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` minus the buffer parameters its body never touches.

    A kernel is written once with every optional input (bias, residual, a third weight
    array) in its signature; the variant for a node leaves the absent ones unused, and
    dropping them gives that variant exactly the parameters the call passes."""
    used = analysis.undefined_vars(func.body)
    params = [p for p in func.params if any(p.same_as(u) for u in used)]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)
