"""Data parallelism with JAX's own sharding: one `data` mesh axis, the batch split along it, the
train state replicated. Every sharding decision lives here so that sharding params later means
changing `state_shardings` alone. The jitted step is unchanged: XLA inserts the gradient all-reduce,
so metrics and amax values are those of the global batch."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Variables that make `maybe_initialize_distributed` call jax.distributed.initialize();
# JAX reads the coordinator, process count and id from them (or from SLURM/Open MPI/TPU metadata).
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize_distributed() -> None:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None,
            process_id=int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
        )


def data_parallel_size(mesh_config) -> int:
    available = jax.device_count()
    wanted = available if mesh_config.data_parallel == -1 else mesh_config.data_parallel
    if wanted > available or available % wanted:
        raise ValueError(f"mesh.data_parallel={mesh_config.data_parallel} does not fit the {available} "
                         "available devices (use -1 for all, or a divisor of the device count)")
    return wanted


def make_mesh(mesh_config) -> Mesh | None:
    """A 1-D data mesh, or None for a single device (the plain unsharded path)."""
    size = data_parallel_size(mesh_config)
    if size == 1:
        return None
    devices = np.asarray(jax.devices()[:size])
    return Mesh(devices, (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def state_shardings(state, mesh: Mesh):
    """Replicated everywhere for now: the one place to change when params get sharded."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda _: replicated, state)


def put_batch(batch, mesh: Mesh | None):
    """Host batch (identical on every process, since batches are a function of seed and step) to devices."""
    if mesh is None:
        return jax.device_put(batch)
    sharding = batch_sharding(mesh)
    return tuple(jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
                 for array in batch)


def put_state(state, mesh: Mesh | None):
    if mesh is None:
        return state
    return jax.device_put(state, state_shardings(state, mesh))
