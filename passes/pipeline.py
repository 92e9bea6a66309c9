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
from .quantize import FORMATS, SourceWeight, quantize_module


@dataclass(frozen=True)
class PassOptions:
    """What the user asked for at compile time: the weight format of the layers (auto: the
    checkpoint's own; or f32, f16, q8, q4), of the output head (by default the layers' choice,
    but q8 when the layers are q8 or q4, as llama.cpp does) and of the KV cache (ir/kv_storage.py)."""

    quantization: str = "auto"
    head_quantization: str | None = None
    kv_cache: str = "f32"

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


def passes(options: PassOptions, sources: Mapping[str, SourceWeight] | None = None
           ) -> list[tuple[str, Callable[[Module], Module]]]:
    """The passes, in order. `sources` holds the weights a checkpoint stores quantized (GGUF blocks),
    which `auto` keeps as they are."""
    steps = [
        (f"lower attention to the paged KV cache ({options.kv_cache})",
         lambda module: lower_kv_cache(module, options.kv_cache)),
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
                 after_pass: Callable[[str, Module], None] = lambda name, module: None) -> Module:
    """The passes run in order; `on_pass` hears each name before it runs, `after_pass` gets the verified result."""
    for name, run_pass in passes(options, sources):
        on_pass(name)
        module = run_pass(module)
        verify_module(module)
        after_pass(name, module)
    return module
