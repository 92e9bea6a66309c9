"""One compile for several devices: CUDA cubins for each architecture (compiled here with nvcc,
run only where a GPU is lent), Metal kernels that pass a syntax check (emitted here, untested on
Apple hardware), one package with one weights file, and clear refusals for absent devices."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llmc
from llmc.ir import LlmcError
from llmc.targets.cuda import ARCHITECTURES
from llmc.targets.metal import check_msl
from tiny_models import GEMMA2_MODEL, build_tiny

MODEL = "llama_gqa_untied"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not installed")


@pytest.fixture(scope="module")
def multi_package(tmp_path_factory):
    from llmc.compiler import compile_model

    targets = ["cpu", "metal"] + (["cuda"] if shutil.which("nvcc") else [])
    return Path(compile_model(build_tiny(MODEL), tmp_path_factory.mktemp("multi") / "pkg", targets=targets))


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia

        candidates = [Path(p) / "cu13" / "bin" / "cuobjdump" for p in nvidia.__path__]
    except ImportError:
        return None
    return next((str(c) for c in candidates if c.is_file()), None)


def test_one_package_holds_one_weights_file_and_a_library_per_target(multi_package):
    meta = json.loads((multi_package / "llmc.json").read_text())
    assert set(meta["targets"]) >= {"cpu", "metal"}
    assert len(list(multi_package.glob("weights.bin"))) == 1
    model = build_tiny(MODEL)
    ids = np.arange(1, 12)
    with torch.no_grad():
        expected = model(torch.tensor(ids[None])).logits.numpy()[0]
    logits = llmc.load(multi_package, device="cpu").forward(ids)
    assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-4


@needs_nvcc
def test_cuda_library_embeds_cubins_for_each_architecture_and_ptx(multi_package):
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump is not installed (pip install nvidia-cuda-cuobjdump)")
    fatbin = multi_package / "lib-cuda.fatbin"
    elves = subprocess.run([cuobjdump, "--list-elf", str(fatbin)], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", str(fatbin)], capture_output=True, text=True, check=True).stdout
    for arch in ARCHITECTURES:
        assert f".{arch}.cubin" in elves
    assert f".{ARCHITECTURES[-1]}.ptx" in ptx
    assert b"__global__" not in (multi_package / "lib-cuda.so").read_bytes()  # compiled, not CUDA source


@needs_nvcc
def test_cuda_device_needs_a_gpu(multi_package):
    import tvm

    from llmc.targets.cuda_toolchain import ensure_cuda_plugin

    ensure_cuda_plugin()
    if tvm.cuda(0).exist:
        pytest.skip("a CUDA GPU is present; tests/test_targets.py checks the refusal only without one")
    with pytest.raises(llmc.LlmcError, match="no CUDA device"):
        llmc.load(multi_package, device="cuda")


@needs_nvcc
def test_cuda_package_generates_the_cpu_tokens_on_a_gpu(multi_package):
    import tvm

    from llmc.runtime.sampling import SamplingParams
    from llmc.targets.cuda_toolchain import ensure_cuda_plugin

    ensure_cuda_plugin()
    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU on this machine: the cuda package is compiled and checked here, run only on a GPU")
    cpu, cuda = llmc.load(multi_package, device="cpu"), llmc.load(multi_package, device="cuda")
    ids = list(range(3, 14))
    assert np.abs(cuda.forward(ids) - cpu.forward(ids)).max() / np.abs(cpu.forward(ids)).max() < 1e-4
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    assert cuda.generate(ids, params).output_ids == cpu.generate(ids, params).output_ids


def test_every_metal_kernel_is_present_and_passes_the_syntax_check(multi_package):
    kernels = json.loads((multi_package / "lib-metal.kernels.json").read_text())
    assert len(kernels) > 20
    for name, source in kernels.items():
        assert f"kernel void {name}(" in source
        check_msl(source)
    assert (multi_package / "lib-metal.tar").stat().st_size > 0


def test_metal_device_is_refused_here(multi_package):
    with pytest.raises(llmc.LlmcError, match="macOS"):
        llmc.load(multi_package, device="metal")


@pytest.mark.parametrize("target", ["cuda", "metal"])
def test_soft_capped_and_sliding_attention_are_refused_at_compile_time_where_the_kernels_are_tvms(target, tmp_path):
    """CUDA and Metal attend with TVM's paged-KV-cache kernels, which neither soft-cap scores nor slide a window
    per layer (Gemma 2 does both)."""
    from llmc.compiler import compile_model

    with pytest.raises(LlmcError, match=f"target {target} cannot run this model's attention, which soft-caps its "
                                        "scores at 1 .* and slides a window of 8 tokens in some layers"):
        compile_model(build_tiny(GEMMA2_MODEL), tmp_path / "pkg", targets=[target])


def test_a_device_the_package_was_not_built_for_is_named(tiny_package):
    with pytest.raises(llmc.LlmcError, match="was compiled for cpu"):
        llmc.load(tiny_package(MODEL), device="metal")


def test_cli_refuses_an_absent_device_cleanly(multi_package):
    result = subprocess.run([sys.executable, "-m", "llmc.cli", "run", str(multi_package), "hi", "--device", "metal"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "macOS" in result.stderr
