"""ONNX -> llmc IR: models exported by torch.onnx (dynamo at its default opset and at opset 23,
and the TorchScript exporter) compute what onnxruntime computes, through the interpreter and
through a compiled package; greedy generation equals the torch path's token for token; bad
files and unsupported models fail with one clear error, also through the CLI."""

from __future__ import annotations

import functools
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

import llmc
from llmc.compiler import compile_model
from llmc.frontend.checkpoint import resolve_model
from llmc.frontend.diagnostics import UnsupportedOpsError
from llmc.frontend.onnx_file import MAX_OPSET
from llmc.frontend.onnx_importer import import_onnx_file
from llmc.frontend.torch_export import CausalLMWrapper
from llmc.ir import LlmcError, run, verify_module
from llmc.runtime.sampling import SamplingParams

RTOL = 1e-4
NEW_TOKENS = 64
MODELS = ["llama_gqa_tied", "qwen2_untied", "mistral_tied"]
EXPORTERS = ["dynamo", "dynamo-opset23", "torchscript"]
# Each model compiled from one exporter's file: compiling all nine would take minutes more.
COMPILED = list(zip(MODELS, EXPORTERS))


class WithAttentionMask(torch.nn.Module):
    """input_ids, attention_mask -> logits: the TorchScript exporter needs the mask as an input."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_onnx(model: torch.nn.Module, path: Path, exporter: str) -> Path:
    """`model` exported to `path` with a dynamic sequence axis; weights in a file beside it."""
    ids = torch.arange(1, 6, dtype=torch.int64).reshape(1, -1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(WithAttentionMask(model).eval(), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                              opset_version=17, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"},
                                            "logits": {1: "seq"}})
        else:
            opset = {"opset_version": 23} if exporter == "dynamo-opset23" else {}
            seq = torch.export.Dim("seq", min=1, max=1 << 20)
            program = torch.onnx.export(CausalLMWrapper(model).eval(), (ids,), dynamo=True, verbose=False,
                                        dynamic_shapes=({1: seq},), **opset)
            program.save(str(path), external_data=True)
    return path


@pytest.fixture(scope="module")
def onnx_file(tiny_model, tmp_path_factory):
    """(name, exporter) -> model.onnx exported into its own folder, with the model's config.json beside it."""
    @functools.cache
    def export(name: str, exporter: str) -> Path:
        folder = tmp_path_factory.mktemp(f"{name}-{exporter}")
        tiny_model(name).config.save_pretrained(folder)
        return export_onnx(tiny_model(name), folder / "model.onnx", exporter)
    return export


@pytest.fixture(scope="module")
def onnx_package(onnx_file, tmp_path_factory):
    """(name, exporter) -> the ONNX file compiled for the CPU."""
    @functools.cache
    def compile_onnx(name: str, exporter: str) -> str:
        return str(compile_model(onnx_file(name, exporter), tmp_path_factory.mktemp(f"{name}-{exporter}") / "pkg"))
    return compile_onnx


def onnxruntime_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids}
    if "attention_mask" in {i.name for i in session.get_inputs()}:
        feeds["attention_mask"] = np.ones_like(ids)
    return session.run(None, feeds)[0]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", MODELS)
def test_interpreter_matches_onnxruntime(onnx_file, name, exporter):
    path = onnx_file(name, exporter)
    module = import_onnx_file(path)
    verify_module(module)
    forward = module.functions["forward"]
    assert [str(n.type) for n in forward.inputs] == ["i64[1, seq]"]
    assert str(forward.outputs[0].type) == "f32[1, seq, 512]"
    for length in (1, 7, 33):
        ids = np.random.default_rng(length).integers(0, 512, (1, length))
        (logits,) = run(module, "forward", {"input_ids": ids})
        assert relative_error(logits, onnxruntime_logits(path, ids)) <= RTOL


@pytest.mark.parametrize("name, exporter", COMPILED)
def test_compiled_logits_match_onnxruntime(onnx_file, onnx_package, name, exporter):
    engine = llmc.load(onnx_package(name, exporter))
    assert engine.context_length == 256  # from the config.json beside the file
    for length in (1, 7, 64):
        ids = np.random.default_rng(length).integers(0, 512, length)
        expected = onnxruntime_logits(onnx_file(name, exporter), ids[None])[0]
        assert relative_error(engine.forward(ids), expected) <= RTOL


@pytest.mark.parametrize("name, exporter", COMPILED)
def test_greedy_generation_is_token_exact_with_the_torch_path(onnx_package, tiny_package, name, exporter):
    prompt = np.random.default_rng(7).integers(0, 512, 9).tolist()
    params = SamplingParams(max_tokens=NEW_TOKENS)
    from_onnx = llmc.load(onnx_package(name, exporter)).generate(prompt, params)
    from_torch = llmc.load(tiny_package(name)).generate(prompt, params)
    assert from_onnx.output_ids == from_torch.output_ids
    assert len(from_onnx.output_ids) == NEW_TOKENS


def test_onnx_files_and_folders_are_recognised(onnx_file, tmp_path):
    path = onnx_file("llama_gqa_tied", "dynamo")
    assert resolve_model(str(path)).kind == "onnx"
    assert resolve_model(str(path.parent)).kind == "onnx"
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(path.read_bytes())
    assert resolve_model(str(renamed)).kind == "onnx"


# ---- files llmc must refuse ------------------------------------------------------------------------

def tiny_graph(nodes: list, opset: int = 17, vocab: int = 16) -> onnx.ModelProto:
    """input_ids -> Gather(embedding) -> `nodes` (from `x` to `h`) -> MatMul -> logits."""
    rng = np.random.default_rng(0)
    weights = [onnx.numpy_helper.from_array(rng.standard_normal((vocab, 8)).astype(np.float32), "embedding"),
               onnx.numpy_helper.from_array(rng.standard_normal((8, vocab)).astype(np.float32), "head")]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embedding", "input_ids"], ["x"], name="embed"), *nodes,
         helper.make_node("MatMul", ["h", "head"], ["logits"], name="head")],
        "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", vocab])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def unsupported_model() -> onnx.ModelProto:
    return tiny_graph([helper.make_node("Hardmax", ["x"], ["a"], name="first_hardmax"),
                       helper.make_node("Round", ["a"], ["b"], name="round"),
                       helper.make_node("Hardmax", ["b"], ["h"], name="second_hardmax")])


def write_bad_file(kind: str, folder: Path, good: Path) -> Path:
    path = folder / "model.onnx"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 3])
    elif kind in ("missing external data", "short external data"):
        model = onnx.load(str(good))
        onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
        weights = folder / "weights.bin"
        if kind == "short external data":
            weights.write_bytes(weights.read_bytes()[:100])
        else:
            weights.unlink()
    elif kind == "unsupported ops":
        onnx.save_model(unsupported_model(), str(path))
    elif kind == "opset too old":
        onnx.save_model(tiny_graph([helper.make_node("Relu", ["x"], ["h"])], opset=13), str(path))
    elif kind == "opset too new":
        onnx.save_model(tiny_graph([helper.make_node("Relu", ["x"], ["h"])], opset=MAX_OPSET + 1), str(path))
    elif kind == "fixed sequence length":
        model = tiny_graph([helper.make_node("Relu", ["x"], ["h"])])
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5
        onnx.save_model(model, str(path))
    return path


BAD_FILES = {
    "truncated": "truncated or corrupt",
    "missing external data": "'weights.bin', which is missing",
    "short external data": "weights.bin is truncated",
    "unsupported ops": "2 ONNX op(s) llmc cannot import yet: Hardmax, Round",
    "opset too old": "uses opset 13; llmc imports ONNX opsets 14 to",
    "opset too new": f"uses opset {MAX_OPSET + 1}; llmc imports ONNX opsets 14 to {MAX_OPSET}",
    "fixed sequence length": "dynamic sequence axis",
}


@pytest.fixture(scope="module")
def small_good_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.onnx"
    onnx.save_model(tiny_graph([helper.make_node("Relu", ["x"], ["h"], name="relu")]), str(path))
    return path


def test_a_small_handwritten_graph_imports(small_good_file):
    module = import_onnx_file(small_good_file)
    ids = np.array([[3, 1, 4, 1, 5]])
    (logits,) = run(module, "forward", {"input_ids": ids})
    assert relative_error(logits, onnxruntime_logits(small_good_file, ids)) <= RTOL


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_give_one_clear_error(kind, tmp_path, onnx_file, small_good_file):
    path = write_bad_file(kind, tmp_path, onnx_file("llama_gqa_tied", "torchscript") if kind == "truncated"
                          else small_good_file)
    with pytest.raises(LlmcError) as caught:
        import_onnx_file(path)
    assert BAD_FILES[kind] in " ".join(str(caught.value).split())


def test_unsupported_ops_are_listed_with_their_nodes(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(unsupported_model(), str(path))
    with pytest.raises(UnsupportedOpsError) as caught:
        import_onnx_file(path)
    message = str(caught.value)
    assert "Hardmax: node first_hardmax, and 1 more node(s)" in message
    assert "Round: node round" in message


@pytest.mark.parametrize("kind", ["truncated", "missing external data", "unsupported ops", "opset too old"])
def test_bad_files_fail_cleanly_in_the_cli(kind, tmp_path, onnx_file, small_good_file):
    path = write_bad_file(kind, tmp_path, onnx_file("llama_gqa_tied", "torchscript") if kind == "truncated"
                          else small_good_file)
    result = subprocess.run([sys.executable, "-m", "llmc.cli", "compile", str(path), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert BAD_FILES[kind] in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "out" / "llmc.json").exists()


# ---- SmolLM2 -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_onnx(smollm2_torch, tmp_path_factory) -> Path:
    """The bundled SmolLM2 exported once. The TorchScript exporter takes ~20 s here; the dynamo
    exporter, whose graphs the tiny models cover, takes over 3 minutes on this model."""
    model, _ = smollm2_torch
    return export_onnx(model, tmp_path_factory.mktemp("smollm2-onnx") / "model.onnx", "torchscript")


@pytest.mark.slow
def test_smollm2_from_onnx_matches_onnxruntime_and_the_torch_path(smollm2_onnx, smollm2_package, tmp_path):
    engine = llmc.load(compile_model(smollm2_onnx, tmp_path / "pkg"))
    for length in (1, 7, 64):
        ids = np.random.default_rng(length).integers(0, 49152, length)
        assert relative_error(engine.forward(ids), onnxruntime_logits(smollm2_onnx, ids[None])[0]) <= RTOL
    prompt = [1, 504, 3575, 282, 4649, 314]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    assert engine.generate(prompt, params).output_ids == llmc.load(smollm2_package).generate(prompt, params).output_ids
