"""A virtual environment holding llmc's runtime alone: the base install (`pip install llmc`),
without the `compiler` extra, as an app that only runs compiled packages would have it.

The environment gets no pip of its own (an app ships no installer; this interpreter's pip
installs into it). tests/test_runtime_only.py runs packages in it, and benchmarks/startup.py
reports its size on disk.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


# Run in the new environment: import what `llmc run` and `llmc serve` import (uvicorn's server modules too,
# which it loads when it starts), then byte-compile every package that brought in.
COMPILE_WHAT_RUNS = """
import compileall, importlib, sys, sysconfig
from pathlib import Path
for name in ("llmc.cli", "llmc.runtime.engine", "llmc.runtime.server", "rich.console", "rich.markup", "uvicorn.main",
             "uvicorn.loops.auto", "uvicorn.protocols.http.auto", "uvicorn.protocols.websockets.auto",
             "uvicorn.lifespan.on"):
    importlib.import_module(name)
site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
tops = set()
for module in list(sys.modules.values()):
    path = Path(getattr(module, "__file__", None) or "/").resolve()
    if path.is_relative_to(site_packages) and path != site_packages:
        tops.add(site_packages / path.relative_to(site_packages).parts[0])
compiled = [compileall.compile_dir(str(top), quiet=1) if top.is_dir() else compileall.compile_file(str(top), quiet=1)
            for top in sorted(tops)]
sys.exit(0 if all(compiled) else 1)
"""


def build_runtime_env(path: Path) -> Path:
    """Create the environment at `path` (if it is not there yet); returns its python. pip installs without
    byte-compiling, and then the packages that `llmc run` and `llmc serve` import are compiled: the bytecode of
    modules that never run (pygments' lexers, which `rich` requires; `huggingface_hub`, which `tokenizers`
    requires) would be a quarter of the environment."""
    python = path / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
        subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile",
                        "--disable-pip-version-check", str(REPOSITORY)], check=True)
        subprocess.run([str(python), "-I", "-c", COMPILE_WHAT_RUNS], check=True)  # -I: not this checkout's llmc
    return python


def size_on_disk_mib(path: Path) -> float:
    """What the environment's files take on disk (allocated blocks, as `du` counts them), in MiB."""
    return sum(file.lstat().st_blocks * 512 for file in path.rglob("*") if not file.is_symlink()) / 2**20


if __name__ == "__main__":
    env = Path(sys.argv[1])
    build_runtime_env(env)
    print(f"{env}: {size_on_disk_mib(env):.1f} MiB")
