"""Tensor dimensions: plain ints, or symbolic expressions over named sizes.

A model graph keeps its sequence length (and, after KV-cache lowering, its batch size)
symbolic, so one compiled library serves every length. Symbolic dims are sympy
expressions over positive integer symbols (`seq`, `seq + 1`, `9*seq`), so shape rules
such as reshape's -1 can divide and compare them exactly.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Union

import sympy

Dim = Union[int, sympy.Expr]

# The name of the token count of a decode step (one token per sequence: a handful). Passes that make
# decode functions use it, and codegen may schedule kernels over it as small.
DECODE_TOKENS = "batch"


def symbol(name: str) -> sympy.Symbol:
    """The symbolic size called `name` (positive integer, so sympy can simplify)."""
    return sympy.Symbol(name, integer=True, positive=True)


def normalize(dim: Dim) -> Dim:
    """Turn integer-valued sympy expressions into ints; expand the rest to a canonical sum."""
    if isinstance(dim, bool):
        raise TypeError("a dimension cannot be a bool")
    if isinstance(dim, int):
        return dim
    expr = sympy.sympify(dim)
    if expr.is_Integer:
        return int(expr)
    return sympy.expand(expr)


def is_static(dim: Dim) -> bool:
    return isinstance(dim, int)


def product(dims: Iterable[Dim]) -> Dim:
    result: Dim = 1
    for d in dims:
        result = result * d
    return normalize(result)


def equal(a: Dim, b: Dim) -> bool:
    """True when two dims are provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a is b or a == b:
        return True
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def divide_exact(numerator: Dim, denominator: Dim) -> Dim:
    """numerator / denominator; raises ValueError when it is not provably whole."""
    quotient = normalize(sympy.sympify(numerator) / sympy.sympify(denominator))
    if isinstance(quotient, int):
        return quotient
    numer, denom = sympy.fraction(sympy.together(quotient))
    if denom != 1:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return normalize(numer)


def free_symbols(dim: Dim) -> set[str]:
    if isinstance(dim, int):
        return set()
    return {s.name for s in dim.free_symbols}


def evaluate(dim: Dim, bindings: Mapping[str, int]) -> int:
    """The concrete value of `dim` once its symbols are bound to ints."""
    if isinstance(dim, int):
        return dim
    value = dim.subs({symbol(k): v for k, v in bindings.items()})
    if not value.is_Integer:
        missing = sorted(free_symbols(dim) - set(bindings))
        raise ValueError(f"cannot evaluate dimension {dim}: unbound {', '.join(missing)}")
    return int(value)


def substitute(dim: Dim, mapping: Mapping[str, Dim]) -> Dim:
    """Replace symbols by other dims (renaming `s70` to `seq`, say)."""
    if isinstance(dim, int):
        return dim
    return normalize(dim.subs({symbol(k): sympy.sympify(v) for k, v in mapping.items()}))


def to_text(dim: Dim) -> str:
    return str(dim)


def parse(text: str | int) -> Dim:
    """Inverse of `to_text`: every name in the text is a positive integer symbol."""
    if isinstance(text, int):
        return text
    if text.lstrip("-").isdigit():
        return int(text)
    names = {t for t in sympy.sympify(text).free_symbols}
    expr = sympy.sympify(text, locals={s.name: symbol(s.name) for s in names})
    return normalize(expr)


