"""Symbolic dims (sympy) as TVM PrimExprs over `tirx.Var`s, one var per symbol name."""

from __future__ import annotations

import sympy
from tvm import tirx

from llmc.ir import dims as D


class SymbolTable:
    def __init__(self) -> None:
        self.vars: dict[str, tirx.Var] = {}

    def var(self, name: str) -> tirx.Var:
        if name not in self.vars:
            self.vars[name] = tirx.Var(name, "int64")
        return self.vars[name]

    def prim(self, dim: D.Dim) -> tirx.PrimExpr:
        if isinstance(dim, int):
            return tirx.IntImm("int64", dim)
        return self._expr(sympy.sympify(dim))

    def _expr(self, expr: sympy.Expr) -> tirx.PrimExpr:
        if expr.is_Integer:
            return tirx.IntImm("int64", int(expr))
        if isinstance(expr, sympy.Symbol):
            return self.var(expr.name)
        if isinstance(expr, sympy.Add):
            terms = [self._expr(a) for a in expr.args]
            total = terms[0]
            for t in terms[1:]:
                total = total + t
            return total
        if isinstance(expr, sympy.Mul):
            coefficient, rest = expr.as_coeff_Mul()
            value = self._expr(rest)
            if coefficient.is_Integer:
                return value * int(coefficient) if coefficient != 1 else value
            numerator, denominator = sympy.fraction(coefficient)
            return tirx.floordiv(value * int(numerator), int(denominator))
        if isinstance(expr, sympy.floor):
            numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
            return tirx.floordiv(self._expr(numerator), self._expr(denominator))
        if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp > 0:
            base = self._expr(expr.base)
            value = base
            for _ in range(int(expr.exp) - 1):
                value = value * base
            return value
        raise NotImplementedError(f"llmc cannot lower the symbolic size {expr} to TVM")

    def shape(self, dims) -> list[tirx.PrimExpr]:
        return [self.prim(d) for d in dims]
