"""Check the weights once per load, not on every call of a VM library's entry points.

Each entry point (prefill, decode) takes every weight in one tuple parameter, and TVM's
`VMShapeLower` checks an entry point's parameters on each call: for SmolLM2 that is about
1,300 VM builtin calls (tuple item, dtype, shape) on each decode step, before any work. The
weights do not change between calls, so:
- `add_weight_check_function` adds, before `VMShapeLower`, an entry point that takes the
  tuple's tensors one by one and returns nothing: lowering gives it exactly those checks, each
  naming its parameter's position (the runtime calls it once, at load, under the name
  `CHECK_WEIGHTS` of the package format);
- `drop_per_call_weight_checks` removes, after `VMShapeLower`, the checks of that tuple from
  every other entry point (the checks of the other inputs stay).
"""

from __future__ import annotations

import tvm
from tvm import relax

from llmc.runtime.package import CHECK_WEIGHTS

_PARAMETER_CHECKS = ("vm.builtin.check_tuple_info", "vm.builtin.check_tensor_info", "vm.builtin.match_shape")


def _weight_tuple(func: relax.Function) -> relax.Var | None:
    """The parameter holding the weights: the entry point's one tuple-typed parameter."""
    tuples = [p for p in func.params if isinstance(p.ty, relax.TupleType)]
    return tuples[0] if len(tuples) == 1 else None


@tvm.transform.module_pass(opt_level=0, name="AddWeightCheckFunction")
def add_weight_check_function(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    for func in mod.functions.values():
        weights = _weight_tuple(func) if isinstance(func, relax.Function) else None
        if weights is not None:
            builder = relax.BlockBuilder(mod)
            tensors = [relax.Var(f"weight{i}", field) for i, field in enumerate(weights.ty.fields)]
            with builder.function(CHECK_WEIGHTS, tensors):
                builder.emit_func_output(relax.Tuple([]))
            return builder.get()
    return mod


def _is_check_of(value: relax.Expr, subjects: set) -> bool:
    return (isinstance(value, relax.Call) and isinstance(value.op, relax.ExternFunc)
            and str(value.op.global_symbol) in _PARAMETER_CHECKS and value.args[0] in subjects)


def _without_weight_checks(func: relax.Function) -> relax.Function:
    weights = _weight_tuple(func)
    if weights is None or not isinstance(func.body, relax.SeqExpr):
        return func
    bindings = [b for block in func.body.blocks for b in block.bindings]
    # The items VMShapeLower takes out of the tuple to check them.
    items = {b.var for b in bindings
             if isinstance(b.value, relax.TupleGetItem) and b.value.tuple_value.same_as(weights)}
    subjects = items | {weights}
    checks = {b.var for b in bindings if _is_check_of(b.value, subjects)}
    used_elsewhere = {v for b in bindings if b.var not in checks for v in relax.analysis.free_vars(b.value)}
    used_elsewhere |= set(relax.analysis.free_vars(func.body.body))
    dropped = checks | (items - used_elsewhere)
    blocks = [type(block)([b for b in block.bindings if b.var not in dropped]) for block in func.body.blocks]
    return relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure, func.attrs)


@tvm.transform.module_pass(opt_level=0, name="DropPerCallWeightChecks")
def drop_per_call_weight_checks(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    functions = {gv: _without_weight_checks(func) if isinstance(func, relax.Function) and gv.name_hint != CHECK_WEIGHTS
                 else func for gv, func in mod.functions.items()}
    return tvm.IRModule(functions, attrs=mod.attrs)
