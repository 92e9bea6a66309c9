"""A compiled package runs with llmc's runtime alone. In a fresh virtual environment holding only
the base install (no torch, transformers, sympy, onnx, gguf or TVM compiler package), `llmc run`,
`llmc serve` and the example app under examples/ work on a package compiled here and give the
tokens the full install gives; and no process on those paths imports the compiler, even where
it is installed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import llmc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from runtime_env import build_runtime_env, size_on_disk_mib  # noqa: E402
from server_process import free_port, start_server  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLE_APP = REPOSITORY / "examples" / "answer.py"
COMPILER_PACKAGES = ("torch", "transformers", "sympy", "onnx", "gguf", "safetensors", "tvm")
COMPILER_MODULES = COMPILER_PACKAGES + ("llmc.ir", "llmc.frontend", "llmc.passes", "llmc.codegen", "llmc.targets",
                                        "llmc.compiler")
# Runs the llmc command line (first argument `llmc`) or a script, then says on stderr which of
# COMPILER_MODULES the process imported, and which modules it imported from the environment's packages
# had no bytecode (compiled as they loaded): at exit, or before `os._exit` (`llmc run` ends that way).
PROBE = f"""
import atexit, importlib.util, os, runpy, sys, sysconfig
def report():
    names = {COMPILER_MODULES!r}
    print("imported:", sorted(m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in names)),
          file=sys.stderr, flush=True)
    site = sysconfig.get_paths()["purelib"]
    files = [getattr(m, "__file__", None) or "" for m in list(sys.modules.values())]
    print("uncompiled:", sorted(f for f in files if f.startswith(site) and f.endswith(".py")
                                and not os.path.exists(importlib.util.cache_from_source(f))), file=sys.stderr)
atexit.register(report)
end_process = os._exit
def report_and_end(code):
    report()
    end_process(code)
os._exit = report_and_end
sys.argv.pop(0)
if sys.argv[0] == "llmc":
    runpy.run_module("llmc.cli", run_name="__main__")
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""
NOTHING_IMPORTED = "imported: []"
GREEDY = llmc.SamplingParams(max_tokens=12)


@pytest.fixture(scope="module")
def runtime_python(tmp_path_factory) -> Path:
    return build_runtime_env(tmp_path_factory.mktemp("runtime-env") / "venv")


def probe(python: Path | str, *args: str) -> subprocess.CompletedProcess:
    # Not from the checkout's root, whose llmc/ folder would shadow the installed package.
    return subprocess.run([str(python), "-c", PROBE, *args], capture_output=True, text=True, timeout=300, cwd="/")


def expected_ids(package: str, prompt: str) -> list[int]:
    return llmc.load(package).generate(prompt, GREEDY).output_ids


def test_llmc_run_on_a_package_imports_nothing_of_the_compiler(chat_package):
    """Here torch, transformers and the TVM compiler are installed: `llmc run PKG` still loads none."""
    result = probe(sys.executable, "llmc", "run", chat_package, "the quick brown", "--raw", "-n", "12", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output_ids"] == expected_ids(chat_package, "the quick brown")
    assert NOTHING_IMPORTED in result.stderr


def test_importing_llmc_changes_nothing_in_the_process():
    """No environment variable set and no TVM loaded on `import llmc`: an app that embeds llmc keeps its settings
    until it loads a package."""
    script = ("import os, sys; os.environ.pop('TVM_NUM_THREADS', None); before = dict(os.environ); import llmc; "
              "print(dict(os.environ) == before, [m for m in ('tvm', 'tvm_ffi', 'torch') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.stdout.split() == ["True", "[]"], done.stderr


def test_the_runtime_install_has_no_compiler(runtime_python):
    found = subprocess.run([str(runtime_python), "-c", "import importlib.util, sys; print([n for n in sys.argv[1:] "
                            "if importlib.util.find_spec(n)])", *COMPILER_PACKAGES],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == "[]"
    size = size_on_disk_mib(runtime_python.parent.parent)
    # The full install is about 1.6 GB; benchmarks/startup.py reports this size exactly. llguidance, the grammar
    # engine, is 8 MB of it.
    assert size * 2**20 < 160e6, f"the runtime-only environment takes {size:.0f} MiB"


def test_llmc_run_in_the_runtime_install(runtime_python, chat_package):
    result = probe(runtime_python, "llmc", "run", chat_package, "the quick brown", "--raw", "-n", "12", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output_ids"] == expected_ids(chat_package, "the quick brown")
    assert NOTHING_IMPORTED in result.stderr
    assert "uncompiled: []" in result.stderr, "modules that run were left without bytecode"


def test_the_compiler_commands_say_what_to_install(runtime_python, tmp_path):
    result = probe(runtime_python, "llmc", "compile", "smollm2-135m", "-o", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pip install 'llmc[compiler]'" in " ".join(result.stderr.split())


def test_llmc_serve_in_the_runtime_install(runtime_python, chat_package):
    port = free_port()
    server, url = start_server([str(runtime_python), "-c", PROBE, "llmc", "serve", chat_package, "--port", str(port),
                                "--model-name", "tiny", "--max-batch", "2", "--kv-tokens", "512", "--threads", "1"],
                               port)
    try:
        messages = [{"role": "user", "content": "the lazy dog"}]
        reply = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": messages, "max_tokens": GREEDY.max_tokens, "temperature": 0}).json()
        assert reply["choices"][0]["message"]["content"] == llmc.load(chat_package).chat(messages, GREEDY).text
    finally:
        server.send_signal(signal.SIGINT)
        _, errors = server.communicate(timeout=30)
    assert NOTHING_IMPORTED in errors


def test_the_example_app_in_the_runtime_install(runtime_python, chat_package):
    questions = ["the lazy dog", "many requests"]
    # Bytes, not text: the tiny model's answers hold carriage returns that text mode would translate.
    result = subprocess.run([str(runtime_python), "-c", PROBE, str(EXAMPLE_APP), chat_package, *questions],
                            capture_output=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stderr
    engine = llmc.load(chat_package)
    expected = "".join(f"> {q}\n{engine.generate(q, llmc.SamplingParams(max_tokens=64), chat=True).text}\n"
                       for q in questions)
    assert result.stdout.decode() == expected
    assert NOTHING_IMPORTED in result.stderr.decode()


def test_the_example_app_explains_a_bad_package(runtime_python, tmp_path):
    result = subprocess.run([str(runtime_python), str(EXAMPLE_APP), str(tmp_path), "hello"], capture_output=True,
                            text=True, timeout=60, cwd="/")
    assert result.returncode == 1
    assert "is not an llmc package" in result.stderr and "Traceback" not in result.stderr


def test_the_runtime_install_is_not_the_one_under_test(runtime_python):
    """The environment runs its own copy of llmc, not this checkout through the test's path."""
    location = subprocess.run([str(runtime_python), "-c", "import llmc; print(llmc.__file__)"], capture_output=True,
                              text=True, check=True, cwd="/").stdout.strip()
    assert Path(location).is_relative_to(runtime_python.parent.parent)
