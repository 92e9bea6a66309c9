"""The wgpu device that vulkan packages run on: the best Vulkan (or, on macOS, Metal) adapter."""

from __future__ import annotations

import functools
from typing import Any

from llmc.errors import LlmcError

BACKENDS = ("Vulkan", "Metal")
ADAPTER_PREFERENCE = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}
# Device limits the kernels may need beyond WebGPU's small defaults; the device gets the adapter's own values.
LIMITS = ("max-buffer-size", "max-storage-buffer-binding-size", "max-storage-buffers-per-shader-stage",
          "max-compute-workgroup-storage-size", "max-compute-invocations-per-workgroup",
          "max-compute-workgroup-size-x", "max-compute-workgroup-size-y", "max-compute-workgroup-size-z",
          "max-compute-workgroups-per-dimension", "min-uniform-buffer-offset-alignment")


@functools.cache
def wgpu_device() -> Any:
    """The wgpu device of this process, with the adapter's own limits."""
    try:
        import wgpu
    except ImportError:
        raise LlmcError("the vulkan device needs the wgpu package: pip install 'llmc[vulkan]' "
                        "(or pip install 'wgpu>=0.32,<0.33')") from None
    adapters = [a for a in wgpu.gpu.enumerate_adapters_sync() if a.info["backend_type"] in BACKENDS]
    if not adapters:
        raise LlmcError("no Vulkan device is available here: install a Vulkan driver (on Debian or Ubuntu, "
                        "`apt-get install mesa-vulkan-drivers` gives a software one) or use --device cpu")
    adapter = min(adapters, key=lambda a: ADAPTER_PREFERENCE.get(a.info["adapter_type"], len(ADAPTER_PREFERENCE)))
    features = [f for f in ("shader-f16",) if f in adapter.features]
    limits = {key: adapter.limits[key] for key in LIMITS if key in adapter.limits}
    return adapter.request_device_sync(required_features=features, required_limits=limits)
