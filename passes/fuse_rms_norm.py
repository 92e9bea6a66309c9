"""Fuse RMSNorm, spelled out as `weight * (x * rsqrt(mean(x ** 2, -1) + eps))`, into one `rms_norm`.

Hugging Face models write RMSNorm op by op (power or x*x, mean over the last axis,
add eps, rsqrt, two multiplies); one `rms_norm` node reads x once and lets codegen
schedule the reduction and the scaling together.
"""

from __future__ import annotations

from llmc.ir import GraphBuilder, Module, Node

from .rewrite import Rule, op, rewrite_module, scalar, var


def _last_axis(axes) -> bool:
    return axes is not None and len(axes) == 1 and axes[0] == -1


def _normalized(x, squares):
    return x * op("rsqrt", op("mean", squares, axes=_last_axis, keepdims=True) + scalar(name="eps"))


def _build(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
    x, weight = m["x"], m.get("weight")
    if weight is not None and (weight.type.rank != 1 or weight.type.shape[0] != x.type.shape[-1]):
        return None
    return builder.op("rms_norm", [x, weight], {"eps": float(m["eps"].attrs["value"])}, name="rms_norm",
                      source=m["out"].source)


_X = var("x")
_SQUARES = (op("power", _X, scalar(2.0)), _X * _X)
RULES = [Rule(f"rms_norm{'_weighted' if weighted else ''}_{index}",
              (var("weight") * _normalized(_X, squares) if weighted else _normalized(_X, squares)).bind("out"), _build)
         for weighted in (True, False) for index, squares in enumerate(_SQUARES)]


def fuse_rms_norm(module: Module) -> Module:
    return rewrite_module(module, RULES)
