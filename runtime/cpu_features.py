"""Whether this processor can run a package's CPU library.

A CPU library is compiled for one processor (the compiling machine's, or `LLMC_CPU`'s) and
may use any instruction-set extension that processor has. On a processor without one of
them it would die of an illegal instruction in the middle of a run, so the package records
the extensions (LLVM's names) and loading compares them with the host's (Linux's
/proc/cpuinfo names) and refuses the library first, naming what is missing.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# LLVM's names that Linux spells differently once `_`, `-` and `.` are dropped from both.
_LINUX_SPELLING = {"sse3": "pni", "bmi": "bmi1"}


def _normalized(name: str) -> str:
    return name.replace("_", "").replace("-", "").replace(".", "").lower()


def host_cpu_flags() -> frozenset[str] | None:
    """The host processor's extensions, normalized; None where the system does not list them."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(_normalized(flag) for flag in value.split())
    return None


def missing_cpu_features(required: list[str]) -> list[str]:
    """The extensions in `required` (LLVM's names) that this processor lacks; none if it cannot tell."""
    flags = host_cpu_flags()
    if flags is None:
        return []
    return [feature for feature in required
            if _normalized(_LINUX_SPELLING.get(feature, feature)) not in flags]
