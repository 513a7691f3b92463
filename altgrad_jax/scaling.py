"""Delayed per-tensor scaling of the weights: amax history and scale, a pytree of its own.

The quant state mirrors the parameter tree down to each linear layer (`h/<i>/attn/c_attn`, ...,
`lm_head`), with one entry per layer:
    {"amax_history": float32[amax_history_len] (newest first), "scale": float32[]}
Step t quantizes the kernel W_t with the scale held in the state (computed from earlier amaxes;
at step 0 from amax(W_0), the history starting empty), then records amax(W_t) and recomputes the
scale for step t+1:
    scale = max(finite history) * margin / fmt.max_finite
An amax of 0 or a non-finite one is recorded but cannot produce a scale: the previous scale is
kept then. The state is overwritten by the train step, never given to the optimizer. It has the
same structure whatever the config (layers left in float32 keep scale 1), so checkpoints of
float32 and FP8 runs share one layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from altgrad_jax.formats import get_format


def linear_layer_paths(params) -> list[tuple]:
    """Paths (key tuples) of every dict in `params` that holds a `kernel`, in tree order."""
    paths = []
    for key_path, _ in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(k.key for k in key_path)
        if keys[-1] == "kernel":
            paths.append(keys[:-1])
    return paths


def path_name(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def get_path(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple, value) -> dict:
    """A copy of nested dict `tree` with `value` at `path` (the input is not modified)."""
    if not path:
        return value
    head, *rest = path
    out = dict(tree)
    out[head] = set_path(tree.get(head, {}), tuple(rest), value)
    return out


def scale_from_amax(amax: jax.Array, fallback, fmt, margin: float) -> jax.Array:
    """amax * margin / max_finite, or `fallback` when that is 0 or not finite."""
    scale = amax * margin / get_format(fmt).max_finite
    return jnp.where(jnp.isfinite(scale) & (scale > 0), scale, fallback).astype(jnp.float32)


def scale_from_history(amax_history: jax.Array, previous_scale: jax.Array, fmt, margin: float) -> jax.Array:
    finite_max = jnp.max(jnp.where(jnp.isfinite(amax_history), amax_history, 0.0))
    return scale_from_amax(finite_max, previous_scale, fmt, margin)


def init_scaling_entry(kernel: jax.Array, fmt, history_len: int, margin: float) -> dict:
    """Empty (zero) history; the first scale bootstraps from amax(kernel) (1.0 when `fmt` is None)."""
    history = jnp.zeros((history_len,), jnp.float32)
    scale = jnp.float32(1.0)
    if fmt is not None:
        scale = scale_from_history(jnp.max(jnp.abs(kernel))[None].astype(jnp.float32), scale, fmt, margin)
    return {"amax_history": history, "scale": scale}


def update_scaling_entry(entry: dict, amax: jax.Array, fmt, margin: float) -> dict:
    """Push `amax` (newest first) and recompute the scale."""
    history = jnp.roll(entry["amax_history"], 1).at[0].set(amax.astype(jnp.float32))
    return {"amax_history": history, "scale": scale_from_history(history, entry["scale"], fmt, margin)}


def init_quant_state(params, config) -> dict:
    """One scaling entry per linear layer, structure independent of `use_fp8`."""
    state: dict = {}
    for path in linear_layer_paths(params):
        kernel = get_path(params, path)["kernel"]
        fmt = config.forward_format_for(path_name(path))
        entry = init_scaling_entry(kernel, fmt, config.amax_history_len, config.fp8_amax_margin)
        state = set_path(state, path, entry)
    return state
