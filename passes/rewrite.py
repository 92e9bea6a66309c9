"""llmc's one mechanism for matching and rewriting IR subgraphs.

A pattern is written as plain math over pattern variables, e.g.
`weight * (x * rsqrt(mean(x * x) + eps))`: `var` matches any node and binds it,
`op(name, ...)` matches a node of that op, optionally checking attributes, and Python
operators build `add`/`multiply`/... patterns (commutative ops match either operand
order). A `Rule` pairs a pattern with a function that builds the replacement from the
bound nodes, or returns None to decline. `rewrite` applies rules over a graph in
topological order until nothing changes (and raises if that takes too many rounds);
`rewrite_once` makes one such pass. Fusion, KV-cache lowering and quantization
are lists of such rules.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from llmc.ir import Graph, GraphBuilder, LlmcError, Module, Node, clone_with

# Which rules fired in each graph, at debug level (`llmc compile --verbose` shows it).
LOG = logging.getLogger("llmc.passes")
COMMUTATIVE = {"add", "multiply", "maximum", "minimum", "logical_and", "logical_or", "equal", "not_equal"}


class Pattern:
    def __init__(self, op: str | None = None, inputs: Sequence["Pattern"] = (), name: str | None = None,
                 attrs: Mapping[str, Any] | None = None, where: Callable[[Node], bool] | None = None):
        self.op = op
        self.inputs = tuple(inputs)
        self.name = name
        self.attrs = dict(attrs or {})
        self.where = where

    def bind(self, name: str) -> "Pattern":
        """The same pattern, also binding the matched node to `name`."""
        return Pattern(self.op, self.inputs, name, self.attrs, self.where)

    def _binary(self, op: str, other: Any, reverse: bool = False) -> "Pattern":
        other = other if isinstance(other, Pattern) else scalar(other)
        return Pattern(op, (other, self) if reverse else (self, other))

    def __add__(self, other): return self._binary("add", other)
    def __radd__(self, other): return self._binary("add", other, True)
    def __sub__(self, other): return self._binary("subtract", other)
    def __rsub__(self, other): return self._binary("subtract", other, True)
    def __mul__(self, other): return self._binary("multiply", other)
    def __rmul__(self, other): return self._binary("multiply", other, True)
    def __truediv__(self, other): return self._binary("divide", other)
    def __neg__(self): return Pattern("negative", (self,))


def var(name: str | None = None, where: Callable[[Node], bool] | None = None) -> Pattern:
    """Any node (optionally satisfying `where`), bound to `name`."""
    return Pattern(None, (), name, None, where)


def op(op_name: str, *inputs: Pattern, name: str | None = None, where: Callable[[Node], bool] | None = None,
       **attrs: Any) -> Pattern:
    """A node of `op_name` on `inputs`; each attr must equal the value given, or satisfy it if callable."""
    return Pattern(op_name, inputs, name, attrs, where)


def scalar(value: float | None = None, name: str | None = None) -> Pattern:
    """A constant holding a single number (equal to `value` when given)."""
    def check(node: Node) -> bool:
        raw = node.attrs["value"]
        if isinstance(raw, list):
            return False
        return value is None or raw == value
    return Pattern("constant", (), name, None, check)


def _match(pattern: Pattern, node: Node | None, bound: dict[str, Node]) -> bool:
    if node is None:
        return False
    if pattern.name is not None and pattern.name in bound:
        return bound[pattern.name] is node
    if pattern.op is not None:
        if node.op != pattern.op or len(node.inputs) < len(pattern.inputs):
            return False
        for key, expected in pattern.attrs.items():
            actual = node.attrs.get(key)
            if callable(expected) and not expected(actual):
                return False
            if not callable(expected) and actual != expected:
                return False
    if pattern.where is not None and not pattern.where(node):
        return False
    if pattern.inputs:
        orders = [node.inputs]
        if pattern.op in COMMUTATIVE and len(node.inputs) == 2:
            orders.append(node.inputs[::-1])
        for inputs in orders:
            trial = dict(bound)
            if all(_match(p, n, trial) for p, n in zip(pattern.inputs, inputs)):
                bound.clear()
                bound.update(trial)
                break
        else:
            return False
    if pattern.name is not None:
        bound[pattern.name] = node
    return True


def match(pattern: Pattern, node: Node) -> dict[str, Node] | None:
    bound: dict[str, Node] = {}
    return bound if _match(pattern, node, bound) else None


@dataclass(frozen=True)
class Rule:
    """`pattern` becomes `build(builder, bindings)`; build may return None to leave the node as it is.
    Nodes bound to the names in `single_use` must have no other user (fusing them must not compute
    them twice)."""

    name: str
    pattern: Pattern
    build: Callable[[GraphBuilder, dict[str, Node]], Node | None]
    single_use: tuple[str, ...] = ()


def builder_for(graph: Graph) -> GraphBuilder:
    return GraphBuilder(reserved=[n.name for n in graph.nodes])


class RewriteLimitError(LlmcError):
    """Rules kept changing a graph for more rounds than allowed: they undo each other, or grow the graph."""


def _sweep(graph: Graph, rules: Sequence[Rule], builder: GraphBuilder, fired: Counter) -> tuple[Graph, bool]:
    """One pass of `rules` over every node, inputs first; whether any rule changed a node."""
    changed = False
    mapping: dict[int, Node] = {}
    users = {key: len(value) for key, value in graph.users().items()}
    uses: dict[int, int] = {}
    for node in graph.nodes:
        current = clone_with(node, [mapping.get(id(i), i) if i is not None else None for i in node.inputs])
        for rule in rules:
            bindings = match(rule.pattern, current)
            if bindings is None or any(uses.get(id(bindings[n]), 0) != 1 for n in rule.single_use):
                continue
            replacement = rule.build(builder, bindings)
            if replacement is not None and replacement is not current:
                current = replacement
                changed = True
                fired[rule.name] += 1
                break
        mapping[id(node)] = current
        uses[id(current)] = users[id(node)] + sum(1 for out in graph.outputs if out is node)
    return Graph(graph.name, [mapping[id(n)] for n in graph.inputs], [mapping[id(n)] for n in graph.outputs]), changed


def _report(graph: Graph, fired: Counter) -> None:
    if fired:
        LOG.debug("%s: %s", graph.name, ", ".join(f"{name} x{count}" for name, count in sorted(fired.items())))


def rewrite_once(graph: Graph, rules: Sequence[Rule], builder: GraphBuilder | None = None) -> Graph:
    """Apply `rules` to every node once, inputs first (a replacement is not matched again)."""
    fired: Counter = Counter()
    graph, _ = _sweep(graph, rules, builder or builder_for(graph), fired)
    _report(graph, fired)
    return graph


def rewrite(graph: Graph, rules: Sequence[Rule], builder: GraphBuilder | None = None, max_rounds: int = 8) -> Graph:
    """Apply `rules` to every node, inputs first, repeating until a round changes nothing. A graph still changing
    after `max_rounds` rounds is an error, never a half-rewritten graph."""
    builder = builder or builder_for(graph)
    fired: Counter = Counter()
    for _ in range(max_rounds):
        graph, changed = _sweep(graph, rules, builder, fired)
        if not changed:
            _report(graph, fired)
            return graph
    raise RewriteLimitError(f"rewriting {graph.name} did not settle in {max_rounds} rounds (rules fired: "
                            f"{', '.join(sorted(fired))})")


def rewrite_module(module: Module, rules: Sequence[Rule]) -> Module:
    """`rewrite` applied to every function of `module` (weights and metadata unchanged)."""
    functions = {name: rewrite(graph, rules) for name, graph in module.functions.items()}
    return Module(functions, module.weights, module.metadata)
