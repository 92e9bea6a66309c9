"""Write a package directory: weights, graph, one library per target and the TVM runtime
libraries it needs, then the metadata. A tensor-parallel package holds one such package per
shard (`shard-0`, ...) under metadata that lists them.

The layout and the checks belong to the package format (runtime/package.py); this module
fills it in, in a fresh folder (codegen/staged_directory.py moves it into place when complete).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import tvm

from llmc.ir import IR_VERSION, Module, module_to_json
from llmc.runtime.package import (GRAPH_FILE, METADATA_FILE, PACKAGE_FORMAT, WEIGHT_ALIGNMENT, WEIGHTS_FILE,
                                  file_record, sealed_metadata, weights_layout)
from llmc.targets import Target

from .build import build_library
from .lower import PAGE_SIZE, weight_order


def write_weights(path: Path, tensors: list[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
    """`weights.bin` in the format's layout; returns its table."""
    table = weights_layout(tensors)
    with open(path, "wb") as handle:
        for entry, (_, array) in zip(table, tensors):
            handle.write(bytes(entry["offset"] - handle.tell()))
            handle.write(np.ascontiguousarray(array).tobytes())
    return table


def write_package(module: Module, targets: Sequence[Target], directory: Path, model_info: dict[str, Any],
                  tokenizer_info: dict[str, Any] | None,
                  on_target: Callable[[Target], None] = lambda target: None,
                  on_lowered: Callable[[str, Any], None] = lambda target, irmodule: None) -> Path:
    order = weight_order(module)
    table = write_weights(directory / WEIGHTS_FILE, [(name, module.weights[name]) for name in order])
    (directory / GRAPH_FILE).write_text(module_to_json(module))
    built = {}
    files = [WEIGHTS_FILE, GRAPH_FILE]
    for target in targets:
        on_target(target)
        built[target.name] = build_library(module, target, directory, on_lowered)
        files.append(built[target.name]["library"])
        for library in target.runtime_library_files():
            shutil.copyfile(library, directory / library.name)
            files.append(library.name)
    if tokenizer_info is not None:
        files.append(tokenizer_info["file"])
    metadata = {
        "package_format": PACKAGE_FORMAT,
        "llmc_ir_version": IR_VERSION,
        "tvm_version": tvm.__version__,
        "model": model_info,
        "functions": sorted(module.functions),
        "kv_cache": {**module.metadata["kv_cache"], "page_size": PAGE_SIZE} if module.metadata.get("kv_cache") else None,
        "quantization": module.metadata.get("quantization", {"layers": "f32", "head": "f32"}),
        "tensor_parallel": module.metadata.get("tensor_parallel"),
        "targets": built,
        "weights": {"file": WEIGHTS_FILE, "alignment": WEIGHT_ALIGNMENT, "tensors": table},
        "files": {name: file_record(directory / name) for name in dict.fromkeys(files)},
        "tokenizer": tokenizer_info,
    }
    (directory / METADATA_FILE).write_text(sealed_metadata(metadata))
    return directory


def write_sharded_package(modules: Sequence[Module], targets: Sequence[Target], directory: Path,
                          model_info: dict[str, Any], tokenizer_info: dict[str, Any] | None,
                          on_target: Callable[[Target], None] = lambda target: None,
                          on_lowered: Callable[[str, Any], None] = lambda target, irmodule: None) -> Path:
    """One package per tensor-parallel shard, each with its weights and libraries, and beside them the
    tokenizer and the metadata that ties them together."""
    shards = [f"shard-{index}" for index in range(len(modules))]
    for module, shard in zip(modules, shards):
        (directory / shard).mkdir()
        write_package(module, targets, directory / shard, model_info, None, on_target, on_lowered)
    files = [f"{shard}/{METADATA_FILE}" for shard in shards] + ([tokenizer_info["file"]] if tokenizer_info else [])
    metadata = {
        "package_format": PACKAGE_FORMAT,
        "llmc_ir_version": IR_VERSION,
        "tvm_version": tvm.__version__,
        "model": model_info,
        "tensor_parallel": {"shards": len(modules), "packages": shards},
        "targets": {},
        "files": {name: file_record(directory / name) for name in files},
        "tokenizer": tokenizer_info,
    }
    (directory / METADATA_FILE).write_text(sealed_metadata(metadata))
    return directory
