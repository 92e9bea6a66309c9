"""Write a package directory: weights, graph, one library per target, then the metadata.

The metadata file is written last, so a compile that fails half-way never leaves a
directory that looks like a usable package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from safetensors.numpy import save_file

from llmc.ir import IR_VERSION, Module, module_to_json
from llmc.runtime.package import GRAPH_FILE, METADATA_FILE, PACKAGE_FORMAT, WEIGHTS_FILE, file_sha256
from llmc.targets import Target

from .build import build_library
from .lower import PAGE_SIZE, weight_order


def write_package(module: Module, targets: Sequence[Target], directory: Path, model_info: dict[str, Any],
                  tokenizer_info: dict[str, Any] | None,
                  on_target: Callable[[Target], None] = lambda target: None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / METADATA_FILE).unlink(missing_ok=True)
    order = weight_order(module)
    save_file({name: np.ascontiguousarray(module.weights[name]) for name in order}, str(directory / WEIGHTS_FILE))
    (directory / GRAPH_FILE).write_text(module_to_json(module))
    built = {}
    for target in targets:
        on_target(target)
        built[target.name] = build_library(module, target, directory)
    metadata = {
        "package_format": PACKAGE_FORMAT,
        "llmc_ir_version": IR_VERSION,
        "model": model_info,
        "functions": sorted(module.functions),
        "kv_cache": {**module.metadata["kv_cache"], "page_size": PAGE_SIZE} if module.metadata.get("kv_cache") else None,
        "quantization": module.metadata.get("quantization", {"layers": "f32", "head": "f32"}),
        "targets": built,
        "weights": {"file": WEIGHTS_FILE, "sha256": file_sha256(directory / WEIGHTS_FILE), "order": order},
        "tokenizer": tokenizer_info,
    }
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
    return directory
