"""Shared fixtures: tiny random-weight models built from transformers configs, their
compiled packages (one compile per model per test session), the tiny chat package and the bundled SmolLM2."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import build_chat_package, build_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

torch.set_num_threads(2)
os.environ.setdefault("TVM_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_model():
    """name -> the PyTorch model (built once per session)."""
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            cache[name] = build_tiny(name)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def tiny_package(tiny_model, tmp_path_factory):
    """name -> the directory of that tiny model compiled for the CPU."""
    from llmc.compiler import compile_model

    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = str(compile_model(tiny_model(name), tmp_path_factory.mktemp(name) / "pkg"))
        return cache[name]
    return get


@pytest.fixture(scope="session")
def chat_package(tmp_path_factory) -> str:
    """The tiny chat model (tokenizer, EOS, chat template) compiled for the CPU."""
    return build_chat_package(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="session")
def llmc_cache_dir(tmp_path_factory):
    """A package cache shared by the tests that compile the bundled SmolLM2 (compiled once)."""
    path = tmp_path_factory.mktemp("llmc-cache")
    os.environ["LLMC_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def smollm2_package(llmc_cache_dir):
    """SmolLM2 compiled with float32 weights (as transformers dequantizes the GGUF): the fidelity reference."""
    from llmc.package_cache import package_for
    from llmc.passes.pipeline import PassOptions

    return str(package_for("smollm2-135m", options=PassOptions("f32")))


@pytest.fixture(scope="session")
def smollm2_auto_package(llmc_cache_dir):
    """SmolLM2 as `llmc run smollm2-135m` compiles it: the GGUF's own Q4_1 and Q8_0 weights."""
    from llmc.package_cache import package_for

    return str(package_for("smollm2-135m"))


@pytest.fixture(scope="session")
def gguf_variants(tmp_path_factory):
    """file type (Q4_K_M, Q6_K, ...) -> SmolLM2 re-encoded by llama.cpp's quantizer (written on first use)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python (../shared/wheels, installed by .ci/run) writes the GGUF files in llama.cpp's "
                    "formats")
    import llama_cpp  # noqa: F401  (an installed but broken wheel fails here rather than skipping)
    from gguf_variants import requantized_gguf

    folder = tmp_path_factory.mktemp("gguf-variants")
    return lambda file_type: requantized_gguf(file_type, folder)


@pytest.fixture(scope="session")
def smollm2_torch():
    """SmolLM2 as transformers loads the bundled GGUF (float32), and its tokenizer."""
    from llmc.frontend.checkpoint import load_torch_model, resolve_model

    source = resolve_model("smollm2-135m")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.folder), gguf_file=source.path.name)
    return load_torch_model(source), tokenizer

