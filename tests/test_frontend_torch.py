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


class OnHidden(torch.nn.Module):
    """Token embeddings (1, seq, 8), then `fn` of them: a harness for one converter at a time."""

    def __init__(self, fn):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.weight = torch.nn.Parameter(torch.rand(8) + 0.5)
        self.fn = fn

    def forward(self, input_ids):
        return self.fn(self, self.embed(input_ids) * 3)


def _in_place(m, h):
    scaled = h * 1.5
    scaled.mul_(2).add_(m.weight).div_(3)
    return scaled - h


CONVERTERS = {
    "square": lambda m, h: torch.square(h),
    "expm1": lambda m, h: torch.expm1(h),
    "log1p": lambda m, h: torch.log1p(h.abs()),
    "softplus": lambda m, h: torch.nn.functional.softplus(h * 10, beta=0.5, threshold=5),
    "min.other and max.other": lambda m, h: torch.min(h, m.weight) + torch.max(h, -m.weight),
    "floor": lambda m, h: torch.floor(h),
    "logsumexp": lambda m, h: torch.logsumexp(h * 40, dim=-1, keepdim=True) + torch.logsumexp(h, dim=-1)[..., None],
    "rms_norm": lambda m, h: torch.nn.functional.rms_norm(h, (8,), m.weight, eps=1e-6),
    "baddbmm": lambda m, h: torch.baddbmm(h, h, (torch.ones(8, 8) * m.weight)[None], beta=0.5, alpha=2.0),
    "view_as": lambda m, h: h.reshape(-1).view_as(h),
    "index_select": lambda m, h: h.index_select(-1, torch.tensor([3, 0, 3])),
    "index after whole slices, from the end": lambda m, h: h[..., [-2, 0]] + h[:, :, [5]],
    "detach_": lambda m, h: (h * 2).detach_(),
    "repeat": lambda m, h: h.repeat(2, 1, 3),
    "repeat_interleave": lambda m, h: h.repeat_interleave(2, dim=-1),
    "true division of integers": lambda m, h: h + torch.arange(h.shape[1])[None, :, None] / 3,
    "in-place arithmetic": _in_place,
    "topk": lambda m, h: torch.topk(h, 3, dim=-1).values.sum(-1, keepdim=True) + torch.topk(h, 1, dim=1).indices,
    "gather": lambda m, h: h.gather(-1, torch.topk(h, 2).indices),
    "max.dim and min.dim": lambda m, h: (h.max(-1).values + h.max(-1).indices)[..., None] + h.min(1, True).values
    + h.min(dim=1, keepdim=True).indices,
    "max.default and min.default": lambda m, h: h - h.max() + h.min(),
    "scatter_ of a value": lambda m, h: torch.zeros_like(h).scatter_(-1, torch.topk(h, 2).indices, 1.5) * h,
    "clamp.Tensor": lambda m, h: torch.clamp(h, min=-m.weight, max=m.weight),
    "unbind": lambda m, h: (h.unbind(2)[0] * 2 + h.unbind(dim=-1)[3])[..., None] + h.unbind(0)[0],
    "a computed tensor's only view changed in place": lambda m, h: (h * 2).squeeze(0).add_(m.weight),
}


@pytest.mark.parametrize("name", CONVERTERS)
def test_converter_computes_what_pytorch_computes(name):
    model = OnHidden(CONVERTERS[name])
    module = import_torch_model(model)
    for length in (1, 5):
        ids = np.random.default_rng(length).integers(0, 16, (1, length))
        (result,) = run(module, "forward", {"input_ids": ids})
        with torch.no_grad():
            expected = model(torch.tensor(ids)).numpy()
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_changing_a_view_in_place_is_refused():
    """An in-place op on a slice also changes the tensor it views, which the importer does not follow."""
    def zero_first_token(m, h):
        copy = h * 1
        copy[:, :1].mul_(0)
        return copy

    with pytest.raises(UnsupportedOpsError, match="in place"):
        import_torch_model(OnHidden(zero_first_token))
