"""Where `llmc run MODEL` and `llmc chat MODEL` keep the package they compile on first use.

The cache key covers what decides the package's contents: the resolved model file or
folder (path, size, modification time), the IR version, the target (with the processor a CPU
library is compiled for) and the options. An entry is checked (every file's checksum, and
that this processor runs its library) before it is used and compiled again if it fails;
concurrent first uses of one model take a lock, so one compiles and the others wait.
`LLMC_CACHE_DIR` moves the cache (default: ~/.cache/llmc).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from rich.console import Console

from llmc.frontend.checkpoint import resolve_model
from llmc.ir import IR_VERSION
from llmc.passes.pipeline import PassOptions
from llmc.runtime.package import Package, PackageError, is_package
from llmc.targets.cpu import compile_cpu

from .compiler import compile_with_progress
from .file_lock import exclusive


def cache_root() -> Path:
    return Path(os.environ.get("LLMC_CACHE_DIR", Path.home() / ".cache" / "llmc"))


def _fingerprint(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def package_for(model: str, target: str = "cpu", options: PassOptions = PassOptions()) -> Path:
    """A package directory for `model`: the model itself if it is one, else a cached compile."""
    if is_package(model):
        return Path(model)
    source = resolve_model(model)
    processor = f"|{compile_cpu()}" if target == "cpu" else ""
    key = f"{_fingerprint(source.path)}|ir{IR_VERSION}|{target}{processor}|{options}"
    directory = cache_root() / f"{source.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    with exclusive(directory.with_name(directory.name + ".lock")):
        if is_package(directory):
            try:
                package = Package.open(directory)
                package.verify_all()
                package.library_path(target)
                return directory
            except PackageError as error:
                Console(stderr=True).print(f"the cached package cannot be used ({error}); compiling it again",
                                           markup=False)
        else:
            Console(stderr=True).print(f"compiling {model} for {target} into {directory} (first use only)",
                                          markup=False)
        return compile_with_progress(model, directory, [target], options)
