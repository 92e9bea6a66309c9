"""The order of llmc's passes: the one place that says what runs, in what order, for which options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from llmc.ir import LlmcError, Module, verify_module

from .concat_linears import concat_linears
from .fold_transposes import fold_transposes
from .fuse_residual import fuse_residual
from .fuse_rms_norm import fuse_rms_norm
from .kv_cache_lowering import lower_kv_cache
from .quantize import FORMATS, quantize_module


@dataclass(frozen=True)
class PassOptions:
    """What the user asked for at compile time: the weight format of the layers (f32, q8, q4)
    and of the output head (by default q8 when the layers are quantized, as llama.cpp does)."""

    quantization: str = "f32"
    head_quantization: str | None = None

    def __post_init__(self) -> None:
        for value in (self.quantization, self.head_quantization):
            if value is not None and value not in FORMATS:
                raise LlmcError(f"unknown weight format {value!r}; llmc knows {', '.join(FORMATS)}")

    @property
    def head(self) -> str:
        if self.head_quantization is not None:
            return self.head_quantization
        return "f32" if self.quantization == "f32" else "q8"


def passes(options: PassOptions) -> list[tuple[str, Callable[[Module], Module]]]:
    steps = [
        ("lower attention to the paged KV cache", lower_kv_cache),
        ("fold transposes", fold_transposes),
        ("fuse RMSNorm", fuse_rms_norm),
        ("concatenate matmuls that share an input", concat_linears),
        ("fold residual adds into matmuls", fuse_residual),
    ]
    if options.quantization != "f32" or options.head != "f32":
        steps.append((f"quantize weights ({options.quantization}, head {options.head})",
                      lambda module: quantize_module(module, options.quantization, options.head)))
    return steps


def run_pipeline(module: Module, options: PassOptions = PassOptions(),
                 on_pass: Callable[[str], None] = lambda name: None) -> Module:
    for name, run_pass in passes(options):
        on_pass(name)
        module = run_pass(module)
        verify_module(module)
    return module
