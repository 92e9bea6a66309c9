"""The stable, versioned serialized form of a module: graph as JSON, weights as safetensors.

The JSON lists each function's nodes in topological order with their op, operands (by
name), attributes and type; symbolic dims are written as text (`{"dim": "seq + 1"}`).
Weights go to a safetensors file and are referred to by name only. Loading a file
written by another IR version is refused with a clear message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import sympy

from . import dims as D
from .errors import IRError
from .graph import INPUT, Graph, Module, Node
from .types import parse_type

IR_VERSION = 1
GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"


def _encode_attr(value: Any) -> Any:
    if isinstance(value, sympy.Expr):
        return {"dim": D.to_text(value)}
    if isinstance(value, (list, tuple)):
        return [_encode_attr(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode_attr(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"dim"}:
        return D.parse(value["dim"])
    if isinstance(value, list):
        return [_decode_attr(v) for v in value]
    return value


def graph_to_dict(graph: Graph) -> dict[str, Any]:
    return {
        "inputs": [n.name for n in graph.inputs],
        "outputs": [n.name for n in graph.outputs],
        "nodes": [
            {"name": n.name, "op": n.op, "inputs": [v.name if v is not None else None for v in n.inputs],
             "attrs": {k: _encode_attr(v) for k, v in n.attrs.items()}, "type": str(n.type),
             **({"source": n.source} if n.source else {})}
            for n in graph.nodes
        ],
    }


def graph_from_dict(name: str, data: dict[str, Any]) -> Graph:
    by_name: dict[str, Node] = {}
    for entry in data["nodes"]:
        try:
            inputs = [by_name[v] if v is not None else None for v in entry["inputs"]]
        except KeyError as missing:
            raise IRError(f"function {name}: node {entry['name']} uses undefined value {missing}") from None
        attrs = {k: _decode_attr(v) for k, v in entry["attrs"].items()}
        by_name[entry["name"]] = Node(entry["name"], entry["op"], inputs, attrs, parse_type(entry["type"]),
                                      entry.get("source"))
    inputs = [by_name[n] for n in data["inputs"]]
    if any(n.op != INPUT for n in inputs):
        raise IRError(f"function {name}: an input is not an input node")
    return Graph(name, inputs, [by_name[n] for n in data["outputs"]])


def module_to_json(module: Module) -> str:
    data = {
        "llmc_ir_version": IR_VERSION,
        "metadata": module.metadata,
        "params": {k: str(v) for k, v in module.param_types().items()},
        "functions": {name: graph_to_dict(g) for name, g in module.functions.items()},
    }
    return json.dumps(data, indent=1)


def module_from_json(text: str, weights: dict[str, np.ndarray]) -> Module:
    data = json.loads(text)
    version = data.get("llmc_ir_version")
    if version != IR_VERSION:
        raise IRError(f"this graph was written by llmc IR version {version}; this llmc reads version {IR_VERSION}. "
                      "Recompile the model with this llmc.")
    functions = {name: graph_from_dict(name, g) for name, g in data["functions"].items()}
    missing = sorted(set(data["params"]) - set(weights))
    if missing:
        raise IRError(f"the weights file lacks {len(missing)} weights the graph needs, e.g. {missing[0]!r}")
    return Module(functions, {k: weights[k] for k in data["params"]}, data.get("metadata", {}))


def save_module(module: Module, directory: str | Path) -> None:
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / GRAPH_FILE).write_text(module_to_json(module))
    save_file({k: np.ascontiguousarray(v) for k, v in module.weights.items()}, str(directory / WEIGHTS_FILE))


def load_module(directory: str | Path) -> Module:
    from safetensors.numpy import load_file

    directory = Path(directory)
    weights = load_file(str(directory / WEIGHTS_FILE))
    return module_from_json((directory / GRAPH_FILE).read_text(), weights)

