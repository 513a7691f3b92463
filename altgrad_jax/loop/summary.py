"""The lines printed on stderr when a run ends: outcome, run directory, and what to do next."""

from __future__ import annotations

import os
import sys

from altgrad_jax.config import TrainConfig

EXIT_OK, EXIT_NAN_STOP = 0, 3  # the other codes: 128 + signal number (interrupts.py)


def print_summary(config: TrainConfig, exit_code: int, step: int) -> None:
    outcome = {EXIT_OK: "finished", EXIT_NAN_STOP: "stopped by the NaN alert"}.get(exit_code, "interrupted")
    print(f"run {outcome} at step {step}; run directory: {config.out_dir}", file=sys.stderr)
    print(f"  plot:   {python_command()} -m altgrad_jax.plot {config.out_dir}", file=sys.stderr)
    if exit_code == EXIT_OK:
        print("  resume: the same command with --set max_steps=<more> continues from the last checkpoint",
              file=sys.stderr)
    elif exit_code == EXIT_NAN_STOP:
        print(f"  anomaly checkpoint: {os.path.join(config.checkpoint_path, 'anomaly')}; "
              f"alerts: {os.path.join(config.out_dir, 'alerts.jsonl')}", file=sys.stderr)
    else:
        print("  resume: the same command again continues from the last checkpoint (--resume auto)",
              file=sys.stderr)


def python_command() -> str:
    """This interpreter, relative when it lives under the working directory (e.g. .venv/bin/python)."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative
