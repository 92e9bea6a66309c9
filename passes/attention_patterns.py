"""Recognise attention written out op by op and turn it into one `attention` node.

Exports keep `scaled_dot_product_attention` whole when they can, but eager-mode models,
core-ATen decompositions and ONNX files spell it out: a matmul of q with transposed k,
a scale (multiplied, divided, or split as sqrt(scale) on both q and k), a mask (added,
or applied with `where`), a softmax over the last axis, and a matmul with v. Each
spelling below is one pattern; the rules rebuild it as `attention`, which KV-cache
lowering understands.
"""

from __future__ import annotations

from llmc.ir import GraphBuilder, Node

from .rewrite import Pattern, Rule, op, scalar, var

LAST_TWO_SWAPPED = [0, 1, 3, 2]


def _scores(q: Pattern, k: Pattern) -> Pattern:
    return op("matmul", q, op("permute", k, axes=LAST_TWO_SWAPPED))


def _softmax(x: Pattern) -> Pattern:
    return op("softmax", x, axis=lambda a: a in (-1, 3))


def _value(node: Node) -> float:
    return float(node.attrs["value"])


def _build(builder: GraphBuilder, m: dict[str, Node], scale: float | None) -> Node | None:
    q, k, v = m["q"], m["k"], m["v"]
    if q.type.rank != 4 or k.type.rank != 4 or v.type.rank != 4:
        return None
    return builder.op("attention", [q, k, v, m.get("mask")], {"scale": scale, "causal": False},
                      name="attention", source=m["out"].source)


def _rule(name: str, scores: Pattern, scale_of) -> list[Rule]:
    """Rules for `softmax(scores) @ v`: no mask, an additive mask, or a `where` mask with a fill value."""
    v, mask = var("v"), var("mask")
    forms = {
        "": scores,
        "_additive_mask": scores + mask,
        "_where_mask": op("where", mask, scores, scalar()),
    }
    rules = []
    for suffix, logits in forms.items():
        pattern = op("matmul", _softmax(logits), v).bind("out")

        def build(builder, m, scale_of=scale_of):
            return _build(builder, m, scale_of(m))
        rules.append(Rule(name + suffix, pattern, build))
    return rules


_Q, _K = var("q"), var("k")
RULES: list[Rule] = [
    *_rule("scaled_after", _scores(_Q, _K) * scalar(name="scale"), lambda m: _value(m["scale"])),
    *_rule("divided_after", _scores(_Q, _K) / scalar(name="scale"), lambda m: 1.0 / _value(m["scale"])),
    *_rule("scaled_both", op("matmul", _Q * scalar(name="scale"),
                             op("permute", _K, axes=LAST_TWO_SWAPPED) * scalar(name="scale_k")),
           lambda m: _value(m["scale"]) * _value(m["scale_k"])),
    *_rule("unscaled", _scores(_Q, _K), lambda m: 1.0),
]
