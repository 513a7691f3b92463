"""Subprocess for the fault tests: saves checkpoints, then gets killed or signalled.

    python tests/_ckpt_writer.py DIRECTORY MEGABYTES

Saves step 1 (a small state), prints "saving 2" and starts an asynchronous save of step 2
(a state of about MEGABYTES of incompressible float32), and idles like the training loop
(which stops at a step boundary on SIGINT/SIGTERM) until it is killed or signalled; the
save in flight is waited for, unless a second signal abandons it.
"""

import sys
import time

import jax
import jax.numpy as jnp

from altgrad_jax.ckpt import CheckpointManager
from altgrad_jax.loop.interrupts import StopRequested


def small_state():
    """The step-1 state; the test recomputes it to compare the restore."""
    return {"w": jnp.arange(1000, dtype=jnp.float32) * 0.5, "key": jax.random.key(7)}


def large_state(megabytes: int):
    n_per_leaf = megabytes * 2**20 // 4 // 4
    keys = jax.random.split(jax.random.key(1), 4)
    return {"w": [jax.random.normal(k, (n_per_leaf,)) for k in keys], "key": jax.random.key(8)}


def main(directory: str, megabytes: int) -> int:
    big = jax.block_until_ready(large_state(megabytes))
    with CheckpointManager(directory, max_checkpoints=3) as manager, StopRequested() as stop:
        manager.save(1, small_state(), val_loss=1.0)
        manager.wait_until_finished()
        print("saving 2", flush=True)
        manager.save(2, big, val_loss=0.5)
        while not stop.requested:  # the "training loop" that a signal interrupts
            time.sleep(0.01)
        manager.wait_until_finished()  # as the trainer does: a second signal here stops at once
    return stop.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
