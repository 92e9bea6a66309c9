"""Write a package where it cannot hurt: in a new folder beside the target, moved into place whole.

A compile that fails or is killed half-way leaves the package that was there before intact
(and a `.NAME.partial-*` folder, which the next compile into NAME removes; compiles into one
folder take turns through a lock). The swap is one `renameat2(RENAME_EXCHANGE)` where the
system has it (Linux), so that no moment exists without a complete package at the target;
elsewhere it is two renames. Creating the staging folder first also finds an output that
cannot be written before any long work starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from llmc.errors import LlmcError
from llmc.file_lock import exclusive
from llmc.runtime.package import incomplete_package, is_package

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> Callable[..., int] | None:
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the system cannot (then nothing happened)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS):  # a file system or kernel without the exchange
        return False
    raise OSError(code, os.strerror(code))


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise LlmcError(f"the output {output} is a file; give a folder for the package")
    if output.is_dir() and any(output.iterdir()) and not is_package(output) and not incomplete_package(output):
        raise LlmcError(f"the output folder {output} holds files that are not an llmc package; give an empty or "
                        "new folder (llmc replaces only a package)")


def _replace(staging: Path, output: Path) -> None:
    staging.chmod(0o755)  # mkdtemp's folders are private; a package is not
    if output.is_dir() and _exchange(staging, output):
        shutil.rmtree(staging)
        return
    if output.is_dir():
        shutil.rmtree(output)
    os.rename(staging, output)


@contextlib.contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """A fresh folder to write the package into; on success it replaces `output`."""
    output = output.resolve()
    _check_output(output)
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=parent))
    except OSError as error:
        raise LlmcError(f"cannot write the package into {parent}: {error.strerror}") from None
    try:
        with exclusive(parent / f".{output.name}.lock"):
            for stale in parent.glob(f".{output.name}.partial-*"):  # left by a compile that was killed
                if stale != staging:
                    shutil.rmtree(stale, ignore_errors=True)
            yield staging
            _replace(staging, output)
    except OSError as error:
        raise LlmcError(f"writing the package {output} failed: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
