"""Per-device knowledge: each module here defines one `Target` (CPU, ...)."""

from . import cpu  # noqa: F401  (registration)
from .base import Kernel, Target, get_target, target_names

__all__ = ["Kernel", "Target", "get_target", "target_names"]
