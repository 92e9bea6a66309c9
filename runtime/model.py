"""A compiled package loaded onto a device: one forward step over a batch of sequences.

`CompiledModel.step` runs the tokens of several sequences at once (chunks of prompt
for some, single tokens for others), appending to the paged KV cache, and returns the
logits of the last token of each sequence, or of its last few (a speculative draft's). Batches whose
sequences all add one token go to the `decode` entry point; the rest to `prefill`. An
executor runs the entry points: TVM's VM for TVM libraries, wgpu for vulkan packages.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llmc.errors import LlmcError

from . import tvm_runtime
from .devices import open_device
from .kv_cache import PagedKVCache
from .kv_pages import KVPages
from .package import CHECK_WEIGHTS, Package, PackageError
from .prefix_cache import PrefixCache
from .webgpu_model import WebGPUExecutor

# The VM's allocator kinds (TVM's runtime/vm/memory_manager.h).
POOLED_ALLOCATOR = 2
MAX_DRAFT_STEP_TOKENS = 17  # the longest step whose cost speculation measures, where the package sets no limit


@dataclass(frozen=True)
class CacheSettings:
    """How big the paged KV cache is: tokens in all sequences together (by default the model's context),
    sequences, prefill chunk; and whether finished sequences stay cached for later prompts that begin
    the same way."""

    max_total_tokens: int | None = None
    max_batch_size: int = 16
    prefill_chunk: int = 512
    prefix_cache: bool = True


class StepCost:
    """What a step costs: a line fitted to the time of recent steps of up to `longest` tokens (recent ones weigh
    more; on a CPU each token of a small step costs about the same, whichever sequence it belongs to), as
    seconds for one token (`decode_s`) and the extra per token beyond it as a fraction of that
    (`extra_per_token`): what checking a speculative draft costs (runtime/speculation.py)."""

    MEMORY = 0.95
    UNMEASURED = 0.5  # a guess between a float model (about 0.15 on a CPU) and an int8-activation one (0.6)

    def __init__(self, longest: int):
        self.longest = longest  # steps of more tokens are prompt chunks, or run other kernels
        self._sums = np.zeros(5)  # weights, x, y, x^2, x.y over recent steps; x: tokens beyond the first

    def record(self, tokens: int, seconds: float) -> None:
        if tokens <= self.longest:
            x = tokens - 1
            self._sums = self.MEMORY * self._sums + np.array([1.0, x, seconds, x * x, x * seconds])

    def _line(self) -> tuple[float, float] | None:
        """(seconds at one token, seconds per extra token), once steps of two sizes have been seen."""
        n, x, y, xx, xy = self._sums
        spread = n * xx - x * x
        if n == 0 or spread <= 1e-9 * n * n:
            return None
        slope = (n * xy - x * y) / spread
        return (y - slope * x) / n, slope

    @property
    def decode_s(self) -> float | None:
        line = self._line()
        if line is not None:
            return line[0]
        n, x, y, _, _ = self._sums
        return y / n if n and x == 0 else None

    @property
    def extra_per_token(self) -> float:
        line = self._line()
        if line is None or line[0] <= 0:
            return self.UNMEASURED
        return max(line[1] / line[0], 0.0)


class ContextOverflow(LlmcError):
    """More tokens than the model's context window."""


def check_fits(prompt_tokens: int, max_tokens: int, limit: int) -> None:
    """Refuse a request whose prompt plus `max_tokens` could exceed `limit` tokens (as vLLM does:
    refused, not cut short at the limit)."""
    if prompt_tokens + max_tokens > limit:
        raise ContextOverflow(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
            "completion). Please reduce the length of the prompt or completion.")


class TVMExecutor:
    """Prefill and decode of a TVM library (cpu, cuda) in TVM's Relax VM, over TVM's paged KV cache."""

    def __init__(self, package: Package, device_name: str, max_batch_size: int, max_total_tokens: int,
                 prefill_chunk: int):
        target = package.target(device_name)
        self.device = open_device(target["device"], package.runtime_libraries(device_name))
        try:
            library = tvm_runtime.load_module(package.library_path(device_name))
            self.vm = library["vm_load_executable"]()
            host = tvm_runtime.device("cpu")
            self.vm["vm_initialization"](self.device.dlpack_device_type(), self.device.index, POOLED_ALLOCATOR,
                                         host.dlpack_device_type(), host.index, POOLED_ALLOCATOR)
        except LlmcError:
            raise
        except Exception as error:  # tvm-ffi raises its own errors for unloadable libraries
            raise LlmcError(f"cannot load the {device_name} library of {package.path}: "
                            f"{str(error).strip().splitlines()[-1]}") from None
        # On the CPU the tensors are the mapped file itself (each keeps its array, and so the map, alive). They
        # are one tvm-ffi Array, made once: a list would be converted on every call. The library checks their
        # shapes and dtypes once, here, rather than on each prefill and decode (targets/weight_checks.py).
        self.params = tvm_runtime.ffi.convert([tvm_runtime.to_device(weight, self.device, dtype)
                                               for weight, dtype in zip(package.weights(), package.weight_dtypes())])
        try:
            self.vm[CHECK_WEIGHTS](*self.params)
        except Exception as error:  # tvm-ffi raises the VM's check failure as its own error type
            raise PackageError(_weight_mismatch(str(error), package, device_name)) from None
        self.cache = PagedKVCache(self.vm, max_batch_size, max_total_tokens, prefill_chunk,
                                  int(package.metadata["kv_cache"]["page_size"]))
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["decode"]

    def _tensor(self, values: Sequence[int] | np.ndarray, shape: tuple[int, ...]):
        return tvm_runtime.to_device(np.asarray(values, dtype=np.int64).reshape(shape), self.device)

    def decode(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        return tvm_runtime.to_numpy(self._decode(self._tensor(tokens, (1, len(tokens))),
                                                 self._tensor(positions, (len(positions),)),
                                                 self.cache.handle, self.params))

    def prefill(self, tokens: Sequence[int], positions: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        return tvm_runtime.to_numpy(self._prefill(self._tensor(tokens, (1, len(tokens))),
                                                  self._tensor(positions, (len(positions),)),
                                                  self._tensor(rows, (len(rows),)), self.cache.handle, self.params))


def _weight_mismatch(message: str, package: Package, device_name: str) -> str:
    """What the VM's failed weight check (`ErrorContext(... loc=param[i] ... annotation=R.Tensor(...))`) means."""
    position = re.search(r"loc=param\[(\d+)\]", message)
    expected = re.search(r"annotation=(R\.Tensor\([^)]*\)[^)]*\))", message)
    if position is None or expected is None:
        return f"the weights of {package.path} do not fit its {device_name} library"
    entry = package.metadata["weights"]["tensors"][int(position.group(1))]
    return (f"weight {entry['name']} of {package.path} is {entry['dtype']} {tuple(entry['shape'])}, but its "
            f"{device_name} library takes {expected.group(1)}")


def default_capacity(cache: dict, context_length: int) -> int:
    """Tokens the KV cache holds by default: as many as the memory of a float32 cache of the model's context holds
    in the package's storage format (a q8 cache holds about 3.8 times the context, for more sequences at once)."""
    f32_bytes = 2 * cache["num_layers"] * cache["num_kv_heads"] * cache["head_dim"] * 4
    return context_length * f32_bytes // cache.get("bytes_per_token", f32_bytes)


# What runs a target's libraries, by the target's `runtime`.
EXECUTORS = {"tvm": TVMExecutor, "wgpu": WebGPUExecutor}


class CompiledModel:
    def __init__(self, package: Package, device: str = "cpu", cache: CacheSettings | None = None):
        package.require_one_device()
        self.package = package
        self.device_name = device
        meta = package.metadata
        self.vocab_size = int(meta["model"]["vocab_size"])
        self.context_length = int(meta["model"]["context_length"])
        settings = cache or CacheSettings()
        executor = EXECUTORS[package.target(device)["executor"]]
        self.executor = executor(package, device, settings.max_batch_size,
                                 settings.max_total_tokens or default_capacity(meta["kv_cache"], self.context_length),
                                 settings.prefill_chunk)
        self.cache: KVPages = self.executor.cache
        self.prefix = PrefixCache(self.cache, settings.prefix_cache)
        # Steps of more tokens switch to kernels that cost much more (the CPU's matrix-matrix ones): speculation
        # keeps decode steps within this when the package says so.
        self._vector_step_tokens: int | None = package.target(device).get("vector_step_tokens")
        self.step_cost = StepCost(self._vector_step_tokens or MAX_DRAFT_STEP_TOKENS)

    def tokens_before_slow_kernels(self, step_tokens: int) -> int:
        """How many tokens a step of `step_tokens` may gain and still run the kernels a decode step runs."""
        if self._vector_step_tokens is None:
            return self.context_length
        return max(self._vector_step_tokens - step_tokens, 0)

    def check_tokens(self, tokens: Sequence[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise LlmcError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    def step(self, seq_ids: Sequence[int], chunks: Sequence[Sequence[int]],
             logit_rows: Sequence[int] | None = None) -> np.ndarray:
        """Append `chunks[i]` to sequence `seq_ids[i]`; the logits of each chunk's last `logit_rows[i]` tokens
        (by default its last token), one row per token in order: (rows, vocab)."""
        counts = [len(c) for c in chunks]
        if min(counts) < 1:
            raise LlmcError("every sequence in a step needs at least one token")
        wanted = logit_rows or [1] * len(counts)
        for seq_id, count in zip(seq_ids, counts):
            if self.cache.lengths[seq_id] + count > self.context_length:
                raise ContextOverflow(f"the sequence would reach {self.cache.lengths[seq_id] + count} tokens, more "
                                      f"than the model's context window of {self.context_length}")
        tokens = [t for c in chunks for t in c]
        self.check_tokens(tokens)
        positions = [p for seq_id, count in zip(seq_ids, counts)
                     for p in range(self.cache.lengths[seq_id], self.cache.lengths[seq_id] + count)]
        self.cache.begin(seq_ids, counts)
        started = time.perf_counter()
        try:
            if all(c == 1 for c in counts):
                logits = self.executor.decode(tokens, positions)
            else:
                ends = np.cumsum(counts)
                rows = np.concatenate([np.arange(end - want, end) for end, want in zip(ends, wanted)])
                logits = self.executor.prefill(tokens, positions, rows)
        finally:
            self.cache.end(seq_ids, counts)
        self.step_cost.record(len(tokens), time.perf_counter() - started)
        return logits

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits after every token of `tokens` (len, vocab), in a sequence of its own."""
        seq_id = self.cache.add_sequence()
        try:
            chunk = self.cache.prefill_chunk
            parts = [self.step([seq_id], [tokens[i:i + chunk]], [len(tokens[i:i + chunk])])
                     for i in range(0, len(tokens), chunk)]
        finally:
            self.cache.remove_sequence(seq_id)
        return np.concatenate(parts)
