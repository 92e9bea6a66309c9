"""Per-device knowledge: each module here defines one `Target` (CPU, CUDA, Metal, Vulkan, ...)."""

from . import cpu, cuda, metal, vulkan  # noqa: F401  (registration)
from .base import Kernel, OwnKVCache, Target, get_target

__all__ = ["Kernel", "OwnKVCache", "Target", "get_target"]
