"""Shape rules shared by several ops: broadcasting and axis normalisation."""

from __future__ import annotations

from typing import Sequence

from .. import dims as D
from ..dims import Dim
from ..errors import IRError
from ..types import TensorType, Type


def tensor(t: Type | None, op: str, what: str = "input") -> TensorType:
    if not isinstance(t, TensorType):
        raise IRError(f"op {op}: {what} must be a tensor, got {t}")
    return t


def indices(t: Type | None, op: str, what: str = "indices") -> TensorType:
    """A tensor of integer positions (a gather's indices)."""
    found = tensor(t, op, what)
    if found.dtype not in ("int64", "int32"):
        raise IRError(f"op {op}: {what} must be integers, got {found.dtype}")
    return found


def broadcast_shapes(op: str, *shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    result = []
    for axis in range(rank):
        dim: Dim = 1
        for shape in padded:
            d = shape[axis]
            if D.equal(d, 1):
                continue
            if D.equal(dim, 1):
                dim = d
            elif not D.equal(dim, d):
                raise IRError(f"op {op}: shapes {', '.join(str(list(s)) for s in shapes)} do not broadcast")
        result.append(dim)
    return tuple(result)


def same_dtype(op: str, types: Sequence[TensorType]) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise IRError(f"op {op}: operands must share one dtype, got {', '.join(sorted(dtypes))}")
    return dtypes.pop()


def axis(op: str, value: int, rank: int) -> int:
    if not -rank <= value < max(rank, 1):
        raise IRError(f"op {op}: axis {value} is out of range for rank {rank}")
    return value % rank if rank else 0


def axes(op: str, values: Sequence[int] | None, rank: int) -> tuple[int, ...]:
    if values is None:
        return tuple(range(rank))
    return tuple(sorted({axis(op, v, rank) for v in values}))
