"""An exclusive lock on a file, held for a `with` block: concurrent llmc processes that would
write the same package (two first uses of a cached model, two compiles into one folder) take
turns instead of racing."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator

from llmc.errors import LlmcError


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_file, "a")
    except OSError as error:
        raise LlmcError(f"cannot create the lock file {lock_file}: {error.strerror}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
