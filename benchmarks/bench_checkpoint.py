"""Checkpoint cost for the full train state: time `save` blocks the loop, time to committed,
and numpy.save of the same bytes on the same filesystem, interleaved, medians: into one file (+1 fsync, the
target's baseline) and into one file per leaf (+fsync each, as many arrays as Orbax writes).

    python benchmarks/bench_checkpoint.py [--quick] [--reps 5] [--dir /path/on/target/fs]

Targets (issue #4): blocking <= 10% of the total, total <= 2x the raw numpy write.
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from altgrad_jax.ckpt import CheckpointManager
from altgrad_jax.config import TrainConfig
from altgrad_jax.train_state import init_train_state


def _host_leaves(state) -> list:
    leaves = [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
              for x in jax.tree.leaves(state)]
    return jax.device_get(leaves)


def numpy_write(state, path: str) -> None:
    """The baseline: every leaf np.save'd into one file, fsynced once (as Orbax syncs its files)."""
    with open(path, "wb") as handle:
        for leaf in _host_leaves(state):
            np.save(handle, leaf)
        handle.flush()
        os.fsync(handle.fileno())


def numpy_write_per_leaf(state, directory: str) -> None:
    """The per-array baseline: one np.save'd file per leaf, each fsynced (Orbax also writes 285 arrays)."""
    os.makedirs(directory)
    for index, leaf in enumerate(_host_leaves(state)):
        with open(os.path.join(directory, f"{index}.npy"), "wb") as handle:
            np.save(handle, leaf)
            handle.flush()
            os.fsync(handle.fileno())


def with_trained_moments(state):
    """AdamW's mu/nu are zeros at init and would compress to nothing; a trained state's do not."""
    leaves, treedef = jax.tree.flatten(state.opt_state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [jax.random.normal(key, x.shape, x.dtype) * 1e-3
              if x.ndim >= 1 and jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x
              for key, x in zip(keys, leaves)]
    return state.replace(opt_state=jax.tree.unflatten(treedef, leaves))


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
               if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-layer n_embd-128 state, 2 repetitions")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a new temp dir)")
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    model = dict(n_layer=2, n_head=2, n_embd=128) if args.quick else dict(n_layer=6, n_head=6, n_embd=384)
    config = TrainConfig(**model, vocab_size=256, block_size=256, use_fp8=True)
    state = jax.block_until_ready(with_trained_moments(init_train_state(config)))

    scratch = tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir)
    blocking, total, raw, raw_per_leaf = [], [], [], []
    try:
        with CheckpointManager(os.path.join(scratch, "ckpt"), max_checkpoints=3) as manager:
            def orbax_save(rep):
                start = time.perf_counter()
                manager.save(rep, state, val_loss=float(rep))
                returned = time.perf_counter()
                manager.wait_until_finished()
                return returned - start, time.perf_counter() - start

            def timed(write, path):
                start = time.perf_counter()
                write(state, path)
                return time.perf_counter() - start

            for rep in range(reps + 1):  # rep 0 is the burn-in
                # Each write leaves dirty pages that the kernel flushes during the next one:
                # rotate the order so that no contender always follows the same one.
                stages = ["orbax", "one_file", "per_leaf"]
                stages = stages[rep % 3:] + stages[:rep % 3]
                times = {}
                for stage in stages:
                    if stage == "orbax":
                        times[stage] = orbax_save(rep)
                    elif stage == "one_file":
                        times[stage] = timed(numpy_write, os.path.join(scratch, f"state{rep}.npy"))
                    else:
                        times[stage] = timed(numpy_write_per_leaf, os.path.join(scratch, f"leaves{rep}"))
                os.remove(os.path.join(scratch, f"state{rep}.npy"))
                shutil.rmtree(os.path.join(scratch, f"leaves{rep}"))
                if rep:
                    blocking.append(times["orbax"][0])
                    total.append(times["orbax"][1])
                    raw.append(times["one_file"])
                    raw_per_leaf.append(times["per_leaf"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    blocking_s, total_s, raw_s, per_leaf_s = (statistics.median(v) for v in (blocking, total, raw, raw_per_leaf))
    result = {
        "benchmark": "checkpoint",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "model": model | {"vocab_size": 256, "block_size": 256, "use_fp8": True},
        "state_megabytes": round(state_bytes(state) / 2**20, 1),
        "n_leaves": len(jax.tree.leaves(state)),
        "reps": reps,
        "save_blocking_s": round(blocking_s, 4),
        "save_total_s": round(total_s, 4),
        "numpy_save_s": round(raw_s, 4),
        "numpy_save_per_leaf_s": round(per_leaf_s, 4),
        "blocking_fraction": round(blocking_s / total_s, 3),
        "total_over_numpy": round(total_s / raw_s, 3),
        "total_over_numpy_per_leaf": round(total_s / per_leaf_s, 3),
        "median_ratio_total_over_numpy": round(statistics.median(t / r for t, r in zip(total, raw)), 3),
        "all_blocking_s": [round(v, 4) for v in blocking],
        "all_total_s": [round(v, 4) for v in total],
        "all_numpy_s": [round(v, 4) for v in raw],
        "all_numpy_per_leaf_s": [round(v, 4) for v in raw_per_leaf],
        "meets_blocking_target": blocking_s <= 0.10 * total_s,
        "meets_total_target": total_s <= 2.0 * raw_s,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
