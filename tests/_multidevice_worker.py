"""Subprocess half of tests/test_sharding.py; runs with the device count the test gave it.

    XLA_FLAGS=--xla_force_host_platform_device_count=N python tests/_multidevice_worker.py MODE PREFIX CKPT

compare (N=4): the same N_STEPS steps with mesh.data_parallel=4, then =1, in this process. The
    dp=4 run saves its state after step SAVED_STEP into CKPT (CheckpointManager) and PREFIX.npz
    (the leaves as numpy). PREFIX.json: per run, every step's metrics and sharding checks, and
    the errors for a batch that does not split over 4 devices.
restore (N any): restores step SAVED_STEP of CKPT onto a mesh of all N devices (no mesh for 1).
    PREFIX.npz: the restored leaves; PREFIX.json: the device sets of the restored leaves.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from altgrad_jax.ckpt import CheckpointManager
from altgrad_jax.config import MeshConfig, TrainConfig
from altgrad_jax.sharding import make_mesh, put_batch, put_state, with_shardings
from altgrad_jax.train_state import abstract_train_state, init_train_state
from altgrad_jax.train_step import make_train_step

# Tiny but complete: E5M2 on weights, activations and gradients, the shadow on (so every metric
# of the step exists), dropout on (its masks must not depend on the sharding).
CONFIG = TrainConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, batch_size=8, dropout=0.1,
                     learning_rate=1e-2, warmup_steps=2, max_steps=100, use_fp8=True, fp8_format="E5M2",
                     use_shadow=True, seed=5)
N_STEPS = 4
SAVED_STEP = 2


def host_batch(config, step: int):
    rng = np.random.default_rng(1000 + step)
    tokens = rng.integers(0, config.vocab_size, (config.batch_size, config.block_size + 1), dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def leaves_as_numpy(state) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def all_replicated(tree) -> bool:
    return all(leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(tree))


def compare(prefix: str, checkpoint_dir: str) -> None:
    assert jax.device_count() == 4, jax.devices()
    result = {}
    for data_parallel in (4, 1):
        mesh = make_mesh(MeshConfig(data_parallel=data_parallel), CONFIG.batch_size)
        step = make_train_step(CONFIG)
        state = put_state(init_train_state(CONFIG), mesh)
        history, checks = [], {}
        with CheckpointManager(checkpoint_dir) as manager:
            for i in range(N_STEPS):
                batch = put_batch(host_batch(CONFIG, i), mesh)
                if i == 0:
                    checks["batch_devices"] = len(batch[0].sharding.device_set)
                    checks["all_reduce_in_hlo"] = "all-reduce" in step.lower(state, batch).compile().as_text()
                state, metrics = step(state, batch)
                history.append({name: float(value) for name, value in metrics.items()})
                if data_parallel == 4 and i + 1 == SAVED_STEP:
                    np.savez(prefix + ".npz", **leaves_as_numpy(state))
                    manager.save(SAVED_STEP, state)  # the next step donates `state`, as in the trainer
        checks["state_replicated"] = all_replicated(state)
        checks["metrics_replicated"] = all_replicated(metrics)
        checks["state_devices"] = len(jax.tree_util.tree_leaves(state)[0].sharding.device_set)
        result[str(data_parallel)] = {"metrics": history, "checks": checks}
    result["errors"] = indivisible_batch_errors()
    with open(prefix + ".json", "w") as f:
        json.dump(result, f)


def indivisible_batch_errors() -> list[str]:
    """The messages of make_mesh and put_batch for a batch of 6 rows on 4 devices."""
    errors = []
    for attempt in (lambda: make_mesh(MeshConfig(), batch_size=6),
                    lambda: put_batch(host_batch(CONFIG.replace(batch_size=6), 0), make_mesh(MeshConfig()))):
        try:
            attempt()
            errors.append("no error")
        except ValueError as error:
            errors.append(str(error))
    return errors


def restore(prefix: str, checkpoint_dir: str) -> None:
    mesh = make_mesh(MeshConfig(), CONFIG.batch_size)
    target = with_shardings(abstract_train_state(CONFIG), mesh)
    with CheckpointManager(checkpoint_dir) as manager:
        state = manager.restore(SAVED_STEP, target)
    np.savez(prefix + ".npz", **leaves_as_numpy(state))
    with open(prefix + ".json", "w") as f:
        json.dump({"devices": jax.device_count(),
                   "leaf_device_counts": sorted({len(leaf.sharding.device_set) for leaf in jax.tree_util.tree_leaves(state)}),
                   "replicated": all_replicated(state)}, f)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"compare": compare, "restore": restore}[mode](*args)
