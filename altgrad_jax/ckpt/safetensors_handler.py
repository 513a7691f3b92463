"""An Orbax checkpoint handler that writes a state pytree as one `.safetensors` file.

Orbax keeps everything around the arrays (temporary step directory and atomic rename, asynchronous
commit, retention, multi-process barriers); only the array bytes go through safetensors instead
of TensorStore, which was several times slower for a train state of many small arrays
(benchmarks/README.md, "bench_checkpoint").

The item directory holds `state.safetensors`: one tensor per leaf, named by its key path joined
with "." ('opt_state.1.0.mu.wte.embedding'), and in the header's metadata the key path parts,
dtype and PRNG key implementation of every leaf. Typed PRNG keys are stored as their key data;
dtypes NumPy cannot describe on its own (bfloat16, the float8 types) as unsigned integers of the
same width, viewed back on restore. Leaves must be whole on this process (one device, or
replicated across processes): process 0 writes the file, every process reads it.

The blocking part of a save is one host view per leaf: on CPU the device buffer itself (JAX does
not donate a buffer a NumPy view still references), on an accelerator the device-to-host copy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy
from orbax.checkpoint import future as ocp_future

from altgrad_jax.sharding import put_global
from altgrad_jax.tree_names import join_parts, key_path_parts

STATE_FILE = "state.safetensors"
TREE_METADATA_KEY = "altgrad_jax.tree"  # in the safetensors header's string metadata
FORMAT_VERSION = 1


@functools.lru_cache(maxsize=16)
def _paths_of(treedef) -> tuple[tuple[str, tuple], ...]:
    """(leaf name, key path parts) per leaf; names are Orbax-style: 'opt_state.1.0.mu.wte.embedding'."""
    placeholder = jax.tree_util.tree_unflatten(treedef, range(treedef.num_leaves))
    paths = (tuple(key_path_parts(key_path)) for key_path, _ in jax.tree_util.tree_flatten_with_path(placeholder)[0])
    return tuple((join_parts(parts, "."), parts) for parts in paths)


def named_leaves(tree) -> list[tuple[str, tuple, Any]]:
    """[(leaf name, key path parts, leaf)] in flattening order; names are cached per tree
    structure, since a training run saves the same structure every time."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    try:
        paths = _paths_of(treedef)
    except TypeError:  # a node whose static data is unhashable
        paths = _paths_of.__wrapped__(treedef)
    return [(name, parts, leaf) for (name, parts), leaf in zip(paths, leaves)]


@functools.cache
def dtype_name(dtype) -> str:
    return str(dtype)  # numpy's dtype.__str__ is slow enough to show in a 285-leaf save


def is_typed_key(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


@functools.cache
def _storage_dtype(dtype: np.dtype) -> np.dtype:
    """`dtype` itself when NumPy describes it natively, else the unsigned int of its width."""
    try:
        if np.dtype(dtype.str) == dtype:
            return dtype
    except TypeError:  # float8's '<f1'
        pass
    return np.dtype(f"u{dtype.itemsize}")


def _host_view(name: str, leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array):
        if not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                raise ValueError(f"leaf '{name}' is sharded across processes; only whole or replicated leaves can be saved")
            leaf = leaf.addressable_data(0)
        return np.asarray(leaf)
    return np.array(leaf)  # a NumPy or Python leaf: copied, since the caller may change it in place


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What a save writes: {tensor name: host array} and the description of every leaf."""

    arrays: dict[str, np.ndarray]
    tree: list[dict]


def snapshot(state) -> Snapshot:
    """The host views of `state` that a save writes; take it before the state is donated."""
    leaves = named_leaves(state)
    for _, _, leaf in leaves:
        if isinstance(leaf, jax.Array) and leaf.is_fully_addressable and not is_typed_key(leaf):
            leaf.copy_to_host_async()  # overlaps the device-to-host copies on accelerators
    arrays, tree = {}, []
    for name, parts, leaf in leaves:
        if name in arrays:
            raise ValueError(f"two leaves share the name '{name}'")
        description = {"name": name, "path": parts}
        if is_typed_key(leaf):
            description["key_impl"] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        host = _host_view(name, leaf)
        description["dtype"] = dtype_name(host.dtype)
        if not host.flags.c_contiguous:
            host = host.copy(order="C")
        arrays[name] = host.view(_storage_dtype(host.dtype))
        tree.append(description)
    return Snapshot(arrays, tree)


def write(directory, taken: Snapshot) -> None:
    """`state.safetensors` into `directory`, flushed to disk."""
    path = os.path.join(directory, STATE_FILE)
    header = {TREE_METADATA_KEY: json.dumps({"format": FORMAT_VERSION, "leaves": taken.tree})}
    safetensors.numpy.save_file(taken.arrays, path, metadata=header)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read(directory) -> tuple[dict[str, np.ndarray], list[dict]]:
    """({leaf name: host array in its saved dtype}, leaf descriptions) from `directory`."""
    arrays = {}
    with safetensors.safe_open(os.path.join(directory, STATE_FILE), framework="numpy") as handle:
        tree = json.loads(handle.metadata()[TREE_METADATA_KEY])["leaves"]
        for description in tree:
            stored = handle.get_tensor(description["name"])
            arrays[description["name"]] = stored.view(jnp.dtype(description["dtype"]))
    return arrays, tree


def place(host: np.ndarray, sharding, key_impl: str | None = None):
    """A host array (key data when `key_impl`) as a device array laid out by `sharding`, which
    may span the devices of every process (each process holds the whole host array)."""
    leaf = jax.random.wrap_key_data(host, impl=key_impl) if key_impl else host
    if sharding is None:
        return jax.device_put(leaf, jax.local_devices()[0])
    return put_global(leaf, sharding)


def _nested(tree: list[dict], arrays: dict[str, Any]):
    """Plain dicts (names) and lists (positions) from the saved key paths, for a restore without target."""
    if len(tree) == 1 and not tree[0]["path"]:  # the state is a single array
        return arrays[tree[0]["name"]]
    root: dict = {}
    for description in tree:
        node, parts = root, description["path"]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = arrays[description["name"]]

    def lists(node):
        if not isinstance(node, dict):
            return node
        if node and all(isinstance(key, int) for key in node):
            return [lists(node[index]) for index in sorted(node)]
        return {key: lists(value) for key, value in node.items()}

    return lists(root)


def restore_tree(directory, target=None):
    """The saved state: shaped, typed and sharded like `target`, or as plain dicts and lists."""
    arrays, tree = read(directory)
    key_impls = {description["name"]: description.get("key_impl") for description in tree}
    if target is None:
        placed = {name: place(array, None, key_impls[name]) for name, array in arrays.items()}
        return _nested(tree, placed)
    placed = [place(arrays[name], getattr(leaf, "sharding", None), key_impls[name])
              for name, _, leaf in named_leaves(target)]
    return jax.tree.unflatten(jax.tree.structure(target), placed)


class SafetensorsHandler(ocp.handlers.AsyncCheckpointHandler):
    """Saves a `Snapshot` (the host views, taken by the caller before the state can be donated):
    `async_save` returns at once and the file is written in Orbax's commit thread."""

    @classmethod
    def typestr(cls) -> str:
        """The name Orbax records for this item in every step's `_CHECKPOINT_METADATA`: the
        module's path before it moved into ckpt/, so that new and old step directories agree."""
        return "altgrad_jax.safetensors_handler.SafetensorsHandler"

    async def async_save(self, directory, args: SafetensorsSave):
        if jax.process_index() != 0:
            return []

        async def commit():
            write(directory, args.snapshot)

        return [ocp_future.CommitFutureAwaitingContractedSignals(commit(), name="safetensors_save")]

    def save(self, directory, args: SafetensorsSave):
        if jax.process_index() == 0:
            write(directory, args.snapshot)

    def restore(self, directory, args: SafetensorsRestore | None = None):
        return restore_tree(directory, None if args is None else args.target)


@ocp.args.register_with_handler(SafetensorsHandler, for_save=True)
@dataclasses.dataclass
class SafetensorsSave(ocp.args.CheckpointArgs):
    snapshot: Snapshot  # `snapshot(state)`


@ocp.args.register_with_handler(SafetensorsHandler, for_restore=True)
@dataclasses.dataclass
class SafetensorsRestore(ocp.args.CheckpointArgs):
    target: Any = None
