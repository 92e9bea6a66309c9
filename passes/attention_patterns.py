"""Recognise attention written out op by op and turn it into one `attention` node.

Exports keep `scaled_dot_product_attention` whole when they can, but eager-mode models,
core-ATen decompositions and ONNX files spell it out: a matmul of q with transposed k,
a scale (multiplied, divided, or split as sqrt(scale) on both q and k), optionally a
soft-cap (cap * tanh(scores / cap), Gemma 2's attention-logit capping), a mask (added,
applied with `where`, or both), a softmax over the last axis (which ONNX exports guard with
`where(isnan(p), 0, p)`, and some models shift by the row's maximum first), and a matmul
with v. Each spelling below is one pattern; the rules rebuild it as `attention`, which
KV-cache lowering understands. ONNX's dynamo
exporter also transposes k through a 3-D reshape; the first rule turns that back into
the plain transpose the attention patterns expect.
"""

from __future__ import annotations

from llmc.ir import GraphBuilder, Node
from llmc.ir import dims as D

from .rewrite import Pattern, Rule, op, scalar, var

LAST_TWO_SWAPPED = [0, 1, 3, 2]
_LAST_AXIS = (-1, 3)


def _scores(q: Pattern, k: Pattern) -> Pattern:
    return op("matmul", q, op("permute", k, axes=LAST_TWO_SWAPPED))


def _softmax(x: Pattern) -> Pattern:
    return op("softmax", x, axis=lambda a: a in _LAST_AXIS)


def _single_value(node: Node) -> bool:
    return node.type.rank == 0


def _value(node: Node) -> float:
    return float(node.attrs["value"])


def _mask(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
    """The attention's mask: the one matched, or for where(keep, scores, fill) + mask (GPT-Neo's buffer of kept
    positions, then the additive mask) the additive where(keep, mask, fill), which gives every kept score the same
    value and leaves every other one at the fill or below."""
    if "keep" not in m:
        return m.get("mask")
    mask, fill = m["mask"], m["fill"]
    if mask.type.dtype != fill.type.dtype:
        return None
    return builder.op("where", [m["keep"], mask, fill], name="attention_mask", source=m["out"].source)


def _build(builder: GraphBuilder, m: dict[str, Node], scale: float | None) -> Node | None:
    q, k, v = m["q"], m["k"], m["v"]
    if q.type.rank != 4 or k.type.rank != 4 or v.type.rank != 4:
        return None
    mask = _mask(builder, m)
    if mask is None and "mask" in m:
        return None
    softcap = None
    if "cap_in" in m:
        softcap = _value(m["cap_out"])
        if _value(m["cap_in"]) != softcap or softcap <= 0:
            return None
    return builder.op("attention", [q, k, v, mask], {"scale": scale, "causal": False, "softcap": softcap},
                      name="attention", source=m["out"].source)


def _capped(scores: Pattern) -> dict[str, Pattern]:
    """The scaled scores as they are, or soft-capped: cap * tanh(scores / cap)."""
    return {"": scores, "_soft_capped": op("tanh", scores / scalar(name="cap_in")) * scalar(name="cap_out")}


def _probabilities(logits: Pattern) -> dict[str, Pattern]:
    """softmax(logits), plain or guarded against NaN rows as ONNX exports write it (isnan(p) imports as p != p)."""
    p = _softmax(logits).bind("probabilities")
    return {"": p, "_nan_guarded": op("where", op("not_equal", p, p), scalar(0.0), p)}


def _rule(name: str, scores: Pattern, scale_of) -> list[Rule]:
    """Rules for `softmax(scores) @ v`: scores soft-capped or not; no mask, an additive mask, a `where` mask with
    a fill value, or both (a `where`, then an additive mask)."""
    v, mask = var("v"), var("mask")
    rules = []
    for cap, capped in _capped(scores).items():
        forms = {
            "": capped,
            "_additive_mask": capped + mask,
            "_where_mask": op("where", mask, capped, scalar()),
            "_where_then_additive_mask": op("where", var("keep"), capped, var("fill", _single_value)) + mask,
        }
        for suffix, logits in forms.items():
            for guard, probabilities in _probabilities(logits).items():
                pattern = op("matmul", probabilities, v).bind("out")

                def build(builder, m, scale_of=scale_of):
                    return _build(builder, m, scale_of(m))
                rules.append(Rule(name + cap + suffix + guard, pattern, build))
    return rules


def _swap_last_two(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
    """reshape(permute(reshape(k, (b*h, s, d)), [0, 2, 1]), (b, h, d, s)) is permute(k, [0, 1, 3, 2])."""
    k, flat, out = m["k"], m["flat"], m["out"]
    if k.type.rank != 4 or flat.type.rank != 3 or out.type.rank != 4:
        return None
    b, h, s, d = k.type.shape
    if not all(D.equal(x, y) for x, y in zip(flat.type.shape + out.type.shape, (D.product([b, h]), s, d, b, h, d, s))):
        return None
    return builder.op("permute", [k], {"axes": LAST_TWO_SWAPPED}, name="transpose", source=out.source)


def _plain_softmax(builder: GraphBuilder, m: dict[str, Node]) -> Node:
    """softmax(x - max(x)) is softmax(x): the shift a model writes out for stability, which softmax makes itself."""
    return builder.op("softmax", [m["x"]], {"axis": -1}, name="softmax", source=m["out"].source)


_Q, _K = var("q"), var("k")
RULES: list[Rule] = [
    Rule("softmax_of_shifted_scores",
         op("softmax", var("x") - op("max", var("x"), axes=lambda a: list(a) in ([-1], [3]), keepdims=True),
            axis=lambda a: a in _LAST_AXIS).bind("out"), _plain_softmax),
    Rule("swap_last_two_through_3d",
         op("reshape", op("permute", op("reshape", _K).bind("flat"), axes=[0, 2, 1])).bind("out"), _swap_last_two),
    *_rule("scaled_after", _scores(_Q, _K) * scalar(name="scale"), lambda m: _value(m["scale"])),
    *_rule("divided_after", _scores(_Q, _K) / scalar(name="scale"), lambda m: 1.0 / _value(m["scale"])),
    *_rule("scaled_both", op("matmul", _Q * scalar(name="scale"),
                             op("permute", _K, axes=LAST_TWO_SWAPPED) * scalar(name="scale_k")),
           lambda m: _value(m["scale"]) * _value(m["scale_k"])),
    *_rule("unscaled", _scores(_Q, _K), lambda m: 1.0),
]
