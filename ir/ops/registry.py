"""The op registry: each IR op is defined once, here, by one `OpDef`.

An `OpDef` names the op's inputs and attributes and holds its type rule (used by the
graph builder and the verifier), its NumPy reference implementation (used by the
interpreter that checks every pass) and its documentation (printed by `llmc inspect`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import IRError
from ..types import Type

InferFn = Callable[[Sequence[Type | None], Mapping[str, Any]], Type]
ReferenceFn = Callable[[Sequence[Any], Mapping[str, Any], tuple[int, ...]], Any]

REQUIRED = object()


@dataclass(frozen=True)
class OpDef:
    """One IR operation.

    `inputs` names the operands; a trailing `*name` makes the op variadic and a name
    ending in `?` is optional (None allowed). `attrs` maps attribute names to defaults
    (`REQUIRED` for none). `reference(values, attrs, out_shape)` computes the result with
    every symbolic attribute already evaluated and the concrete output shape given.
    """

    name: str
    inputs: tuple[str, ...]
    infer: InferFn
    reference: ReferenceFn
    doc: str
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].startswith("*")

    def check_arity(self, count: int) -> None:
        if self.variadic:
            if count < len(self.inputs) - 1:
                raise IRError(f"op {self.name} takes at least {len(self.inputs) - 1} inputs, got {count}")
        elif count != len(self.inputs):
            raise IRError(f"op {self.name} takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {count}")

    def signature(self) -> str:
        """name(inputs) {attribute=default, ...}, as `llmc inspect --op` prints it."""
        attrs = ", ".join(f"{key}={'required' if default is REQUIRED else default!r}"
                          for key, default in self.attrs.items())
        return f"{self.name}({', '.join(self.inputs)})" + (f" {{{attrs}}}" if attrs else "")

    def optional(self, index: int) -> bool:
        return index < len(self.inputs) and self.inputs[index].endswith("?")

    def complete_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRError(f"op {self.name} has no attribute {', '.join(sorted(unknown))}")
        result = {}
        for key, default in self.attrs.items():
            if key in attrs:
                result[key] = attrs[key]
            elif default is REQUIRED:
                raise IRError(f"op {self.name} needs attribute {key!r}")
            else:
                result[key] = default
        return result


_REGISTRY: dict[str, OpDef] = {}


def define(name: str, inputs: Sequence[str], infer: InferFn, reference: ReferenceFn, doc: str,
           attrs: Mapping[str, Any] | None = None) -> OpDef:
    if name in _REGISTRY:
        raise ValueError(f"op {name} is defined twice")
    opdef = OpDef(name, tuple(inputs), infer, reference, doc, dict(attrs or {}))
    _REGISTRY[name] = opdef
    return opdef


def get(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise IRError(f"unknown IR op {name!r}") from None


def all_ops() -> dict[str, OpDef]:
    return dict(_REGISTRY)


def as_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    from ..types import numpy_dtype

    return np.asarray(array).astype(numpy_dtype(dtype), copy=False)
