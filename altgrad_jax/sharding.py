"""Data parallelism with JAX's own sharding: one `data` mesh axis, the batch split along it, the
train state replicated.

Every sharding decision lives here, so that sharding params later means changing
`state_shardings` alone. The jitted step needs no change: it follows the shardings of its inputs
and XLA (GSPMD) inserts the all-reduces. Every reduction in the step is written over the global
arrays, so its metrics and amax histories are those of the global batch, not of one shard
(tests/test_sharding.py checks this against a one-device run). Several processes: see the
README's "Many devices" section; `maybe_initialize_distributed` joins them.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

DATA_AXIS = "data"

# Variables read by `maybe_initialize_distributed` (README, "Many devices").
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when JAX_COORDINATOR_ADDRESS is set; True if it was called."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return False
    try:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"]) if os.environ.get("JAX_NUM_PROCESSES") else None
        process_id = int(os.environ["JAX_PROCESS_ID"]) if os.environ.get("JAX_PROCESS_ID") else None
    except ValueError:
        raise ValueError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
                         f"{os.environ.get('JAX_NUM_PROCESSES')!r} and {os.environ.get('JAX_PROCESS_ID')!r}") from None
    _select_cpu_collectives()
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id)
    return True


def _select_cpu_collectives() -> None:
    """Gloo (TCP) for cross-process collectives on CPU devices, unless a choice was made already
    (JAX_CPU_COLLECTIVES_IMPLEMENTATION, e.g. "mpi"): without one, a multi-process CPU computation
    can fail. GPUs and TPUs use their own collectives and ignore the option."""
    try:
        if jax.config.jax_cpu_collectives_implementation is None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:
        pass


def data_parallel_size(mesh_config) -> int:
    """The number of devices along `data`: all of them for -1, else the configured divisor."""
    available = jax.device_count()
    wanted = available if mesh_config.data_parallel == -1 else mesh_config.data_parallel
    if wanted > available or available % wanted:
        raise ValueError(f"mesh.data_parallel={mesh_config.data_parallel} does not fit the {available} "
                         "available devices (use -1 for all, or a divisor of the device count)")
    if jax.process_count() > 1 and wanted != available:
        raise ValueError(f"mesh.data_parallel={mesh_config.data_parallel}: with {jax.process_count()} processes "
                         f"the mesh must span all {available} devices (use -1)")
    return wanted


def check_batch_divisible(batch_size: int, data_size: int) -> None:
    if batch_size % data_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by the data-parallel size {data_size} "
                         "(mesh.data_parallel, or the device count when it is -1)")


def make_mesh(mesh_config, batch_size: int | None = None) -> Mesh | None:
    """A 1-D `data` mesh, or None for a single device (the plain unsharded path).

    With `batch_size`, also checks that the batch splits evenly over the mesh.
    Axis type Auto: the step is written for GSPMD propagation, not explicit sharding types
    (`jax.make_mesh` would default to Explicit).
    """
    size = data_parallel_size(mesh_config)
    if batch_size is not None:
        check_batch_divisible(batch_size, size)
    if size == 1:
        return None
    devices = np.asarray(jax.devices()[:size])
    return Mesh(devices, (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split along `data`, the sequence axis whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def state_shardings(state, mesh: Mesh | None):
    """Replicated everywhere for now: the one place to change when params get sharded.

    `state` may be concrete or abstract; with `mesh` None every leaf goes to the default device.
    """
    sharding = (SingleDeviceSharding(jax.devices()[0]) if mesh is None
                else NamedSharding(mesh, PartitionSpec()))
    return jax.tree.map(lambda _: sharding, state)


def with_shardings(abstract_state, mesh: Mesh | None):
    """`abstract_state` (ShapeDtypeStructs, e.g. `abstract_train_state(config)`) with the shardings
    of `state_shardings`: the restore target that lays a checkpoint out on this mesh, whatever
    device count it was saved from."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        abstract_state, state_shardings(abstract_state, mesh))


def put_batch(batch, mesh: Mesh | None):
    """Host batch (the same global batch on every process) -> device arrays split along `data`.

    Each process materialises only the rows of its own devices.
    """
    if mesh is None:
        return jax.device_put(batch)
    size = mesh.shape[DATA_AXIS]
    for array in batch:
        check_batch_divisible(array.shape[0], size)
    sharding = batch_sharding(mesh)
    return tuple(jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
                 for array in batch)


def put_state(state, mesh: Mesh | None):
    """`state` (the same value on every process, e.g. a deterministic init) laid out on `mesh`."""
    if mesh is None:
        return state
    shardings = state_shardings(state, mesh)
    if all(sharding.is_fully_addressable for sharding in jax.tree.leaves(shardings)):
        return jax.device_put(state, shardings)
    return jax.tree.map(put_global, state, shardings)


def put_global(leaf, sharding):
    """`leaf` (the whole value, on this process: a NumPy array or a local jax array) laid out by
    `sharding`, which may span the devices of every process."""
    # Multi-process: `device_put` refuses committed arrays for devices of other processes. Every
    # process holds the whole leaf, so each fills its own devices and no data crosses processes
    # (typed PRNG keys included, which have no numpy form for `make_array_from_callback`).
    shards = [jax.device_put(leaf if _is_whole(index) else leaf[index], device)
              for device, index in sharding.addressable_devices_indices_map(leaf.shape).items()]
    return jax.make_array_from_single_device_arrays(leaf.shape, sharding, shards)


def _is_whole(index) -> bool:
    return all(part == slice(None) for part in index)  # replicated: no slicing op to compile
