"""Narrow master weights: `stored_weight_update(inner, storage, rounding, kahan, key)`.

An optax wrapper. Each update runs `inner` (optax.adamw, ...) on float32 views of the gradients
and the stored params (so that its moments are float32, not the params' bfloat16; narrow moments
are `moments.low_precision_moments`), adds the update (plus the Kahan compensation) to the stored
weight in float32, stores the sum on the weight's grid (`storage.store`: float32, bfloat16 as
the dtype, or a format at a power-of-two per-tensor scale) with `rounding`, and returns
`stored_new - stored_old` in float32. No float32 copy of the weights is kept.

Landing on the grid: `optax.apply_updates(params, updates)` computes `p + (new - p)` in float32,
which is `new` bit for bit whenever `new - p` is exact in float32. Both are on 8-bit (bfloat16:
8-significant-bit) grids, so it is whenever their magnitudes are within about 2**(22 - M) of
each other (E5M2: 2**20; the whole range of E4M3, E3M4, E2M5, E1M6, E0M7 at one scale); when
|new| >> |p| the rounded sum still returns new, and a collapse |new| << |p| comes from a
cancellation p + u that float32 computes exactly. No case that misses was found; the tests
check bitwise landing for every storage with sign changes and binade crossings.

Stochastic rounding: the bits of each leaf come from fold_in(fold_in(key, count), crc32(path))
(stochastic.leaf_random_bits), a pure function of the key in the state, the step and the
parameter: bitwise reproducible, and saved and resumed with the state.

Kahan (`kahan=True`): a buffer c per parameter carries what the rounding dropped: the weight
receives y = u + c, and c' = y - (new - p) (the classic compensated sum, so it also takes up
the float32 rounding of p + y). Its dtype is `compensation_dtype`: float32 by default, which
makes stored + c as precise as a float32 master weight (state memory like one). A bfloat16
buffer halves that, but its own rounding biases the sum: 10**4 updates of 1e-4 to a bfloat16 1.0
end at 2.03125 with it (two bfloat16 ULPs above the exact 2.0), at 2.0 with float32.

Metrics (`metrics=True` or a list of layer names): the update/* dict of metrics.update_metrics
is kept in the state's `metrics` field (scalars only; read it with
`optax.tree_utils.tree_get(opt_state, "metrics")`). The intended update there is the inner
update u, without the compensation: what the optimizer asked for this step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from altgrad_jax.update.metrics import update_metrics
from altgrad_jax.update.stochastic import leaf_random_bits
from altgrad_jax.update.storage import STOCHASTIC, check_rounding, storage_leaves, store


class StoredWeightState(NamedTuple):
    inner_state: Any
    count: jax.Array  # int32, updates so far; folded into the rounding key
    key: Any  # PRNG key (stochastic rounding) or None
    compensation: Any  # Kahan buffer shaped like the params, or None
    metrics: dict  # update/* scalars of the last update ({} when off)


def _float32(tree):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)


def stored_weight_update(inner: optax.GradientTransformation, storage="float32", rounding: str = "nearest",
                         kahan: bool = False, key=None, compensation_dtype=jnp.float32,
                         metrics=False) -> optax.GradientTransformationExtraArgs:
    """`inner` with its updates landing on the storage grid (see the module note).

    storage: one spec ("float32", "bfloat16", a FORMATS name, a Storage) or a tree prefix of
    specs for the params; rounding: "nearest" or "stochastic" (then `key` is required);
    metrics: False/None, True (every `.../kernel` leaf) or a list of layer names.
    """
    inner = optax.with_extra_args_support(inner)
    stochastic = check_rounding(rounding) == STOCHASTIC
    if stochastic and key is None:
        raise ValueError("stochastic rounding needs a key")
    report = metrics is not None and metrics is not False
    layer_names = None if metrics is True or not report else list(metrics)

    def init(params):
        params32 = _float32(params)
        compensation = None
        if kahan:
            compensation = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, compensation_dtype), params32)
        names = {}
        if report:
            shapes = jax.eval_shape(lambda p: update_metrics(p, p, p, storage, layer_names), params32)
            names = {name: jnp.zeros((), jnp.float32) for name in shapes}
        return StoredWeightState(inner.init(params32), jnp.zeros((), jnp.int32), key if stochastic else None,
                                 compensation, names)

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("stored_weight_update needs the params")
        params32 = _float32(params)
        intended, inner_state = inner.update(_float32(updates), state.inner_state, params32, **extra_args)
        leaves, treedef = jax.tree_util.tree_flatten(params32)
        count = len(leaves)
        intended_leaves = treedef.flatten_up_to(intended)
        bits = (jax.tree_util.tree_leaves(leaf_random_bits(state.key, state.count, params))
                if stochastic else [None] * count)
        carried = treedef.flatten_up_to(state.compensation) if kahan else [None] * count
        stored, applied, compensation = [], [], []
        for p, u, spec, b, c in zip(leaves, intended_leaves, storage_leaves(storage, params), bits, carried):
            target = u if c is None else u + c.astype(jnp.float32)
            new = store(p + target, spec, rounding, b)
            step = new.astype(jnp.float32) - p
            stored.append(new)
            applied.append(step)
            compensation.append(None if c is None else (target - step).astype(compensation_dtype))
        new_state = StoredWeightState(
            inner_state,
            optax.safe_increment(state.count),
            state.key,
            treedef.unflatten(compensation) if kahan else None,
            update_metrics(params32, treedef.unflatten(stored), intended, storage, layer_names)
            if report else {},
        )
        return treedef.unflatten(applied), new_state

    return optax.GradientTransformationExtraArgs(init, update)
