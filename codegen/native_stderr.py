"""Silencing what TVM's C++ code writes straight to the process's stderr, where it is known noise.

TVM builds its own paged-KV-cache kernels for the cache's element type before llmc replaces them
(targets/cpu.py); for an int8 container (the q8 and q4 caches) its TIR builder warns about every
float-to-int8 store in kernels that never run. Python's `sys.stderr` cannot catch those lines: they
go to file descriptor 2, which is pointed at the null device for the duration.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def silenced_native_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
