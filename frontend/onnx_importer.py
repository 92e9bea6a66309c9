"""Import an ONNX causal LM (`input_ids` -> logits) into an llmc `Module`.

`import_onnx` converts the nodes the logits depend on through the op table (`onnx_ops`,
`onnx_shape_ops`), computing shape arithmetic at import time so the sequence length stays
one symbolic dim, `seq`. The graph keeps one input, `input_ids` of shape (1, seq); an
`attention_mask` input becomes ones and a `position_ids` input becomes `arange(seq)`, which
is what a single unpadded sequence passes (and what KV-cache lowering expects to find).
An export that uses ops the table lacks fails with one error listing each of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from llmc.ir import Graph, GraphBuilder, IRError, LlmcError, Module, Node, TensorType, verify_module
from llmc.ir import dims as D

from . import onnx_ops, onnx_shape_ops  # noqa: F401  (register their converters)
from .diagnostics import UnsupportedOpsError, UnsupportedPattern, source_line, unsupported_ops_error
from .onnx_context import TABLE, OnnxContext, Value
from .onnx_file import DEFAULT_DOMAINS, check_opset, load_onnx
from .onnx_values import ir_dtype, known, onnx_dtype

SEQ = "seq"


class OnnxImportError(LlmcError):
    """An ONNX model llmc cannot import: inputs it cannot provide, outputs that are not logits."""


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}:{node.op_type}"


def _node_source(node: onnx.NodeProto) -> str | None:
    props = {p.key: p.value for p in node.metadata_props}
    return source_line(props.get("pkg.torch.onnx.stack_trace"))


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    attrs = {}
    for attribute in node.attribute:
        value = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        attrs[attribute.name] = value
    return attrs


class _Importer:
    def __init__(self, model: onnx.ModelProto):
        if model.functions:
            model = onnx.inliner.inline_local_functions(model)
        self.graph = model.graph
        self.builder = GraphBuilder()
        self.cx = OnnxContext(self.builder)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producers = {name: node for node in self.graph.node for name in node.output if name}
        self.env: dict[str, Value] = {}
        self.recorded = {v.name: v.type.tensor_type for v in [*self.graph.value_info, *self.graph.output]}

    # -- graph inputs ----------------------------------------------------------------------------
    def _inputs(self) -> Node:
        inputs = [i for i in self.graph.input if i.name not in self.initializers]
        ids = next((i for i in inputs if i.name == "input_ids"), None)
        if ids is None:
            names = ", ".join(i.name for i in inputs) or "none"
            raise OnnxImportError(f"the ONNX model has no input named input_ids (its inputs: {names}); llmc imports "
                                  "causal LMs exported with token ids as the input `input_ids`")
        dims = ids.type.tensor_type.shape.dim
        if len(dims) != 2 or dims[1].HasField("dim_value") or dims[0].dim_value > 1:
            shape = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims]
            raise OnnxImportError(f"input_ids has shape {shape}; llmc needs (batch, sequence) with a dynamic sequence "
                                  "axis: export with dynamic_shapes (dynamo) or dynamic_axes (TorchScript) on axis 1")
        seq = D.symbol(SEQ)
        dtype = ir_dtype(onnx_dtype(ids.type.tensor_type.elem_type), "input_ids")
        node = self.builder.input("input_ids", TensorType((1, seq), dtype))
        self.env["input_ids"] = node
        for extra in inputs:
            if extra.name == "input_ids":
                continue
            self.env[extra.name] = self._stand_in(extra, seq)
        return node

    def _stand_in(self, value: onnx.ValueInfoProto, seq: D.Dim) -> Value:
        """What a single unpadded sequence passes for an input other than input_ids."""
        dtype = ir_dtype(onnx_dtype(value.type.tensor_type.elem_type), value.name)
        rank = len(value.type.tensor_type.shape.dim)
        self.cx.begin("input", value.name, [value.name], None)
        if value.name == "attention_mask" and rank == 2:
            return self.cx.op("full", [], {"shape": [1, seq], "value": 1, "dtype": dtype})
        if value.name == "position_ids" and rank == 2:
            positions = self.cx.op("arange", [], {"start": 0, "end": seq, "step": 1, "dtype": dtype})
            return self.cx.reshape(positions, [1, seq])
        raise OnnxImportError(f"the ONNX model has an input {value.name!r} llmc cannot provide; llmc imports causal "
                              "LMs whose inputs are input_ids and optionally attention_mask and position_ids "
                              "(export the model without a KV cache: no past_key_values inputs)")

    # -- nodes -----------------------------------------------------------------------------------
    def _needed(self, output: str) -> list[onnx.NodeProto]:
        """The nodes `output` depends on, in graph order."""
        position = {name: index for index, node in enumerate(self.graph.node) for name in node.output if name}
        wanted, stack = set(), [output]
        while stack:
            index = position.get(stack.pop())
            if index is None or index in wanted:
                continue
            wanted.add(index)
            stack.extend(name for name in self.graph.node[index].input if name)
        return [node for index, node in enumerate(self.graph.node) if index in wanted]

    def _check_supported(self, nodes: list[onnx.NodeProto]) -> None:
        unknown = [(_op_key(n), n.name or n.output[0], _node_source(n)) for n in nodes if _op_key(n) not in TABLE]
        if unknown:
            raise unsupported_ops_error("ONNX", unknown)

    def _value(self, name: str) -> Value | None:
        if not name:
            return None
        if name not in self.env:
            producer = self.producers.get(name)
            if producer is not None:
                raise UnsupportedOpsError(f"the model uses output {name!r} of node {producer.name} "
                                          f"({producer.op_type}), which llmc's converter does not produce")
            if name not in self.initializers:
                raise OnnxImportError(f"the ONNX graph uses the value {name!r}, which nothing defines")
            tensor = self.initializers[name]
            self.env[name] = known(numpy_helper.to_array(tensor), onnx_dtype(tensor.data_type), name)
        return self.env[name]

    def _convert(self, node: onnx.NodeProto) -> None:
        name = node.name or node.output[0]
        where = f"node {name} ({node.op_type}" + (f", {_node_source(node)})" if _node_source(node) else ")")
        self.cx.begin(node.op_type, name, node.output, _node_source(node))
        inputs = [self._value(i) for i in node.input]
        try:
            result = TABLE[_op_key(node)](self.cx, inputs, _attributes(node))
        except UnsupportedPattern as error:
            raise UnsupportedOpsError(f"cannot import {where}: {error}") from None
        except IRError as error:
            raise OnnxImportError(f"llmc's converter for {node.op_type} made an invalid graph at {where}: "
                                  f"{error}") from None
        results = result if isinstance(result, list) else [result]
        for output, value in zip(node.output, results):
            if output:
                self._check_type(output, value, where)
                self.env[output] = value

    def _check_type(self, name: str, value: Value, where: str) -> None:
        recorded = self.recorded.get(name)
        if recorded is None or not recorded.elem_type:
            return
        dtype = onnx_dtype(recorded.elem_type)
        shape = self.cx.shape(value)
        dims = recorded.shape.dim if recorded.HasField("shape") else None
        mismatch = self.cx.dtype(value) != dtype or (dims is not None and len(dims) != len(shape))
        if dims is not None and not mismatch:
            mismatch = any(d.HasField("dim_value") and isinstance(s, int) and d.dim_value != s
                           for d, s in zip(dims, shape))
        if mismatch:
            recorded_shape = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims or []]
            raise OnnxImportError(f"llmc's converter for {where} gave {self.cx.dtype(value)}{list(shape)} for "
                                  f"{name}, the ONNX file records {dtype}{recorded_shape}")

    def _output(self) -> str:
        outputs = [o.name for o in self.graph.output]
        return "logits" if "logits" in outputs else outputs[0]

    def run(self, function_name: str) -> Module:
        output = self._output()
        nodes = self._needed(output)
        self._check_supported(nodes)
        ids = self._inputs()
        for node in nodes:
            self._convert(node)
        logits = self.cx.tensor(self._value(output))
        if logits.type.rank != 3:
            raise OnnxImportError(f"the ONNX model's output {output!r} is {logits.type}; llmc needs logits of shape "
                                  "(1, seq, vocab)")
        graph = Graph(function_name, [ids], [logits])
        used = {n.attrs["weight"] for n in graph.params()}
        module = Module({function_name: graph}, {k: v for k, v in self.cx.weights.items() if k in used})
        verify_module(module)
        return module


def import_onnx(model: onnx.ModelProto, function_name: str = "forward") -> Module:
    """The IR module of an ONNX causal LM, with one function called `function_name`."""
    check_opset(model)
    return _Importer(model).run(function_name)


def import_onnx_file(path: str | Path) -> Module:
    return import_onnx(load_onnx(path))

