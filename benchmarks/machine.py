"""The machine a benchmark runs on, and a guard against other processes' load (the
machine is shared): `wait_quiet` waits for a quiet second or two, `Meter` measures how
many cores other processes used during a run."""

from __future__ import annotations

import datetime
import os
import platform
import time

HZ = os.sysconf("SC_CLK_TCK")


def _system_busy() -> int:
    fields = list(map(int, open("/proc/stat").readline().split()[1:]))
    return sum(fields[:8]) - fields[3] - fields[4]


def _own_busy() -> int:
    """Clock ticks used by this process, its live descendants and the children it has reaped."""
    reaped = os.times()
    total = round((reaped.children_user + reaped.children_system) * HZ)
    for pid in [os.getpid()] + _children(os.getpid()):
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(stat[11]) + int(stat[12])
    return total


def _children(pid: int) -> list[int]:
    try:
        found = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except FileNotFoundError:
        return []
    result = [int(c) for c in found]
    for child in list(result):
        result += _children(child)
    return result


class Meter:
    def __enter__(self) -> "Meter":
        self.start, self.system, self.own = time.perf_counter(), _system_busy(), _own_busy()
        return self

    def __exit__(self, *exc) -> None:
        elapsed = time.perf_counter() - self.start
        others = (_system_busy() - self.system) - (_own_busy() - self.own)
        self.others = max(0.0, others / HZ / elapsed)


def wait_quiet(threshold: float = 0.15, seconds: int = 2, limit: float = 120) -> None:
    start, quiet = time.time(), 0
    while time.time() - start < limit and quiet < seconds:
        with Meter() as meter:
            time.sleep(1)
        quiet = quiet + 1 if meter.others < threshold else 0


def describe_machine() -> str:
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    from tvm.target.codegen import llvm_get_system_cpu

    cpu = os.environ.get("LLMC_CPU")
    compiled_for = f", llmc's kernels compiled for LLMC_CPU={cpu}" if cpu else ""
    return (f"{model} ({llvm_get_system_cpu()}), {os.cpu_count()} cores, {platform.machine()}, "
            f"{datetime.date.today().isoformat()}{compiled_for}")
