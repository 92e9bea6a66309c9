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


@dataclass(frozen=True)
class PassOptions:
    """What the user asked for at compile time: the weight format of the layers (auto: the
    checkpoint's own; or f32, f16, q8, q4), of the output head (by default the layers' choice,
    but q8 when the layers are q8 or q4, as llama.cpp does), of the KV cache (ir/kv_storage.py),
    and what to prune (passes/pruning_options.py)."""

    quantization: str = "auto"
    head_quantization: str | None = None
    kv_cache: str = "f32"
    prune: Pruning = Pruning()

    def __post_init__(self) -> None:
        for value in (self.quantization, self.head_quantization):
            if value is not None and value not in FORMATS:
                raise LlmcError(f"unknown weight format {value!r}; llmc knows {', '.join(FORMATS)}")
        kv_storage(self.kv_cache)

    @property
    def head(self) -> str:
        if self.head_quantization is not None:
            return self.head_quantization
        return self.quantization if self.quantization in ("auto", "f32", "f16") else "q8"


def passes(options: PassOptions, sources: Mapping[str, SourceWeight] | None = None,
           importance: Importance | None = None) -> list[tuple[str, Callable[[Module], Module]]]:
    """The passes, in order. `sources` holds the weights a checkpoint stores quantized (GGUF blocks),
    which `auto` keeps as they are; `importance`, measured on a calibration text, guides pruning."""
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
                 importance: Importance | None = None) -> Module:
    """The passes run in order; `on_pass` hears each name before it runs, `after_pass` gets the verified result."""
    for name, run_pass in passes(options, sources, importance):
        on_pass(name)
        module = run_pass(module)
        verify_module(module)
        after_pass(name, module)
    return module
