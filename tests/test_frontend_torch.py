"""torch.export -> llmc IR: the imported graph computes what PyTorch computes, keeps the
sequence length symbolic, and unknown ops are reported all at once with their sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc.frontend.torch_export import import_torch_model
from llmc.frontend.torch_importer import UnsupportedOpsError
from llmc.ir import print_module, run, verify_module
from tiny_models import TINY_MODELS

RTOL = 1e-4


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("name", TINY_MODELS)
def test_interpreter_matches_pytorch(tiny_model, name):
    model = tiny_model(name)
    module = import_torch_model(model)
    verify_module(module)
    for length in (1, 7, 33):
        ids = np.random.default_rng(length).integers(0, model.config.vocab_size, (1, length))
        (logits,) = run(module, "forward", {"input_ids": ids})
        with torch.no_grad():
            expected = model(torch.tensor(ids)).logits.numpy()
        assert logits.shape == expected.shape
        assert relative_error(logits, expected) <= RTOL


def test_sequence_length_stays_symbolic(tiny_model):
    module = import_torch_model(tiny_model("llama_gqa_untied"))
    forward = module.functions["forward"]
    assert str(forward.inputs[0].type) == "i64[1, seq]"
    assert str(forward.outputs[0].type) == "f32[1, seq, 512]"


def test_tied_embeddings_become_one_weight(tiny_model):
    tied = import_torch_model(tiny_model("llama_mha_tied"))
    untied = import_torch_model(tiny_model("llama_mha_untied"))
    assert len(untied.weights) == len(tied.weights) + 1


class TwoUnknownOps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = torch.sort(x, dim=-1).values
        x = torch.flip(x, dims=[-1])
        return torch.sort(x, dim=-1).values


def test_unknown_ops_are_listed_together_with_nodes_and_sources():
    with pytest.raises(UnsupportedOpsError) as caught:
        import_torch_model(TwoUnknownOps())
    message = str(caught.value)
    assert "2 PyTorch op(s)" in message
    assert "aten.sort" in message and "aten.flip" in message
    assert "node sort" in message and "node flip" in message
    assert "test_frontend_torch.py" in message and "torch.flip" in message
    assert "1 more node" in message


def test_printout_names_the_symbolic_input(tiny_model):
    text = print_module(import_torch_model(tiny_model("qwen2_untied")))
    assert "func forward(%input_ids: i64[1, seq])" in text
    assert "attention(" in text
