"""Run a vulkan package: the launch plan of `lib-vulkan.json` through wgpu.

A step binds the plan's symbolic dimensions from the shapes of its inputs, gives every
buffer of the plan a GPU buffer (the step's inputs and the KV cache's tensors; weights
uploaded once; temporaries from a pool, handed back once their last reader has run and
kept for later steps), records every kernel launch into one command buffer and reads
back the logits. Kernels are compiled by the driver on first use.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Sequence

import numpy as np

from llmc.errors import LlmcError
from .devices import open_device
from .package import Package, PackageError
from .webgpu_kv_cache import WebGPUKVCache
from .webgpu_plan import PLAN_FORMAT, evaluate

_SCALAR_FORMAT = {"i32": "i", "u32": "I", "f32": "f"}
_POOL_GRANULE = 1 << 16


def _nbytes(shape: Sequence[int], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _padded(size: int, granule: int = 4) -> int:
    return max(granule, -(-size // granule) * granule)


class _Kernel:
    """One WGSL kernel compiled into a compute pipeline, with the layout of its bindings."""

    def __init__(self, device: Any, name: str, entry: dict):
        import wgpu

        self.scalars = "<" + "".join(_SCALAR_FORMAT[t] for t in entry["scalars"]) + "I"  # + packGridDimX
        storage = [{"binding": i, "visibility": wgpu.ShaderStage.COMPUTE,
                    "buffer": {"type": wgpu.BufferBindingType.storage if write
                               else wgpu.BufferBindingType.read_only_storage}}
                   for i, write in enumerate(entry["writes"])]
        uniform = {"binding": len(storage), "visibility": wgpu.ShaderStage.COMPUTE,
                   "buffer": {"type": wgpu.BufferBindingType.uniform}}
        self.layout = device.create_bind_group_layout(entries=storage + [uniform])
        try:
            module = device.create_shader_module(code=entry["wgsl"])
            self.pipeline = device.create_compute_pipeline(
                layout=device.create_pipeline_layout(bind_group_layouts=[self.layout]),
                compute={"module": module, "entry_point": name})
        except Exception as error:  # wgpu reports shader errors as its own exception types
            raise LlmcError(f"the GPU driver rejected kernel {name}: {str(error).strip()[:500]}") from None


class _BufferPool:
    """Temporary buffers, reused within a step once free and kept across steps."""

    def __init__(self, device: Any):
        import wgpu

        self.device = device
        self.usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC
        self.free: list[Any] = []
        self.all: list[Any] = []

    def reset(self) -> None:
        self.free = list(self.all)

    def take(self, size: int) -> Any:
        fitting = [b for b in self.free if b.size >= size]
        if fitting:
            buffer = min(fitting, key=lambda b: b.size)
            self.free.remove(buffer)
            return buffer
        buffer = self.device.create_buffer(size=_padded(size, _POOL_GRANULE if size > _POOL_GRANULE else 256),
                                           usage=self.usage)
        self.all.append(buffer)
        return buffer

    def give_back(self, buffer: Any) -> None:
        self.free.append(buffer)


class _EntryPlan:
    """An entry function's plan, with the last call that uses each buffer (the output's: none)."""

    def __init__(self, plan: dict):
        self.plan = plan
        self.last: dict[int, int] = {}
        for index, call in enumerate(plan["calls"]):
            for value in call["args"]:
                self.last[plan["values"][value]["buffer"]] = index
        self.last[plan["values"][plan["output"]]["buffer"]] = len(plan["calls"])


class WebGPUExecutor:
    """Prefill and decode of a vulkan package, over its own paged KV cache."""

    def __init__(self, package: Package, device_name: str, max_batch_size: int, max_total_tokens: int,
                 prefill_chunk: int):
        import wgpu

        self.wgpu = wgpu
        self.device = open_device(package.target(device_name)["device"])
        library = json.loads(package.library_path(device_name).read_text())
        if library.get("format") != PLAN_FORMAT:
            raise PackageError(f"{package.path}: the vulkan library has plan format {library.get('format')}; this "
                               f"llmc reads format {PLAN_FORMAT}. Recompile the model.")
        if any("enable f16;" in k["wgsl"] for k in library["kernels"].values()) and \
                "shader-f16" not in self.device.features:
            raise LlmcError("this model's vulkan kernels use 16-bit floats, which this GPU's driver does not offer")
        self.kernel_entries: dict[str, dict] = library["kernels"]
        self.functions: dict[str, list[dict]] = library["functions"]
        self.entries = {name: _EntryPlan(plan) for name, plan in library["entries"].items()}
        self.kernels: dict[str, _Kernel] = {}
        meta = package.metadata
        self.weights = [self._upload(weight) for weight in package.weights()]
        self.pool = _BufferPool(self.device)
        self.cache = WebGPUKVCache(self.device, meta["kv_cache"], max_batch_size, max_total_tokens, prefill_chunk)
        self.max_workgroups = self.device.limits["max-compute-workgroups-per-dimension"]
        self.uniform_alignment = self.device.limits["min-uniform-buffer-offset-alignment"]

    def decode(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        return self._run("decode", {"input_ids": np.reshape(tokens, (1, -1)), "positions": np.asarray(positions)})

    def prefill(self, tokens: Sequence[int], positions: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        return self._run("prefill", {"input_ids": np.reshape(tokens, (1, -1)), "positions": np.asarray(positions),
                                     "logit_rows": np.asarray(rows)})

    # -- one step --------------------------------------------------------------------------------------
    def _upload(self, array: np.ndarray) -> Any:
        data = np.ascontiguousarray(array).tobytes()
        return self.device.create_buffer_with_data(data=data + bytes(_padded(len(data)) - len(data)),
                                                   usage=self.wgpu.BufferUsage.STORAGE)

    def _inputs(self, plan: dict, arrays: dict[str, Any]) -> tuple[dict[str, tuple], dict[str, int]]:
        """{input: (buffer, shape)} and the step's dimensions, bound from the inputs' shapes."""
        given = {**arrays, **self.cache.tensors()}
        inputs, names = {}, {}
        for spec in plan["inputs"]:
            value = given[spec["name"]]
            if isinstance(value, np.ndarray):
                value = (self._upload(value.astype(spec["dtype"])), value.shape)
            inputs[spec["name"]] = value
            for dim, size in zip(spec["shape"], value[1]):
                if isinstance(dim, str):
                    names[dim] = int(size)
        return inputs, names

    def _kernel(self, name: str) -> _Kernel:
        if name not in self.kernels:
            self.kernels[name] = _Kernel(self.device, name, self.kernel_entries[name])
        return self.kernels[name]

    def _grid(self, x: int, y: int) -> tuple[int, int, int]:
        """Workgroups as dispatched: beyond the per-dimension limit, x is spread over z (the kernels
        rebuild blockIdx.x as z * gridDim.x + x and skip the blocks past the real count)."""
        if y > self.max_workgroups:
            raise LlmcError(f"a kernel needs {y} workgroups in y, more than this GPU's {self.max_workgroups}")
        layers = max(1, -(-x // self.max_workgroups))
        return -(-x // layers), y, layers

    def _run(self, function: str, arrays: dict[str, Any]) -> np.ndarray:
        plan = self.entries[function].plan
        inputs, names = self._inputs(plan, arrays)
        shapes = [[evaluate(d, names) for d in value["shape"]] for value in plan["values"]]
        buffers = [inputs[spec["input"]][0] if "input" in spec else self.weights[spec["weight"]] if "weight" in spec
                   else None for spec in plan["buffers"]]
        self._submit(*self._record(function, names, shapes, buffers))
        output = plan["values"][plan["output"]]
        shape = shapes[plan["output"]]
        data = self.device.queue.read_buffer(buffers[output["buffer"]], 0, _padded(_nbytes(shape, output["dtype"])))
        return np.frombuffer(data, dtype=output["dtype"], count=int(np.prod(shape))).reshape(shape).copy()

    def _record(self, function: str, names: dict[str, int], shapes: list[list[int]],
                buffers: list[Any]) -> tuple[list, bytearray]:
        """The launches of a step (kernel, bound buffers, uniform offset and size, grid) and their uniforms;
        temporaries come from the pool as calls first write them and go back after their last reader."""
        entry = self.entries[function]
        plan = entry.plan
        self.pool.reset()
        launches, uniforms = [], bytearray()
        for index, call in enumerate(plan["calls"]):
            args = [(value, plan["values"][value]["buffer"]) for value in call["args"]]
            for _, buffer in args:
                if buffers[buffer] is None:
                    buffers[buffer] = self.pool.take(evaluate(plan["buffers"][buffer]["temp"], names))
            dims = [shapes[value] for value, _ in args]
            for launch in self.functions[call["function"]]:
                kernel = self._kernel(launch["kernel"])
                x, y = (evaluate(g, names, dims) for g in launch["grid"])
                data = struct.pack(kernel.scalars, *(evaluate(s, names, dims) for s in launch["scalars"]), x - 1)
                offset = _padded(len(uniforms), self.uniform_alignment) if uniforms else 0
                uniforms += bytes(offset - len(uniforms)) + data
                storage = [(buffers[buffer], _padded(_nbytes(shapes[value], plan["values"][value]["dtype"])))
                           for value, buffer in (args[p] for p in launch["buffers"])]
                launches.append((kernel, storage, offset, len(data), self._grid(x, y)))
            for _, buffer in args:
                if "temp" in plan["buffers"][buffer] and entry.last[buffer] == index:
                    self.pool.give_back(buffers[buffer])
        return launches, uniforms

    def _submit(self, launches: list, uniforms: bytearray) -> None:
        uniform = self.device.create_buffer_with_data(data=bytes(uniforms) + bytes(_padded(len(uniforms), 16)
                                                                                 - len(uniforms)),
                                                      usage=self.wgpu.BufferUsage.UNIFORM)
        encoder = self.device.create_command_encoder()
        compute = encoder.begin_compute_pass()
        for kernel, storage, offset, size, grid in launches:
            entries = [{"binding": i, "resource": {"buffer": buffer, "offset": 0, "size": nbytes}}
                       for i, (buffer, nbytes) in enumerate(storage)]
            entries.append({"binding": len(storage), "resource": {"buffer": uniform, "offset": offset,
                                                                  "size": _padded(size, 16)}})
            compute.set_pipeline(kernel.pipeline)
            compute.set_bind_group(0, self.device.create_bind_group(layout=kernel.layout, entries=entries))
            compute.dispatch_workgroups(*grid)
        compute.end()
        self.device.queue.submit([encoder.finish()])
