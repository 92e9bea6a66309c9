"""Write a package where it cannot hurt: in a new folder beside the target, moved into place whole.

A compile that fails or is killed half-way leaves the package that was there before intact
(and a `.NAME.partial-*` folder, which the next compile into NAME removes). The swap is one
`renameat2(RENAME_EXCHANGE)` where the system has it (Linux), so that no moment exists without
a complete package at the target; elsewhere it is two renames. Creating the staging folder
first also finds an output that cannot be written before any long work starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from llmc.errors import LlmcError
from llmc.runtime.package import incomplete_package, is_package

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise LlmcError(f"the output {output} is a file; give a folder for the package")
    if output.is_dir() and any(output.iterdir()) and not is_package(output) and not incomplete_package(output):
        raise LlmcError(f"the output folder {output} holds files that are not an llmc package; give an empty or "
                        "new folder (llmc replaces only a package)")


@contextlib.contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """A fresh folder to write the package into; on success it replaces `output`."""
    _check_output(output)
    parent = output.parent
    for stale in parent.glob(f".{output.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=parent))
    except OSError as error:
        raise LlmcError(f"cannot write the package into {parent}: {error.strerror}") from None
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp's folders are private; a package is not
        if output.is_dir() and _exchange(staging, output):
            shutil.rmtree(staging)
        else:
            if output.is_dir():
                shutil.rmtree(output)
            os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
