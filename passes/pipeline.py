"""The order of llmc's passes: the one place that says what runs, in what order, for which options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from llmc.ir import Module, verify_module

from .kv_cache_lowering import lower_kv_cache


@dataclass(frozen=True)
class PassOptions:
    """What the user asked for at compile time."""

    quantization: str = "f32"


def passes(options: PassOptions) -> list[tuple[str, Callable[[Module], Module]]]:
    return [
        ("lower attention to the paged KV cache", lower_kv_cache),
    ]


def run_pipeline(module: Module, options: PassOptions = PassOptions(),
                 on_pass: Callable[[str], None] = lambda name: None) -> Module:
    for name, run_pass in passes(options):
        on_pass(name)
        module = run_pass(module)
        verify_module(module)
    return module
