"""`llmc compile --dump-ir DIR`: the IR after each step of a compile, one numbered file per step.

The imported module, the module after each llmc pass (passes/pipeline.py) and, per target, the Relax
module that codegen lowers it to are written in the order they are made, so what a pass did is the
difference between two neighbouring files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmc.ir import Module, print_module


class IRDump:
    """Writes each step's IR into `directory` (created if missing); with no directory, writes nothing."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        self.steps = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def module(self, step: str, module: Module) -> None:
        self._write(step, "txt", print_module(module))

    def relax(self, target: str, irmodule: Any) -> None:
        """The Relax module lowered for `target`, as TVMScript."""
        self._write(f"relax for {target}", "py", irmodule.script())

    def _write(self, step: str, suffix: str, text: str) -> None:
        if self.directory is None:
            return
        self.steps += 1
        slug = re.sub(r"[^a-z0-9]+", "-", step.lower()).strip("-")
        (self.directory / f"{self.steps:02d}-{slug}.{suffix}").write_text(text)
