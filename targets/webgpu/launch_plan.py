"""Turn a scheduled Relax entry function into the launch plan that the vulkan runtime executes.

After legalization, fusion and scheduling, an entry function (prefill, decode) is a
straight line of TIR function calls over tensors. Its plan lists:
- `inputs`: the tensors the runtime passes (a tuple input, the KV cache, becomes one
  input per field, named by `field_names`), with dtypes and shapes;
- `buffers`: where each tensor lives: an input, a weight (by its index in the weights
  tuple) or a temporary (its size in bytes);
- `values`: every tensor as (buffer, shape, dtype); a reshape or view is a new value of
  the same buffer, and a call that writes in place returns its argument's buffer;
- `calls`: TIR function calls in order, over values (inputs first, then outputs);
- `output`: the value the function returns.
Shapes and sizes are size expressions (shape_expr.py) over the step's dimensions.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax

from llmc.ir import LlmcError
from llmc.runtime.webgpu_plan import SizeExpr

from . import shape_expr


def _dims(ty) -> list[SizeExpr]:
    return [shape_expr.from_tvm(d, lambda var: var.name) for d in ty.shape.values]


def _size(ty) -> SizeExpr:
    size: SizeExpr = np.dtype(str(ty.dtype)).itemsize
    for dim in _dims(ty):
        size = ["*", size, dim]
    return size


class _PlanBuilder:
    def __init__(self, name: str):
        self.name = name
        self.inputs: list[dict] = []
        self.buffers: list[dict] = []
        self.values: list[dict] = []
        self.calls: list[dict] = []
        self.ids: dict[relax.Var, int | list] = {}
        self.weights: relax.Var | None = None

    def value(self, buffer: int, ty) -> int:
        if not isinstance(ty, relax.TensorType):
            raise LlmcError(f"function {self.name}: the vulkan runtime handles tensors, not {ty}")
        self.values.append({"buffer": buffer, "shape": _dims(ty), "dtype": str(ty.dtype)})
        return len(self.values) - 1

    def new_buffer(self, entry: dict, ty) -> int:
        self.buffers.append(entry)
        return self.value(len(self.buffers) - 1, ty)

    def input(self, name: str, ty) -> int:
        self.inputs.append({"name": name, "shape": _dims(ty), "dtype": str(ty.dtype)})
        return self.new_buffer({"input": name}, ty)

    def operand(self, expr) -> int:
        value = self.ids.get(expr)
        if not isinstance(value, int):
            raise LlmcError(f"function {self.name}: the vulkan runtime has no tensor for the argument {expr}")
        return value

    def outputs(self, ty) -> int | list:
        if isinstance(ty, relax.TupleType):
            return [self.new_buffer({"temp": _size(field)}, field) for field in ty.fields]
        return self.new_buffer({"temp": _size(ty)}, ty)

    def bind(self, var: relax.Var, expr) -> None:
        if isinstance(expr, relax.Var):
            self.ids[var] = self.ids[expr]
        elif isinstance(expr, relax.TupleGetItem):
            self.ids[var] = self._item(expr)
        elif isinstance(expr, relax.Tuple):
            self.ids[var] = [self.operand(field) for field in expr.fields]
        elif isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            self.ids[var] = self._call(var, expr)
        else:
            raise LlmcError(f"function {self.name}: the vulkan runtime cannot run {type(expr).__name__} {expr}")

    def _item(self, expr: relax.TupleGetItem) -> int:
        source = expr.tuple_value
        if source.same_as(self.weights):
            return self.new_buffer({"weight": expr.index}, expr.ty)
        return self.ids[source][expr.index]

    def _call(self, var: relax.Var, call: relax.Call) -> int | list:
        op = call.op.name
        if op in ("relax.reshape", "relax.memory.view"):
            return self.value(self.values[self.operand(call.args[0])]["buffer"], var.ty)
        if op not in ("relax.call_tir", "relax.call_tir_inplace"):
            raise LlmcError(f"function {self.name}: the vulkan runtime cannot run the Relax op {op}")
        if len(call.args) > 2:
            raise LlmcError(f"function {self.name}: {call.args[0].name_hint} takes extra size arguments, which "
                            "the vulkan runtime does not pass")
        args = [self.operand(a) for a in call.args[1].fields]
        if op == "relax.call_tir":
            outputs = self.outputs(var.ty)
            self.calls.append({"function": call.args[0].name_hint,
                               "args": args + (outputs if isinstance(outputs, list) else [outputs])})
            return outputs
        written = list(call.attrs.inplace_indices)
        if len(written) != 1:
            raise LlmcError(f"function {self.name}: {call.args[0].name_hint} writes several arguments in place")
        self.calls.append({"function": call.args[0].name_hint, "args": args})
        return self.value(self.values[args[written[0]]]["buffer"], var.ty)

    def plan(self) -> dict:
        return {"inputs": self.inputs, "buffers": self.buffers, "values": self.values, "calls": self.calls}


def function_plan(name: str, func: relax.Function, field_names: Callable[[int], list[str]]) -> dict:
    """The plan of entry function `name`; its last parameter is the weights tuple, and the fields of
    any other tuple parameter are inputs named by `field_names(count)`."""
    builder = _PlanBuilder(name)
    *inputs, builder.weights = func.params
    for param in inputs:
        if isinstance(param.ty, relax.TupleType):
            names = field_names(len(param.ty.fields))
            builder.ids[param] = [builder.input(n, ty) for n, ty in zip(names, param.ty.fields)]
        else:
            builder.ids[param] = builder.input(param.name, param.ty)
    for block in func.body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                raise LlmcError(f"function {name}: the vulkan runtime cannot run {type(binding).__name__}")
            builder.bind(binding.var, binding.value)
    return {**builder.plan(), "output": builder.operand(func.body.body)}
