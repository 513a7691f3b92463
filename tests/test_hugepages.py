"""The command lines restart once with glibc's huge-page tunable (hugepages.py): when, what they
pass on, and that XLA:CPU's temp buffer then faults in 2 MiB at a time, not 4 KiB."""

import os
import platform
import subprocess
import sys

import pytest

from altgrad_jax.hugepages import (
    THP_MODE_FILE,
    environ_with_hugepages,
    needs_hugepage_tunable,
    transparent_hugepages_offered,
)

ON_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_the_kernels_mode_is_read_from_the_bracketed_word(tmp_path):
    mode = tmp_path / "enabled"
    for text, offered in (("always [madvise] never\n", True), ("[always] madvise never\n", True),
                          ("always madvise [never]\n", False)):
        mode.write_text(text)
        assert transparent_hugepages_offered(str(mode)) is offered
    assert not transparent_hugepages_offered(str(tmp_path / "missing"))


@pytest.mark.skipif(not ON_GLIBC, reason="the tunable is glibc's")
def test_a_restart_is_needed_unless_set_turned_off_or_useless(tmp_path):
    madvise, never = tmp_path / "madvise", tmp_path / "never"
    madvise.write_text("always [madvise] never\n")
    never.write_text("always madvise [never]\n")
    assert needs_hugepage_tunable({}, str(madvise))
    assert needs_hugepage_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, str(madvise))
    assert not needs_hugepage_tunable({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, str(madvise))
    assert not needs_hugepage_tunable({"ALTGRAD_HUGEPAGES": "0"}, str(madvise))
    assert not needs_hugepage_tunable({}, str(never))


def test_the_tunable_is_appended_to_the_users_own():
    assert environ_with_hugepages({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert environ_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


# The script restarts itself, then prints its PID, arguments and tunables, and the median minor
# page faults of 9 calls of a jitted function whose 64 MiB exp XLA keeps in its temp buffer.
SCRIPT = """
import os, resource, sys
from altgrad_jax.hugepages import restart_with_hugepages
print("started", flush=True)
restart_with_hugepages()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: jnp.sum(jnp.exp(x).T @ jnp.ones((4096, 1))))
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes >= 64 << 20
for _ in range(3):
    f(x).block_until_ready()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(os.getpid(), sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), sorted(faults)[4])
"""


def run_script(tmp_path, **env_changes):
    script = tmp_path / "restart_me.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ALTGRAD_HUGEPAGES")}
    process = subprocess.Popen([sys.executable, str(script), "a b", "--c"], env={**env, **env_changes,
                               "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    lines = out.splitlines()
    pid, args, tunables, faults = lines[-1].split(" ", 1)[0], *lines[-1].split(" ", 1)[1].rsplit(" ", 2)
    return lines, int(pid), process.pid, args, tunables, float(faults)


@pytest.mark.skipif(not (ON_GLIBC and transparent_hugepages_offered(THP_MODE_FILE)),
                    reason="needs glibc and a kernel that offers transparent huge pages")
def test_the_restart_keeps_pid_and_arguments_and_the_temp_buffer_faults_in_2_mib_at_a_time(tmp_path):
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    lines, pid, popen_pid, args, tunables, faults = run_script(tmp_path, ALTGRAD_HUGEPAGES="0")
    assert tunables == "None" and lines.count("started") == 1
    assert faults > 0.9 * pages, "glibc reuses the 64 MiB block without help: nothing to test"

    lines, pid, popen_pid, args, tunables, faults = run_script(tmp_path)
    assert lines.count("started") == 2, "restarted exactly once"
    assert pid == popen_pid and args == "['a b', '--c']" and tunables == "glibc.malloc.hugetlb=1"
    assert faults < 0.1 * pages  # measured: about 550 (most of the block in 2 MiB pages)
