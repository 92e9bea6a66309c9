"""Find the ops that mix tokens along the sequence axis, outside attention.

KV-cache lowering packs the tokens of many sequences into one axis and runs every op but
attention on them as if each token stood alone. That is right only when nothing else
combines tokens: a cumulative sum over the sequence (OPT's positions, before they are
recognised), a reduction or a softmax over it, a matmul that contracts it, a concat or a
partial slice along it (token shifts, short convolutions), or an `arange` over it that is
not the positions. Such a graph would give wrong tokens silently, so the lowering refuses
it and names the first such node.
"""

from __future__ import annotations

from llmc.ir import Graph, Node
from llmc.ir import dims as D

SEQUENCE_REDUCTIONS = {"sum", "mean", "max", "min", "any"}
SEQUENCE_SCANS = {"cumsum", "softmax", "log_softmax"}


def _over_tokens(dim: D.Dim, sequence: str) -> bool:
    return sequence in D.free_symbols(dim)


def _axes_mix(node: Node, axes, sequence: str) -> bool:
    shape = node.inputs[0].type.shape
    chosen = range(len(shape)) if axes is None else [a % len(shape) for a in axes]
    return any(_over_tokens(shape[a], sequence) for a in chosen)


def _why_mixing(node: Node, sequence: str) -> str | None:
    """What `node` does across tokens, or None when it treats them apart."""
    if node.op in SEQUENCE_REDUCTIONS and _axes_mix(node, node.attrs["axes"], sequence):
        return f"{node.op} over the sequence axis"
    if node.op in SEQUENCE_SCANS and _axes_mix(node, [node.attrs["axis"]], sequence):
        return f"{node.op} along the sequence axis"
    if node.op == "concat" and _axes_mix(node, [node.attrs["axis"]], sequence):
        return "concat along the sequence axis"
    if node.op == "slice" and _axes_mix(node, [node.attrs["axis"]], sequence):
        axis = node.attrs["axis"] % node.inputs[0].type.rank
        if not D.equal(node.type.shape[axis], node.inputs[0].type.shape[axis]):
            return "a slice of the sequence axis (a token shift or window)"
    if node.op == "matmul" and _over_tokens(node.inputs[0].type.shape[-1], sequence):
        return "a matmul that sums over tokens"
    if node.op == "arange" and any(_over_tokens(node.attrs[k], sequence) for k in ("start", "end")):
        return "an arange over the sequence that is not the token positions"
    return None


def first_token_mixing(graph: Graph, sequence: str) -> tuple[Node, str] | None:
    """The first node that combines different tokens along the `sequence` axis, and what it does."""
    for node in graph.nodes:
        why = _why_mixing(node, sequence)
        if why is not None:
            return node, why
    return None
