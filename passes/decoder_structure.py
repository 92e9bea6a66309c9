"""Where a decoder's parts are in a flat graph: its layers (residual adds), each layer's attention
projections and each MLP. Pruning and sharding cut and split these parts; they find them here.

- A layer is the residual adds its weights feed: `h + branch(h)`, where every weight the branch
  alone reads carries the layer's index in its name (`layers.7.`, `h.7.`).
- An attention's projections are the matmuls its q, k and v come from, and the one its output
  reaches (after KV-cache lowering, around `paged_attention`).
- An MLP is a matmul (the down projection) whose input is computed only by elementwise ops from
  other matmuls (gate and up, or one up projection as in GPT-2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmc.ir import PARAM, Graph, LlmcError, Node, TensorType
from llmc.ir.ops.elementwise import ARITHMETIC, UNARY

ELEMENTWISE = set(ARITHMETIC) | set(UNARY)
MATMULS = ("linear", "matmul")


class StructureError(LlmcError):
    """A model whose layers, heads or MLPs are not laid out as a pass that cuts them needs."""
LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_of(weight: str) -> int | None:
    """The decoder layer a weight belongs to, from the first index in its name."""
    found = LAYER_INDEX.search(weight)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class ResidualAdd:
    node: Node
    stream: Node  # the operand carrying the residual stream
    layer: int


def residual_adds(graph: Graph) -> list[ResidualAdd]:
    """The residual adds of the decoder layers, in order. An add is one when an operand is the stream and the other
    reads weights of exactly one layer that the stream does not. Until the first residual add, the stream is any
    value that no layer's weight made (the embeddings); from then on, the last residual add."""
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    ancestry: dict[int, int] = {}
    for node in graph.nodes:
        bits = 1 << position[id(node)]
        for source in node.inputs:
            if source is not None:
                bits |= ancestry[id(source)]
        ancestry[id(node)] = bits
    layer_bits: dict[int, int] = {}
    for node in graph.nodes:
        layer = layer_of(node.attrs["weight"]) if node.op == PARAM else None
        if layer is not None:
            layer_bits[layer] = layer_bits.get(layer, 0) | 1 << position[id(node)]

    def layers_in(bits: int) -> list[int]:
        return [layer for layer, mask in layer_bits.items() if bits & mask]

    found: list[ResidualAdd] = []
    stream: set[int] = set()
    for node in graph.nodes:
        if node.op != "add" or not isinstance(node.type, TensorType) or not node.type.dtype.startswith(("float", "bf")):
            continue
        for a, b in (node.inputs, node.inputs[::-1]):
            is_stream = id(a) in stream if stream else not layers_in(ancestry[id(a)])
            if not is_stream or a.type != node.type:
                continue
            branch = layers_in(ancestry[id(b)] & ~ancestry[id(a)])
            if len(branch) == 1 and (not found or branch[0] >= found[-1].layer):
                found.append(ResidualAdd(node, a, branch[0]))
                stream.add(id(node))
                break
    return found


def layer_bounds(graph: Graph) -> dict[int, tuple[Node, Node]]:
    """Each layer's stream on entry and on exit."""
    bounds: dict[int, tuple[Node, Node]] = {}
    for residual in residual_adds(graph):
        entry = bounds.get(residual.layer, (residual.stream, residual.node))[0]
        bounds[residual.layer] = (entry, residual.node)
    return bounds


def weight_of(linear: Node, position: int = 1) -> str | None:
    """The name of the weight at input `position` of a matmul (1: its weight, 2: its bias), if one is there."""
    source = linear.inputs[position]
    return source.attrs["weight"] if source is not None and source.op == PARAM else None


@dataclass(frozen=True)
class AttentionProjections:
    layer: int
    q: Node
    k: Node
    v: Node
    out: Node
    paths: dict[str, list[Node]]  # "q", "kv", "out" -> the nodes between the projections and the attention


def _between(graph: Graph, start: Node, end: Node) -> list[Node]:
    """The nodes on the paths from `start` to `end`, both excluded, in graph order."""
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    span = graph.nodes[position[id(start)] + 1:position[id(end)]]
    reaches = {id(start)}
    for node in span:
        if any(s is not None and id(s) in reaches for s in node.inputs):
            reaches.add(id(node))
    feeds = {id(end)}
    for node in reversed([end, *span]):
        if id(node) in feeds:
            feeds.update(id(s) for s in node.inputs if s is not None)
    return [n for n in span if id(n) in reaches and id(n) in feeds]


def _projection(value: Node, layer: int, what: str, purpose: str) -> Node:
    """The one matmul `value` is computed from, through ops that are no matmul."""
    found: dict[int, Node] = {}
    seen: set[int] = set()
    stack = [value]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op in MATMULS:
            found[id(node)] = node
            continue
        stack.extend(s for s in node.inputs if s is not None)
    if len(found) != 1:
        raise StructureError(f"{purpose}: the {what} of layer {layer} come from {len(found)} matmuls, not one "
                             f"projection")
    return next(iter(found.values()))


def _output_projection(graph: Graph, attention: Node, layer: int, purpose: str) -> Node:
    users = graph.users()
    found: dict[int, Node] = {}
    stack, seen = [attention], set()
    while stack:
        node = stack.pop()
        for user in users[id(node)]:
            if id(user) in seen:
                continue
            seen.add(id(user))
            if user.op in MATMULS and user.inputs[0] is node:
                found[id(user)] = user
            else:
                stack.append(user)
    if len(found) != 1 or next(iter(found.values())).op != "linear" or weight_of(next(iter(found.values()))) is None:
        raise StructureError(f"{purpose}: the attention output of layer {layer} does not reach one output "
                             f"projection, a linear over a weight (found {len(found)} matmuls)")
    return next(iter(found.values()))


def attention_projections(graph: Graph, purpose: str) -> list[AttentionProjections]:
    """Each attention's projections, after KV-cache lowering; `purpose` (a pass's option) leads any refusal."""
    found = []
    for node in graph.nodes:
        if node.op != "paged_attention":
            continue
        layer = node.attrs["layer"]
        q, k, v = (_projection(node.inputs[i], layer, what, purpose)
                   for i, what in enumerate(("queries", "keys", "values")))
        if len({id(q), id(k), id(v)}) != 3:
            raise StructureError(f"{purpose}: layer {layer} computes q, k and v in one fused projection; llmc "
                                 f"splits heads of separate q, k, v projections")
        if any(p.op != "linear" or weight_of(p) is None for p in (q, k, v)):
            raise StructureError(f"{purpose}: the q, k, v projections of layer {layer} are not linears over "
                                 f"weights of their own")
        out = _output_projection(graph, node, layer, purpose)
        paths = {"q": _between(graph, q, node), "kv": _between(graph, k, node) + _between(graph, v, node),
                 "out": _between(graph, node, out)}
        found.append(AttentionProjections(layer, q, k, v, out, paths))
    return found


@dataclass(frozen=True)
class Mlp:
    down: Node
    ups: list[Node]


def _is_scalar_constant(node: Node) -> bool:
    return node.op == "constant" and not isinstance(node.attrs["value"], list)


def _ups(value: Node) -> list[Node] | None:
    """The matmuls `value` is computed from by elementwise ops alone, or None when anything else takes part."""
    ups: dict[int, Node] = {}
    stack, seen = [value], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op == "linear" and weight_of(node) is not None:
            ups[id(node)] = node
        elif node.op in ELEMENTWISE:
            stack.extend(s for s in node.inputs if s is not None)
        elif not _is_scalar_constant(node):
            return None
    return list(ups.values()) or None


def mlps(graph: Graph) -> list[Mlp]:
    """Every MLP of the graph, in order."""
    found = []
    for node in graph.nodes:
        if node.op == "linear" and weight_of(node) is not None:
            ups = _ups(node.inputs[0])
            width = node.inputs[1].type.shape[1]
            if ups and all(up.type.shape[-1] == width for up in ups):
                found.append(Mlp(node, ups))
    return found


