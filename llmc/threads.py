"""How many threads llmc's CPU kernels use unless told: one per physical core we may run on.

TVM's thread pool, left alone, takes half of the logical CPUs on x86 (it assumes two
hyper-threads per core), which on a machine without SMT, such as a 2-core VM, runs
every kernel on one core. The pool reads `TVM_NUM_THREADS` when it starts (the first
parallel kernel), so the default is set in the environment where llmc loads TVM (the
runtime's tvm_runtime, the compiler's targets), not on `import llmc`; a value already
there, or `--threads`, wins.
"""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """The physical cores among the CPUs this process may run on (hyper-threads of one core count once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        cores.add(siblings.read_text().strip() if siblings.is_file() else str(cpu))
    return max(1, len(cores))


def set_default_threads() -> None:
    os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))
