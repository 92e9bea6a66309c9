"""The package directory that `llmc compile` writes and the runtime loads: its format and its checks.

A package holds `llmc.json` (metadata: model config, targets with their libraries, device
kinds and TVM runtime libraries, the weights' table, every file's size and checksum,
tokenizer settings, and a checksum of itself), `weights.bin`, one library per target, the TVM runtime libraries
those need, `tokenizer.json` and `graph.json` (the IR, for `llmc inspect`). This module
is the one owner of the format: the compiler's writer uses its constants and layout.

`weights.bin` is the tensors back to back, each at a 64-byte boundary (the table in the
metadata gives dtype, shape and offset), so that the CPU runtime maps the file and hands
each tensor to its kernels in place. Opening a package checks what can be wrong with it
(missing or truncated files, another format); a file's xxHash (XXH3-128, gigabytes per
second) is checked before the file is used, so a flipped byte is refused before any output.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import xxhash

from llmc.errors import LlmcError

from .cpu_features import missing_cpu_features

PACKAGE_FORMAT = 4
# Weight dtypes that numpy lacks, and the numpy dtype that holds their bits.
NUMPY_STORAGE = {"bfloat16": "uint16"}
METADATA_FILE = "llmc.json"
WEIGHTS_FILE = "weights.bin"
GRAPH_FILE = "graph.json"
# The entry point of a VM library that checks the weights' shapes and dtypes; the runtime calls it once, at load,
# and the prefill and decode entry points skip those checks (targets/weight_checks.py).
CHECK_WEIGHTS = "check_weights"
METADATA_DIGEST = "metadata_xxh3_128"
WEIGHT_ALIGNMENT = 64
# madvise(MADV_POPULATE_READ), Linux 5.14: map every page of the file at once, without copying
# (Python's mmap module names it only from 3.12 on).
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class PackageError(LlmcError):
    """A package directory that cannot be used as it is."""


def digest(data: Any) -> str:
    """The checksum packages record: XXH3-128 of a bytes-like object, in hex."""
    return xxhash.xxh3_128(data).hexdigest()


def file_digest(path: Path) -> str:
    """`digest` of a file's contents, read through a map of the file (no copy)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return digest(b"")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
            return digest(mapping)


def file_record(path: Path) -> dict[str, Any]:
    """What the metadata records of each file: its size and checksum."""
    return {"bytes": path.stat().st_size, "xxh3_128": file_digest(path)}


def weights_layout(tensors: Iterable[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
    """The table of `weights.bin` for tensors in this order: each at the next 64-byte boundary."""
    table, offset = [], 0
    for name, array in tensors:
        offset = -(-offset // WEIGHT_ALIGNMENT) * WEIGHT_ALIGNMENT
        table.append({"name": name, "dtype": str(array.dtype), "shape": list(array.shape), "offset": offset,
                      "nbytes": int(array.nbytes)})
        offset += int(array.nbytes)
    return table


def _metadata_digest(metadata: dict[str, Any]) -> str:
    return digest(json.dumps({k: v for k, v in metadata.items() if k != METADATA_DIGEST}, sort_keys=True).encode())


def sealed_metadata(metadata: dict[str, Any]) -> str:
    """The text of `llmc.json` for `metadata`, with the checksum of its own contents inside it."""
    return json.dumps({**metadata, METADATA_DIGEST: _metadata_digest(metadata)}, indent=1)


def is_package(path: str | Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def incomplete_package(path: Path) -> str | None:
    """Why `path` looks like an llmc package that was never finished (its files, no metadata), or None."""
    if not path.is_dir() or is_package(path):
        return None
    found = sorted(p.name for p in path.iterdir() if p.name in (WEIGHTS_FILE, GRAPH_FILE) or p.name.startswith("lib-"))
    if not found:
        return None
    return (f"{path} is an incomplete llmc package: it has {', '.join(found)} but no {METADATA_FILE} (a compile "
            "into it did not finish). Compile the model again.")


class _MappedWeights:
    """`weights.bin` mapped (privately: see `Package.weights`) with its pages in place, and its checksum
    being computed on another thread, since xxHash releases the GIL for the whole file."""

    def __init__(self, path: Path):
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            self.mapping = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_PRIVATE,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE) if size else bytearray()
        if size:
            try:
                self.mapping.madvise(_MADV_POPULATE_READ)
            except OSError:  # kernels before 5.14: the pages are mapped as they are first read
                pass
        self._digest = ""
        self._thread = threading.Thread(target=self._compute_digest, name="weights checksum", daemon=True)
        self._thread.start()

    def _compute_digest(self) -> None:
        self._digest = digest(memoryview(self.mapping))

    def digest(self) -> str:
        self._thread.join()
        return self._digest


@dataclass
class Package:
    path: Path
    metadata: dict[str, Any]
    _mapped_weights: _MappedWeights | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "Package":
        path = Path(path)
        meta_file = path / METADATA_FILE
        if not meta_file.is_file():
            raise PackageError(incomplete_package(path) or f"{path} is not an llmc package: it has no {METADATA_FILE}")
        try:
            metadata = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PackageError(f"{meta_file} is corrupt: {error}") from None
        if not isinstance(metadata, dict) or metadata.get("package_format") != PACKAGE_FORMAT:
            found = metadata.get("package_format") if isinstance(metadata, dict) else None
            raise PackageError(f"{path} has package format {found}; this llmc reads format {PACKAGE_FORMAT}. "
                               "Recompile the model.")
        if metadata.get(METADATA_DIGEST) != _metadata_digest(metadata):
            raise PackageError(f"{meta_file} does not match the checksum written inside it: the file is corrupt or "
                               "was edited. Recompile the model.")
        package = cls(path, metadata)
        for name, record in metadata["files"].items():
            file = path / name
            if not file.is_file():
                raise PackageError(f"{path} is incomplete: {name} is missing")
            if file.stat().st_size != record["bytes"]:
                raise PackageError(f"{file} has {file.stat().st_size} bytes, but the package was built with "
                                   f"{record['bytes']}: the file is truncated or was replaced. Recompile the model.")
        return package

    def require_one_device(self) -> None:
        """Refuse a tensor-parallel package: its shards exchange partial sums over NCCL in a TVM disco session
        of one process per GPU, which this runtime does not start."""
        shards = (self.metadata.get("tensor_parallel") or {}).get("shards", 1)
        if shards > 1:
            raise PackageError(f"{self.path} is a tensor-parallel package of {shards} shards (llmc compile "
                               f"--tensor-parallel {shards}); llmc's runtime runs a model on one device, and running "
                               f"the shards needs {shards} CUDA GPUs in a TVM disco session over NCCL, which it does "
                               "not start yet. Compile without --tensor-parallel to run the model here.")

    @property
    def target_names(self) -> list[str]:
        return list(self.metadata["targets"])

    def target(self, name: str) -> dict[str, Any]:
        """What the metadata says of one target: library, executor, device kind, runtime libraries."""
        if name not in self.metadata["targets"]:
            raise PackageError(f"{self.path} has no library for device {name!r}; it was compiled for "
                               f"{', '.join(self.target_names)}")
        return self.metadata["targets"][name]

    def _check(self, name: str, actual_digest: str) -> None:
        if actual_digest != self.metadata["files"][name]["xxh3_128"]:
            raise PackageError(f"{self.path / name} does not match the checksum recorded when the package was built: "
                               "the file is corrupt or was replaced. Recompile the model.")

    def verified(self, name: str) -> Path:
        """The path of one of the package's files, after checking its contents."""
        path = self.path / name
        self._check(name, file_digest(path))
        return path

    def verify_all(self) -> None:
        """Check every file against its checksum (what loading checks file by file, all at once)."""
        for name in self.metadata["files"]:
            self._check(name, file_digest(self.path / name))

    def library_path(self, target: str) -> Path:
        """The target's library, checked, once this processor is known to run it."""
        description = self.target(target)
        missing = missing_cpu_features(description.get("cpu_features", []))
        if missing:
            raise PackageError(f"{self.path} was compiled for a {description['mcpu']} processor, and its {target} "
                               f"library uses {', '.join(missing)}, which this processor lacks. Compile the "
                               "model on this machine, or for an older processor with LLMC_CPU (for example "
                               "LLMC_CPU=x86-64-v3 llmc compile ...).")
        return self.verified(description["library"])

    def runtime_libraries(self, target: str) -> list[Path]:
        """The TVM runtime libraries a target's library needs, in load order, each checked: the installed
        `tvm` package's own file where it is the same (see tvm_runtime.py), else the package's copy."""
        from .tvm_runtime import installed_library

        paths = []
        for name in self.target(target)["runtime_libraries"]:
            packaged = self.verified(name)
            installed = installed_library(name)
            same = installed is not None and file_digest(installed) == self.metadata["files"][name]["xxh3_128"]
            paths.append(installed if same else packaged)
        return paths

    def map_weights(self) -> None:
        """Map `weights.bin` and begin checking it on another thread (while, say, the tokenizer loads);
        `weights()` waits for the outcome."""
        if self._mapped_weights is None:
            self._mapped_weights = _MappedWeights(self.path / WEIGHTS_FILE)

    def weight_dtypes(self) -> list[str]:
        """Each weight's dtype, in the order of `weights()`."""
        return [entry["dtype"] for entry in self.metadata["weights"]["tensors"]]

    def weights(self) -> Iterator[np.ndarray]:
        """The weights in the order the entry points take them, as arrays over a private map of
        `weights.bin`, checked first: the file's pages stay shared with the page cache unless
        written, which no kernel does, and DLPack (which has no read-only tensors) can take them.
        A bfloat16 weight comes as its bits (uint16): numpy has no bfloat16 of its own."""
        self.map_weights()
        mapped, self._mapped_weights = self._mapped_weights, None  # the arrays keep the map alive, not the package
        self._check(WEIGHTS_FILE, mapped.digest())
        mapping = mapped.mapping
        for entry in self.metadata["weights"]["tensors"]:
            dtype = np.dtype(NUMPY_STORAGE.get(entry["dtype"], entry["dtype"]))
            array = np.frombuffer(mapping, dtype=dtype, count=entry["nbytes"] // dtype.itemsize, offset=entry["offset"])
            yield array.reshape(entry["shape"])
