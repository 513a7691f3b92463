"""Transparent huge pages for malloc's large blocks: the command lines restart once with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (issue 14).

XLA:CPU allocates each execution's temp buffer (148 MiB for the small model of
benchmarks/bench_vs_torch.py when this was measured, 239 MiB now for its research step) with
malloc and frees it when the step ends. glibc serves such a block with a fresh mmap and returns it with munmap, so every step
faults the whole buffer in again, 4 KiB at a time: 38 000 minor faults and 0.08-0.15 s of kernel
CPU time per small plain step (0.11-0.21 s of wall time) on the 2-core machine. With the
tunable, glibc asks for transparent huge pages on those mappings (madvise), and the same buffer
comes in mostly 2 MiB at a time: about 550 faults per step.

glibc reads its tunables only when a process starts, so the entry points (`altgrad_jax.run`, the
sweep, the benchmarks) call `restart_with_hugepages()` first thing: it re-executes the same
command line, in the same process (same PID), with the tunable added. Nothing else changes: not
a value, not the allocator's arenas. Without effect, so skipped, where the kernel offers no
transparent huge pages (`never`) or the C library is not glibc. A `glibc.malloc.hugetlb` already
in GLIBC_TUNABLES is kept as the user set it; `ALTGRAD_HUGEPAGES=0` turns the restart off. A
program that imports the package gets none of this: start it with the variable set instead.
The buffer is still mapped afresh each step; on a VM that hands freed memory back to its host,
the first step after a pause faults it in from the host (benchmarks/README.md, "The first step
after a pause"), which no tunable of glibc's avoids for blocks this large.

Tried instead and dropped: mallopt at import (one arena, no mmap, no trim) removed every fault
but made compiles about 25 % slower and the default `make run` no faster (51-53 s against 47-53 s
without either); the tunable made it 39-45 s and left compile times as they were.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_hugepages_offered(mode_file: str = THP_MODE_FILE) -> bool:
    """True when the kernel's THP mode (the bracketed word) is `always` or `madvise`."""
    try:
        with open(mode_file) as file:
            mode = file.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def needs_hugepage_tunable(environ=os.environ, mode_file: str = THP_MODE_FILE) -> bool:
    if environ.get("ALTGRAD_HUGEPAGES", "1") == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    return transparent_hugepages_offered(mode_file)


def environ_with_hugepages(environ=os.environ) -> dict[str, str]:
    """A copy of `environ` with the tunable appended to GLIBC_TUNABLES (colon-separated)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}


def restart_with_hugepages() -> None:
    """Re-execute this command line with the tunable, unless it is set or would do nothing.
    Call it first thing in a `__main__` block, never from a function a test or library calls."""
    if not needs_hugepage_tunable():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ_with_hugepages())
