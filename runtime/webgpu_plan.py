"""The format of a vulkan package's library (`lib-vulkan.json`), which the runtime owns and
the vulkan target writes.

The library holds WGSL kernels and, per entry function, a launch plan. Buffer and grid
sizes depend on the symbolic dimensions of a step (tokens, rows, pages), so the plan
stores them as small JSON trees, evaluated at every step: an int is a constant, a string
names a dimension of the step, `["dim", p, d]` is dimension d of a kernel function's
parameter p, and `[op, a, b]` combines two trees with one of `OPERATORS`. The KV cache
is a tuple of inputs: one page pool per layer, then the step tensors `STEP_FIELDS`.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

PLAN_FORMAT = 1
STEP_FIELDS = ("slots", "token_rows", "token_lengths", "page_table")

SizeExpr = Union[int, str, list]

OPERATORS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
    "min": min,
    "max": max,
}


def pool_name(layer: int) -> str:
    return f"pages.{layer}"


def cache_field_names(count: int) -> list[str]:
    """The names of the cache tuple's `count` tensors, in order: the layers' page pools, then `STEP_FIELDS`."""
    return [pool_name(layer) for layer in range(count - len(STEP_FIELDS))] + list(STEP_FIELDS)


def evaluate(expr: SizeExpr, names: Mapping[str, int], dims: Sequence[Sequence[int]] = ()) -> int:
    """The value of `expr` given the step's dimensions by name and the shapes of a kernel's parameters."""
    if isinstance(expr, int):
        return expr
    if isinstance(expr, str):
        return names[expr]
    if expr[0] == "dim":
        return dims[expr[1]][expr[2]]
    return OPERATORS[expr[0]](evaluate(expr[1], names, dims), evaluate(expr[2], names, dims))
