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


def build_runtime_env(path: Path) -> Path:
    """Create the environment at `path` (if it is not there yet); returns its python."""
    python = path / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
        subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                        "--disable-pip-version-check", str(REPOSITORY)], check=True)
    return python


def size_on_disk_mib(path: Path) -> float:
    """What the environment's files take on disk (allocated blocks, as `du` counts them), in MiB."""
    return sum(file.lstat().st_blocks * 512 for file in path.rglob("*") if not file.is_symlink()) / 2**20


if __name__ == "__main__":
    env = Path(sys.argv[1])
    build_runtime_env(env)
    print(f"{env}: {size_on_disk_mib(env):.1f} MiB")
