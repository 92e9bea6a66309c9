"""Export a causal LM (`input_ids` -> logits) with `torch.export`, sequence length symbolic.

Hugging Face models are wrapped so the exported graph takes only `input_ids` of shape
(1, seq) and returns the logits of every position, with no KV cache in the graph:
llmc's own KV-cache lowering adds one later.
"""

from __future__ import annotations

import warnings

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


def export_causal_lm(model: torch.nn.Module, sample_length: int = 5) -> ExportedProgram:
    wrapped = CausalLMWrapper(model) if hasattr(model, "config") else model
    wrapped.eval()
    ids = torch.arange(1, sample_length + 1, dtype=torch.int64).reshape(1, -1)
    seq = Dim("seq", min=1, max=MAX_EXPORT_LENGTH)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(wrapped, (ids,), dynamic_shapes=({1: seq},), strict=False)
    except Exception as error:  # torch raises many types here; the user needs the first line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LlmcError(f"torch.export could not export the model ({type(error).__name__}): {first}") from None


def import_torch_model(model: torch.nn.Module) -> Module:
    """A causal LM as an llmc module with one function, `forward(input_ids) -> logits`."""
    return import_exported_program(export_causal_lm(model))
