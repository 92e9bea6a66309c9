"""Values the ONNX importer knows at import time: initializers, constants and shape arithmetic.

ONNX graphs compute shapes at run time (Shape -> Gather -> Concat -> Reshape); llmc needs
them at import time, as the dims of its IR types. So a value whose producer's inputs are
all known is computed while importing: a `Known` holds a NumPy array of numbers, or, for
shape values, an object array whose entries are ints and sympy dims such as `seq` (the
way torch.export's SymInts become dims). Comparisons of dims are decided with the dims'
assumptions (`seq` is a positive integer); one that depends on the actual length is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
import sympy

from llmc.ir import LlmcError
from llmc.ir import dims as D
from llmc.ir.types import DTYPES, numpy_dtype


@dataclass(frozen=True, eq=False)
class Known:
    """A value known at import time. `dtype` is NumPy's name for the ONNX element type; an
    object array (symbolic shape values) holds ints and sympy dims and has an integer dtype."""

    array: np.ndarray
    dtype: str
    name: str

    @property
    def symbolic(self) -> bool:
        return self.array.dtype == object

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def known(values: Any, dtype: str, name: str) -> Known:
    """A `Known` of `values`, stored numerically unless some entry is a symbolic dim."""
    if has_symbols(values):
        array = np.asarray(values, dtype=object)
        entries = [D.normalize(v) if isinstance(v, sympy.Expr) else int(v) for v in array.flat]
        if any(not isinstance(v, int) for v in entries):
            return Known(_object_array(entries, array.shape), dtype, name)
        values = np.array(entries, dtype=np.int64).reshape(array.shape)
    target = numpy_dtype(dtype) if dtype in DTYPES else np.dtype(dtype)
    return Known(np.asarray(values).astype(target, copy=False), dtype, name)


def _object_array(entries: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(entries), dtype=object)
    for index, entry in enumerate(entries):
        array[index] = entry
    return array.reshape(shape)


def has_symbols(values: Any) -> bool:
    """Whether `values` (a dim, an array, or nested lists) holds a symbolic dim."""
    if isinstance(values, sympy.Expr):
        return not values.is_Integer
    if isinstance(values, np.ndarray):
        return values.dtype == object and any(has_symbols(v) for v in values.flat)
    if isinstance(values, (list, tuple)):
        return any(has_symbols(v) for v in values)
    return False


def onnx_dtype(elem_type: int) -> str:
    """NumPy's name for an ONNX element type."""
    if elem_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def ir_dtype(dtype: str, where: str) -> str:
    """`dtype` if llmc's IR has it, else an error naming the value."""
    if dtype not in DTYPES:
        raise LlmcError(f"{where} has element type {dtype}, which llmc does not support "
                        f"(it supports {', '.join(DTYPES)})")
    return dtype


def is_integer(dtype: str) -> bool:
    return dtype.startswith(("int", "uint"))


def decide(relation: Any, what: str) -> bool:
    """The truth of a comparison between dims, or an error when it depends on the sequence length."""
    if isinstance(relation, (bool, np.bool_)):
        return bool(relation)
    if relation is sympy.true or relation is sympy.false:
        return bool(relation)
    raise LlmcError(f"{what} compares sizes ({relation}) whose outcome depends on the sequence length; "
                    "llmc needs shapes that follow from the input sizes alone")


_RELATIONS: dict[str, tuple[Callable[[Any, Any], Any], np.ufunc]] = {
    "equal": (sympy.Eq, np.equal), "not_equal": (sympy.Ne, np.not_equal), "less": (sympy.Lt, np.less),
    "less_equal": (sympy.Le, np.less_equal), "greater": (sympy.Gt, np.greater),
    "greater_equal": (sympy.Ge, np.greater_equal),
}


def compare(relation: str, a: np.ndarray, b: np.ndarray, what: str) -> np.ndarray:
    """Elementwise comparison of known arrays, exact for symbolic dims."""
    symbolic, numeric = _RELATIONS[relation]
    if a.dtype != object and b.dtype != object:
        return numeric(a, b)
    decided = np.frompyfunc(lambda x, y: decide(symbolic(sympy.sympify(x), sympy.sympify(y)), what), 2, 1)(a, b)
    return np.asarray(decided, dtype=bool)


def integer_divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX integer Div (truncating), exact for symbolic dims (which are positive)."""
    def divide(x: Any, y: Any) -> Any:
        if isinstance(x, (int, np.integer)) and isinstance(y, (int, np.integer)):
            quotient = abs(int(x)) // abs(int(y))
            return quotient if (x >= 0) == (y >= 0) else -quotient
        return D.normalize(sympy.floor(sympy.sympify(x) / sympy.sympify(y)))
    if a.dtype != object and b.dtype != object:
        return np.asarray(np.trunc(np.true_divide(a, b))).astype(np.result_type(a, b))
    return np.frompyfunc(divide, 2, 1)(a, b)


def extremum(kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise max or min of known arrays; for dims, sympy decides (max(seq, 1) is seq)."""
    if a.dtype != object and b.dtype != object:
        return (np.maximum if kind == "max" else np.minimum)(a, b)
    fn = sympy.Max if kind == "max" else sympy.Min
    return np.frompyfunc(lambda x, y: D.normalize(fn(sympy.sympify(x), sympy.sympify(y))), 2, 1)(a, b)


def dims_of(value: Known, what: str) -> list[D.Dim]:
    """The entries of a known 1-D integer tensor as dims (a shape, or slice bounds)."""
    if not is_integer(value.dtype) or value.array.ndim > 1:
        raise LlmcError(f"{what} must be a 1-D integer tensor, got {value.dtype}{list(value.shape)}")
    return [D.normalize(v) if isinstance(v, sympy.Expr) else int(v) for v in value.array.reshape(-1)]
