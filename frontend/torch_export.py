"""Export a causal LM (`input_ids` -> logits) with `torch.export`, sequence length symbolic.

Hugging Face models are wrapped so the exported graph takes only `input_ids` of shape
(1, seq) and returns the logits of every position, with no KV cache in the graph:
llmc's own KV-cache lowering adds one later.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch.export import Dim, ExportedProgram

from llmc.ir import LlmcError, Module

from .torch_importer import import_exported_program

MAX_EXPORT_LENGTH = 1 << 20


class CausalLMWrapper(torch.nn.Module):
    """input_ids -> logits, without a cache, for a Hugging Face `*ForCausalLM`."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, use_cache=False).logits


def export_causal_lm(model: torch.nn.Module, max_length: int = MAX_EXPORT_LENGTH,
                     sample_length: int = 5) -> ExportedProgram:
    """The model's graph for any sequence length below `max_length`. Models that size tensors from their position
    limit (a position table sliced to the sequence, ALiBi biases) only trace for lengths up to it, and some
    specialise at exactly that length, hence the strict bound. After KV-cache lowering the sequence axis counts one
    step's tokens, so the bound only steers which branch the trace takes, not how long a step may be."""
    wrapped = CausalLMWrapper(model) if hasattr(model, "config") else model
    wrapped.eval()
    ids = torch.arange(1, sample_length + 1, dtype=torch.int64).reshape(1, -1)
    seq = Dim("seq", min=1, max=max(max_length - 1, sample_length + 1))
    try:
        with torch.no_grad(), warnings.catch_warnings(), _traceable_experts(model):
            warnings.simplefilter("ignore")
            return torch.export.export(wrapped, (ids,), dynamic_shapes=({1: seq},), strict=False)
    except Exception as error:  # torch raises many types here; the user needs the first line
        raise LlmcError(f"torch.export could not export the model ({type(error).__name__}): "
                        f"{_reason(error)}") from None


@contextlib.contextmanager
def _traceable_experts(model: torch.nn.Module) -> Iterator[None]:
    """Mixture-of-experts layers in transformers dispatch to an experts implementation. The default loops over the
    experts that some token chose (control flow on tensor values), where "batched_mm" gathers each token's chosen
    experts' weights by index and multiplies them in one batched matmul: a graph with no data-dependent shapes,
    whose decode step reads only the chosen experts' weights. The model gets its own choice back afterwards."""
    can_set = getattr(model, "_can_set_experts_implementation", None)
    if can_set is None or not can_set():
        yield
        return
    chosen = model.config._experts_implementation
    model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(chosen)


def _reason(error: Exception) -> str:
    """The error's first line; for a violated shape constraint, the first reason torch gives instead (the guard on
    the sequence length that the model's code made), to its first sentence; for control flow on tensor values,
    what that means."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    if not lines:
        return type(error).__name__
    if type(error).__name__ == "GuardOnDataDependentSymNode":
        return ("the model's code branches on the values in its tensors (as dynamic rotary scaling does on the "
                f"largest position), which an exported graph cannot: {lines[0]}")
    details = [line[2:] for line in lines[1:] if line.startswith("- ")]
    if not details:
        return lines[0]
    return "the sequence length cannot stay symbolic: " + details[0].split(". ")[0]


def import_torch_model(model: torch.nn.Module, max_length: int = MAX_EXPORT_LENGTH) -> Module:
    """A causal LM as an llmc module with one function, `forward(input_ids) -> logits`, for sequences shorter than
    `max_length`."""
    module = import_exported_program(export_causal_lm(model, max_length))
    module.metadata["context_length"] = max_length
    return module
