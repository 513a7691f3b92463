"""Metrics that explain a stalled update: what the optimizer asked for vs what the storage applied.

`update_metrics(params_before, params_after, intended_updates, storage, layer_names)` returns a
flat dict of float32 scalars, per layer and pooled over the selected layers:
- `update/below_half_ulp/<layer>`: fraction of elements with |intended| < ulp(before) / 2, the
  updates that round-to-nearest cancels (ulp as in storage.py, at the scale that the store of
  before + intended uses; at a power of two, a downward update between a quarter and a half of
  that ULP does move the weight, so this is the upper edge of what nearest cancels);
- `update/cos/<layer>`: cosine of the applied update (after - before, in float32) to the intended;
- `update/norm_ratio/<layer>`: ||applied|| / ||intended||.
Both are 0 where a norm is 0 (as in altgrad_jax.metrics). The pooled `update/below_half_ulp`,
`update/cos`, `update/norm_ratio` are global quantities over all selected elements (total count
over total size; sum of dot products over the product of the global norms), not means of the
per-layer ratios. Sums are plain float32 (updates far below 1e-19 would underflow their squares).

Layers: by default every leaf whose key path ends in `kernel` (the quantized kernels), named by
its parent path (`h/0/mlp/c_fc`); `layer_names` picks some: a name selects the leaf `<name>/kernel`
or, failing that, the leaf named exactly `<name>`. `storage` is one spec or a tree prefix of specs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from altgrad_jax.tree_names import key_path_name
from altgrad_jax.update.storage import storage_leaves, tensor_scale, ulp

KERNEL = "kernel"


def select_layers(params, layer_names=None) -> dict[str, int]:
    """{layer name: leaf index in flatten order} of the layers the metrics cover."""
    paths = [key_path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if layer_names is None:
        chosen = {}
        for index, path in enumerate(paths):
            if path == KERNEL or path.endswith("/" + KERNEL):
                chosen[path[: -len(KERNEL)].rstrip("/") or KERNEL] = index
        return chosen
    index_of = {path: index for index, path in enumerate(paths)}
    chosen = {}
    for name in layer_names:
        index = index_of.get(f"{name}/{KERNEL}", index_of.get(name))
        if index is None:
            raise ValueError(f"layer {name!r}: no leaf {name}/{KERNEL} or {name} in the params")
        chosen[name] = index
    return chosen


def _ratio(numerator, denominator):
    return jnp.where(denominator == 0, np.float32(0.0), numerator / jnp.where(denominator == 0, 1.0, denominator))


def update_metrics(params_before, params_after, intended_updates, storage, layer_names=None) -> dict[str, jax.Array]:
    """The update/* metrics (see the module note); jittable, no host syncs."""
    before = jax.tree_util.tree_leaves(params_before)
    after = jax.tree_util.tree_leaves(params_after)
    intended = jax.tree_util.tree_leaves(intended_updates)
    storages = storage_leaves(storage, params_before)
    chosen = select_layers(params_before, layer_names)
    if not chosen:
        raise ValueError("update_metrics: no layers selected (no leaf named .../kernel)")
    metrics, totals = {}, [0, 0, 0.0, 0.0, 0.0]
    for name, index in chosen.items():
        w = jnp.asarray(before[index], jnp.float32)
        u = jnp.asarray(intended[index], jnp.float32)
        applied = jnp.asarray(after[index], jnp.float32) - w
        spacing = ulp(w, storages[index], tensor_scale(w + u, storages[index]))
        below = jnp.count_nonzero(jnp.abs(u) < np.float32(0.5) * spacing)  # int32: exact
        sums = (below, w.size, jnp.sum(applied * u), jnp.sum(applied * applied), jnp.sum(u * u))
        totals = [total + value for total, value in zip(totals, sums)]
        metrics.update(_named(sums, f"/{name}"))
    metrics.update(_named(totals, ""))
    return metrics


def _named(sums, suffix: str) -> dict[str, jax.Array]:
    below, size, dot, applied_sq, intended_sq = sums
    applied_norm, intended_norm = jnp.sqrt(applied_sq), jnp.sqrt(intended_sq)
    return {
        f"update/below_half_ulp{suffix}": below.astype(jnp.float32) / np.float32(max(size, 1)),
        f"update/cos{suffix}": _ratio(dot, applied_norm * intended_norm),
        f"update/norm_ratio{suffix}": _ratio(applied_norm, intended_norm),
    }
