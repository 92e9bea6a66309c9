"""The package directory that `llmc compile` writes and the runtime loads, and its checks.

A package holds `llmc.json` (metadata: model config, IR version, targets and their
libraries, the weights' hash, tokenizer settings, entry points), `weights.safetensors`,
one library per target, `tokenizer.json` and `graph.json` (the IR, for `llmc inspect`).
Opening a package checks what can be wrong with it (missing files, another IR version,
weights that don't match their hash) and says so in one message.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from llmc.ir import IR_VERSION, LlmcError

PACKAGE_FORMAT = 1
METADATA_FILE = "llmc.json"
WEIGHTS_FILE = "weights.safetensors"
GRAPH_FILE = "graph.json"


class PackageError(LlmcError):
    """A package directory that cannot be used as it is."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def is_package(path: str | Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


@dataclass
class Package:
    path: Path
    metadata: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> "Package":
        path = Path(path)
        meta_file = path / METADATA_FILE
        if not meta_file.is_file():
            raise PackageError(f"{path} is not an llmc package: it has no {METADATA_FILE}")
        try:
            metadata = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PackageError(f"{meta_file} is corrupt: {error}") from None
        if metadata.get("package_format") != PACKAGE_FORMAT:
            raise PackageError(f"{path} has package format {metadata.get('package_format')}; "
                               f"this llmc reads format {PACKAGE_FORMAT}. Recompile the model.")
        if metadata.get("llmc_ir_version") != IR_VERSION:
            raise PackageError(f"{path} was built for llmc IR version {metadata.get('llmc_ir_version')}; this llmc "
                               f"uses IR version {IR_VERSION}. Recompile the model with this llmc.")
        for name in [WEIGHTS_FILE] + [t["library"] for t in metadata["targets"].values()]:
            if not (path / name).is_file():
                raise PackageError(f"{path} is incomplete: {name} is missing")
        return cls(path, metadata)

    @property
    def target_names(self) -> list[str]:
        return list(self.metadata["targets"])

    def require_target(self, target: str) -> None:
        if target not in self.metadata["targets"]:
            raise PackageError(f"{self.path} has no library for device {target!r}; it was compiled for "
                               f"{', '.join(self.target_names)}")

    def library_path(self, target: str) -> Path:
        self.require_target(target)
        return self.path / self.metadata["targets"][target]["library"]

    def weights(self) -> Iterator[np.ndarray]:
        """The weights in the order the entry points take them, after checking the file against the hash
        recorded at compile time. They are read one at a time with plain reads rather than through a memory
        map, so that the file's pages never count in the process's memory, and the caller can copy each to
        its device before the next is read."""
        weights_file = self.path / WEIGHTS_FILE
        if file_sha256(weights_file) != self.metadata["weights"]["sha256"]:
            raise PackageError(f"{weights_file} does not match the hash recorded when the package was built: "
                               "the file is corrupt or was replaced. Recompile the model.")
        with open(weights_file, "rb") as handle:
            header, data_start = _safetensors_header(handle, weights_file)
            for name in self.metadata["weights"]["order"]:
                if name not in header:
                    raise PackageError(f"{weights_file} lacks weight {name!r}")
                entry = header[name]
                begin, end = entry["data_offsets"]
                handle.seek(data_start + begin)
                array = np.frombuffer(handle.read(end - begin), dtype=_SAFETENSORS_DTYPES[entry["dtype"]])
                yield array.reshape(entry["shape"])


# The dtypes of safetensors' header that packages hold.
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I32": np.int32,
                       "I64": np.int64}


def _safetensors_header(handle: BinaryIO, path: Path) -> tuple[dict[str, Any], int]:
    """The tensor table of a safetensors file (8-byte little-endian length, then JSON) and where data starts."""
    try:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        if any(entry["dtype"] not in _SAFETENSORS_DTYPES for entry in header.values()):
            raise ValueError("a tensor has a dtype that llmc packages do not use")
    except (struct.error, ValueError, KeyError, TypeError) as error:
        raise PackageError(f"{path} cannot be read as safetensors: {error}") from None
    return header, 8 + length
