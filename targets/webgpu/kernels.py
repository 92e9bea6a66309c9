"""Compile a module's TIR functions to WGSL kernels, with how the runtime launches them.

TVM's webgpu codegen writes one WGSL compute shader per kernel, and a TIR function may
launch several kernels; TVM's host code would compute their scalar arguments and grid
sizes. llmc runs TVM's own TIR pipeline and stops it before the host code is packed
(MakePackedAPI): there, the host side of each function is still a list of kernel
launches over its buffer parameters. Each launch is kept as data: which parameters it
binds, which scalars it passes and how many workgroups it runs, as size expressions over
the parameters' dimensions (shape_expr.py). WGSL has no 64-bit integers, so indices are
narrowed to 32 bits first.
"""

from __future__ import annotations

import re
from typing import Any

import tvm
from tvm import tirx

from llmc.ir import LlmcError
from llmc.runtime.webgpu_plan import SizeExpr

from . import shape_expr

_BINDING = re.compile(r"@binding\((\d+)\) var<storage, (read_write|read)>")
_EIGHT_BIT = re.compile(r"\b(i8|u8)\b|array<bool")
_WGSL_SCALAR = {"int32": "i32", "uint32": "u32", "float32": "f32"}
_DEVICE_KERNEL = 2  # calling_conv of a kernel launched from host code
_GRID_AXES = ("blockIdx.x", "blockIdx.y")


def _before_packing(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """`module` after TVM's TIR pipeline up to MakePackedAPI: kernels split from their host functions."""
    captured: dict[str, tvm.IRModule] = {}

    @tvm.instrument.pass_instrument
    class TakeBeforePacking:
        def run_before_pass(self, mod: tvm.IRModule, info: Any) -> None:
            if info.name == "tirx.MakePackedAPI":
                captured["module"] = mod

    pipeline, _, _ = tirx.get_default_tir_pipeline(target)
    with tvm.transform.PassContext(instruments=[TakeBeforePacking()]):
        pipeline(module)
    return captured["module"]


def _statements(stmt) -> list:
    return [s for item in stmt.seq for s in _statements(item)] if isinstance(stmt, tirx.SeqStmt) else [stmt]


class _HostReader:
    """Reads the launches of one function's host side in terms of its parameters."""

    def __init__(self, func: tirx.PrimFunc, name: str):
        self.func = func
        self.name = name
        self.dims: list[tuple[tirx.Var, SizeExpr]] = []
        for p, param in enumerate(func.params):
            for d, extent in enumerate(param.ty.shape):
                if isinstance(extent, tirx.Var) and self._known(extent, self.dims) is None:
                    self.dims.append((extent, ["dim", p, d]))
        self.lets: list[tuple[tirx.Var, SizeExpr]] = []
        self.buffers: list[tuple[tirx.Var, int]] = [(param, p) for p, param in enumerate(func.params)]

    @staticmethod
    def _known(var: tirx.Var, table: list[tuple[tirx.Var, Any]]) -> Any:
        """What `table` says about `var` (TVM variables compare by identity, not by ==)."""
        return next((value for known, value in table if known.same_as(var)), None)

    def _leaf(self, var) -> SizeExpr:
        value = self._known(var, self.lets)
        value = value if value is not None else self._known(var, self.dims)
        if value is None:
            raise LlmcError(f"kernel function {self.name}: the size {var.name} is not a dimension of its parameters")
        return value

    def expr(self, value) -> SizeExpr:
        return shape_expr.from_tvm(value, self._leaf)

    def buffer(self, data) -> int:
        if not (isinstance(data, tvm.ir.expr.Call) and data.op.name == "tirx.buffer_data"):
            raise LlmcError(f"kernel function {self.name} passes {data} where a buffer is expected")
        index = self._known(data.args[0], self.buffers)
        if index is None:
            raise LlmcError(f"kernel function {self.name} launches a kernel on a buffer it allocates itself")
        return index

    def launches(self, kernels: tvm.IRModule) -> list[dict]:
        launches = []
        for stmt in _statements(self.func.body):
            kind = type(stmt).__name__
            if kind == "Bind":
                self.lets.append((stmt.var, self.expr(stmt.value)))
            elif kind == "DeclBuffer":
                self.buffers.append((stmt.buffer, self.buffer(stmt.data)))
            elif kind == "Evaluate" and isinstance(stmt.value, tvm.ir.expr.Call) and \
                    stmt.value.op.name == "tirx.call_ffi_kernel":
                launches.append(self._launch(stmt.value, kernels))
            else:
                raise LlmcError(f"kernel function {self.name}: its host code has a {kind}, which the vulkan "
                                "runtime cannot run")
        return launches

    def _launch(self, call, kernels: tvm.IRModule) -> dict:
        name = call.args[0].value
        kernel = kernels[name]
        params = list(kernel.params)
        values, extents = call.args[1:1 + len(params)], call.args[1 + len(params):]
        tags = list(kernel.attrs["tirx.kernel_launch_params"])
        grid = dict(zip(tags, extents))
        if "blockIdx.z" in grid:
            raise LlmcError(f"kernel {name} uses blockIdx.z, which WebGPU reserves for large grids")
        return {
            "kernel": name,
            "buffers": [self.buffer(v) for p, v in zip(params, values) if isinstance(p.ty, tvm.ir.PointerType)],
            "scalars": [self.expr(v) for p, v in zip(params, values) if not isinstance(p.ty, tvm.ir.PointerType)],
            "grid": [self.expr(grid[axis]) if axis in grid else 1 for axis in _GRID_AXES],
        }


def _kernel_entry(func: tirx.PrimFunc, wgsl: str, name: str) -> dict:
    if _EIGHT_BIT.search(wgsl):
        raise LlmcError(f"kernel {name} keeps 8-bit values in memory, which WGSL cannot (no i8, u8 or bool "
                        "arrays): the vulkan target reads only quantized codes, as 32-bit words")
    bindings = sorted((int(index), access == "read_write") for index, access in _BINDING.findall(wgsl))
    pointers = sum(isinstance(p.ty, tvm.ir.PointerType) for p in func.params)
    if [index for index, _ in bindings] != list(range(pointers)):
        raise LlmcError(f"kernel {name}: its WGSL declares bindings {bindings}, expected {pointers} storage buffers")
    scalars = [str(p.ty) for p in func.params if not isinstance(p.ty, tvm.ir.PointerType)]
    unsupported = [t for t in scalars if t not in _WGSL_SCALAR]
    if unsupported:
        raise LlmcError(f"kernel {name} takes a {unsupported[0]} scalar, which WGSL kernels cannot take")
    return {"wgsl": wgsl, "writes": [write for _, write in bindings], "scalars": [_WGSL_SCALAR[t] for t in scalars]}


def compile_kernels(functions: dict[str, tirx.PrimFunc], target: tvm.target.Target) -> tuple[dict, dict]:
    """({kernel: {wgsl, writes, scalars}}, {function: [launch]}) for TIR functions already scheduled for `target`."""
    module = tvm.IRModule({name: func.with_attr("global_symbol", name) for name, func in functions.items()})
    module = tirx.transform.ForceNarrowIndexToInt32()(tirx.transform.BindTarget(target)(module))
    split = _before_packing(module, target)
    device = tvm.IRModule({gv: f for gv, f in split.functions.items()
                           if int(f.attrs.get("calling_conv", 0)) == _DEVICE_KERNEL})
    _, _, finalize_device = tirx.get_default_tir_pipeline(target)
    device = finalize_device()(device)
    codegen = tvm.get_global_func("target.build.webgpu")
    kernels = {}
    for gv, func in device.functions.items():
        wgsl = codegen(tvm.IRModule({gv: func}), func.attrs["target"]).inspect_source()
        kernels[gv.name_hint] = _kernel_entry(func, wgsl, gv.name_hint)
    launches = {name: _HostReader(split[name], name).launches(device) for name in functions}
    return kernels, launches
