"""Every IR op, registered on import: elementwise, shape, reduction, linalg, norm, quantized, attention,
collective."""

from . import attention, collective, elementwise, linalg, norm, quantized, reduction, shape  # noqa: F401
from .registry import REQUIRED, OpDef, all_ops, define, get

__all__ = ["REQUIRED", "OpDef", "all_ops", "define", "get"]
