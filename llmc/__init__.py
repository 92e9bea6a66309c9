"""llmc: an ahead-of-time compiler for decoder-only LLMs.

`llmc.compile(model, output, targets)` turns a model (built-in name, GGUF file, Hugging
Face folder or PyTorch module) into a package directory; `llmc.load(package)` loads
one and returns an engine with `forward`, `generate`, `stream` and `chat`, which take
`SamplingParams` (`speculation=Speculation()` decodes with prompt-lookup drafts). Loading
and running need only the runtime install; compiling needs the `compiler` extra.
"""

from llmc.errors import LlmcError
from llmc.runtime.sampling import SamplingParams


def compile(model, output, targets=("cpu",), quantization: str = "auto"):  # noqa: A001  (the public verb)
    from llmc.requirements import require_compiler

    require_compiler("llmc.compile")
    from llmc.compiler import compile_model
    from llmc.passes.pipeline import PassOptions

    return compile_model(model, output, targets, PassOptions(quantization=quantization))


def load(path, device: str = "cpu", cache=None, speculation=None):
    from llmc.runtime.engine import load as load_engine

    return load_engine(path, device, cache, speculation)


__all__ = ["LlmcError", "SamplingParams", "compile", "load"]
