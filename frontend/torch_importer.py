"""Import a `torch.export.ExportedProgram` into an llmc `Module` through the ATen op table.

Parameters and buffers become weights (tied weights, which share storage, become one);
user inputs become graph inputs whose symbolic sizes keep their symbols (the first one
is called `seq`). Every node is converted by its entry in `torch_ops.TABLE`, and its IR
type is checked against the shape and dtype PyTorch computed. An export that uses ops
the table lacks fails with one error listing each of them with its node and source line.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import sympy
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from llmc.ir import Graph, GraphBuilder, IRError, LlmcError, Module, Node, TensorType, verify_module
from llmc.ir import dims as D

from .diagnostics import UnsupportedOpsError, UnsupportedPattern, unsupported_ops_error
from .diagnostics import source_line as trace_source_line
from .emitter import Emitter, torch_dtype
from .torch_ops import TABLE


def source_line(fx_node: torch.fx.Node) -> str | None:
    """'file.py:123 in fn: code' for the model line that produced the node, if recorded."""
    return trace_source_line(fx_node.meta.get("stack_trace"))


def _is_symbolic_scalar(fx_node: torch.fx.Node) -> bool:
    return isinstance(fx_node.meta.get("val"), (torch.SymInt, torch.SymBool, torch.SymFloat, int, float, bool))


def check_supported(program: ExportedProgram) -> None:
    unknown = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem or _is_symbolic_scalar(node):
            continue
        if str(node.target) not in TABLE:
            unknown.append((str(node.target), node.name, source_line(node)))
    if unknown:
        raise unsupported_ops_error("PyTorch", unknown)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _weight_name(target: str) -> str:
    return target[2:] if target.startswith("m.") else target


class _Importer:
    def __init__(self, program: ExportedProgram):
        self.program = program
        self.symbols: dict[sympy.Symbol, D.Dim] = {}
        self.builder = GraphBuilder()
        self.emitter = Emitter(self.builder, self.rename)
        self.weights: dict[str, np.ndarray] = {}
        self.env: dict[torch.fx.Node, Any] = {}

    def rename(self, expr: sympy.Expr) -> D.Dim:
        unknown = [s for s in expr.free_symbols if s not in self.symbols]
        if unknown:
            raise LlmcError(f"the export has a size {expr} that depends on data, not on input shapes; "
                            "llmc needs shapes that follow from the input sizes")
        return D.normalize(expr.subs(self.symbols))

    def _name_symbols(self, placeholders: list[torch.fx.Node]) -> None:
        for node in placeholders:
            for size in node.meta["val"].shape:
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    if size.node.expr not in self.symbols:
                        name = "seq" if not self.symbols else f"d{len(self.symbols)}"
                        self.symbols[size.node.expr] = D.symbol(name)

    def _placeholders(self) -> list[Node]:
        specs = {spec.arg.name: spec for spec in self.program.graph_signature.input_specs}
        user_nodes = [n for n in self.program.graph.nodes
                      if n.op == "placeholder" and specs[n.name].kind == InputKind.USER_INPUT]
        self._name_symbols(user_nodes)
        storage_names: dict[tuple, str] = {}
        inputs = []
        for node in self.program.graph.nodes:
            if node.op != "placeholder":
                continue
            spec = specs[node.name]
            if spec.kind == InputKind.USER_INPUT:
                val = node.meta["val"]
                inputs.append(self.builder.input(node.name, TensorType(tuple(self.emitter.shape_of(val)),
                                                                        torch_dtype(val.dtype))))
                self.env[node] = inputs[-1]
                continue
            tensor = (self.program.state_dict.get(spec.target) if spec.target in self.program.state_dict
                      else self.program.constants[spec.target])
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                   tuple(tensor.stride()), tensor.dtype)
            name = storage_names.setdefault(key, _weight_name(spec.target))
            if name not in self.weights:
                self.weights[name] = _to_numpy(tensor)
            self.env[node] = self.builder.param(name, TensorType(tuple(tensor.shape), torch_dtype(tensor.dtype)))
        return inputs

    def _value(self, arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return self.env[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._value(a) for a in arg)
        return arg

    def _convert(self, node: torch.fx.Node) -> Any:
        val = node.meta.get("val")
        if node.target is operator.getitem:
            return self.env[node.args[0]][node.args[1]]
        if _is_symbolic_scalar(node):
            return self.emitter.dim(val) if isinstance(val, (torch.SymInt, int)) else val
        em = self.emitter
        em.current_target, em.current_name, em.current_source = str(node.target), node.name, source_line(node)
        args, kwargs = self._value(node.args), self._value(node.kwargs)
        where = f"node {node.name} ({node.target}" + (f", {em.current_source})" if em.current_source else ")")
        try:
            result = TABLE[str(node.target)](em, args, kwargs, val)
        except UnsupportedPattern as error:
            raise UnsupportedOpsError(f"cannot import {where}: {error}") from None
        except IRError as error:
            raise LlmcError(f"llmc's converter for {node.target} made an invalid graph at {where}: {error}") from None
        if isinstance(result, Node) and isinstance(val, torch.Tensor):
            expected = TensorType(tuple(em.shape_of(val)), torch_dtype(val.dtype))
            if not expected.same_as(result.type):
                raise LlmcError(f"llmc's converter for {node.target} gave {result.type} at {where}, "
                                f"PyTorch computed {expected}")
        return result

    def _rebind_mutated(self, node: torch.fx.Node) -> None:
        """After an in-place op (`mul_`), later uses of the tensor it mutated read its result. That is only right
        when the tensor owns its memory: a mutated view would also change the tensor it views, and a mutated
        parameter or input would change the model's state. A view that is the only use of a computed tensor may
        change: nothing else reads that tensor (`bmm(...).squeeze(1).add_(bias)`)."""
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.name.endswith("_") or not isinstance(node.args[0], torch.fx.Node):
            return
        mutated = node.args[0]
        mutated_schema = getattr(mutated.target, "_schema", None)
        # A view aliases what it views; an in-place op's result is the tensor it changed, checked when it ran.
        aliases = (mutated_schema is not None and not mutated_schema.name.endswith("_")
                   and any(r.alias_info is not None for r in mutated_schema.returns))
        if mutated.op != "call_function" or (aliases and not _sole_view(mutated)):
            raise UnsupportedOpsError(f"cannot import node {node.name} ({node.target}): it changes {mutated.name} "
                                      "in place, which is a view, a parameter or an input")
        self.env[mutated] = self.env[node]

    def run(self, function_name: str) -> Module:
        check_supported(self.program)
        inputs = self._placeholders()
        outputs: list[Node] = []
        for node in self.program.graph.nodes:
            if node.op == "call_function":
                self.env[node] = self._convert(node)
                self._rebind_mutated(node)
            elif node.op == "output":
                results = node.args[0]
                outputs = [self.env[r] for r in (results if isinstance(results, (list, tuple)) else [results])]
        graph = Graph(function_name, inputs, outputs)
        used = {n.attrs["weight"] for n in graph.params()}
        module = Module({function_name: graph}, {k: v for k, v in self.weights.items() if k in used})
        verify_module(module)
        return module


def import_exported_program(program: ExportedProgram, function_name: str = "forward") -> Module:
    """The IR module of `program`, with one function called `function_name`."""
    return _Importer(program).run(function_name)


def _sole_view(view: torch.fx.Node) -> bool:
    """Whether `view` views a tensor computed in the graph that nothing but `view` uses."""
    base = view.args[0]
    return isinstance(base, torch.fx.Node) and base.op == "call_function" and list(base.users) == [view]
