"""The order of llmc's passes: the one place that says what runs, in what order, for which options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from llmc.ir import LlmcError, Module, verify_module
from llmc.ir.kv_storage import kv_storage

from .concat_linears import concat_linears
from .fuse_expert_linear import fuse_expert_linear
from .fold_transposes import fold_transposes
from .fuse_residual import fuse_residual
from .fuse_rms_norm import fuse_rms_norm
from .kv_cache_lowering import lower_kv_cache
from .prune_heads import prune_heads
from .prune_layers import prune_layers
from .prune_mlp import prune_mlp
from .pruning_importance import Importance
from .pruning_options import Pruning, PruningError
from .quantize import FORMATS, SourceWeight, quantize_module
from .shard import shard_module


@dataclass(frozen=True)
class PassOptions:
    """What the user asked for at compile time: the weight format of the layers (auto: the
    checkpoint's own; or f32, f16, q8, q4), of the output head (by default the layers' choice,
    but q8 when the layers are q8 or q4, as llama.cpp does), of the KV cache (ir/kv_storage.py),
    what to prune (passes/pruning_options.py), and over how many devices to shard the model
    (passes/shard.py)."""

    quantization: str = "auto"
    head_quantization: str | None = None
    kv_cache: str = "f32"
    prune: Pruning = Pruning()
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            raise LlmcError(f"--tensor-parallel must be a count of at least 1, got {self.tensor_parallel!r}")
        for value in (self.quantization, self.head_quantization):
            if value is not None and value not in FORMATS:
                raise LlmcError(f"unknown weight format {value!r}; llmc knows {', '.join(FORMATS)}")
        kv_storage(self.kv_cache)

    @property
    def head(self) -> str:
        if self.head_quantization is not None:
            return self.head_quantization
        return self.quantization if self.quantization in ("auto", "f32", "f16") else "q8"


Step = Callable[[Module], "Module | list[Module]"]


def passes(options: PassOptions, sources: Mapping[str, SourceWeight] | None = None,
           importance: Importance | None = None) -> list[tuple[str, Step]]:
    """The passes, in order. `sources` holds the weights a checkpoint stores quantized (GGUF blocks),
    which `auto` keeps as they are; `importance`, measured on a calibration text, guides pruning.
    Sharding turns one module into several; the passes after it run on each shard."""
    prune = options.prune

    def measured() -> Importance:
        if importance is None:
            raise PruningError("pruning needs the importance of layers, heads and channels measured on a "
                               "calibration text (passes/pruning_importance.py)")
        return importance

    steps = []
    if prune.layers.value:
        steps.append((f"remove decoder layers ({prune.layers})",
                      lambda module: prune_layers(module, measured().influence, prune.layers)))
    steps.append((f"lower attention to the paged KV cache ({options.kv_cache})",
                  lambda module: lower_kv_cache(module, options.kv_cache)))
    if prune.heads.value:
        steps.append((f"remove KV groups of heads ({prune.heads} per layer)",
                      lambda module: prune_heads(module, measured(), prune.heads)))
    if prune.mlp.value:
        steps.append((f"remove MLP channels ({prune.mlp} per layer)",
                      lambda module: prune_mlp(module, measured(), prune.mlp)))
    if options.tensor_parallel > 1:
        steps.append((f"split into {options.tensor_parallel} tensor-parallel shards",
                      lambda module: shard_module(module, options.tensor_parallel)))
    steps += [
        ("fold transposes", fold_transposes),
        ("fuse RMSNorm", fuse_rms_norm),
    ]
    if options.quantization != "f32" or options.head != "f32":
        steps.append((f"weight formats ({options.quantization}, head {options.head})",
                      lambda module: quantize_module(module, options.quantization, options.head, sources)))
    steps += [
        ("read the chosen experts' weights in place", fuse_expert_linear),
        ("concatenate matmuls that share an input", concat_linears),
        ("fold residual adds into matmuls", fuse_residual),
    ]
    return steps


def run_pipeline(module: Module, options: PassOptions = PassOptions(),
                 on_pass: Callable[[str], None] = lambda name: None,
                 sources: Mapping[str, SourceWeight] | None = None,
                 after_pass: Callable[[str, Module], None] = lambda name, module: None,
                 importance: Importance | None = None) -> list[Module]:
    """The passes run in order; `on_pass` hears each name before it runs, `after_pass` gets the verified result
    (of the first shard, once sharded). One module comes out, or one per tensor-parallel shard."""
    modules = [module]
    for name, run_pass in passes(options, sources, importance):
        on_pass(name)
        results = [run_pass(m) for m in modules]
        modules = [m for result in results for m in (result if isinstance(result, list) else [result])]
        for result in modules:
            verify_module(result)
        after_pass(name, modules[0])
    return modules
