"""The tokenizer a package carries: where to take it from (a folder, a tokenizer.json, or the
model's own checkpoint), and its tokenizer.json and special tokens written for the runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmc.ir import LlmcError

from .checkpoint import ModelSource, quiet_transformers, resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_tokenizer(spec: str) -> ModelSource:
    """Where to take a tokenizer from: a folder holding tokenizer files, a tokenizer.json, or a model."""
    path = Path(spec).expanduser()
    if path.is_file() and path.name == "tokenizer.json":
        return ModelSource("hf", path.parent, path.parent.name)
    if path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES):
        return ModelSource("hf", path, path.name)
    return resolve_model(spec)


def has_tokenizer(source: ModelSource) -> bool:
    return source.kind == "gguf" or any((source.folder / name).is_file() for name in TOKENIZER_FILES)


def save_tokenizer(source: ModelSource, destination: Path) -> dict[str, Any]:
    """Write tokenizer.json of `source` into `destination`; return what the runtime needs
    (special tokens, chat template)."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.path.name} if source.kind == "gguf" else {}
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(source.folder), **kwargs)
    except Exception as error:  # transformers raises many types for unusable tokenizers
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LlmcError(f"could not load the tokenizer of {source.path}: {message}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise LlmcError(f"the tokenizer of {source.path} has no tokenizer.json form, which llmc's runtime needs")
    destination.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(destination / "tokenizer.json"))
    return tokenizer_info(tokenizer)


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """Special tokens and the chat template, as the package metadata records them."""
    eos = tokenizer.eos_token_id
    return {
        "file": "tokenizer.json",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_ids": [eos] if isinstance(eos, int) else list(eos or []),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }
