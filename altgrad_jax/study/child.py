"""A sweep's child: `python -m altgrad_jax.study.child --parent PID <altgrad_jax.run arguments>`.

It asks Linux to send it SIGTERM when the sweep dies (PR_SET_PDEATHSIG), so a sweep killed with
SIGKILL leaves no orphan training into its directories (the trainer saves and exits 143), then
runs altgrad_jax.run in this process. Elsewhere it only runs altgrad_jax.run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _stop_at_once(signum, frame):
    os._exit(128 + signum)  # still importing: nothing to save


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the sweep died before prctl took effect
        os._exit(128 + signal.SIGTERM)


def main(argv: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_at_once)  # until altgrad_jax.run installs its own handlers
    if len(argv) < 2 or argv[0] != "--parent" or not argv[1].isdigit():
        print("error: usage: python -m altgrad_jax.study.child --parent PID RUN_ARGS...", file=sys.stderr)
        return 2
    die_with_parent(int(argv[1]))
    from altgrad_jax.run import main as run_main

    return run_main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
