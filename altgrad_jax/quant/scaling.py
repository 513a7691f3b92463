"""Per-tensor scales: delayed (from an amax history), current (from the tensor itself) or none.

A scale s maps a tensor t onto the format's range as t / s; it is `amax * margin / max_finite`
(computed as amax * margin * (1 / max_finite) in float32).
- delayed (TransformerEngine's recipe): step t uses the largest finite amax recorded at steps
  < t; while the history holds no positive finite amax (the first step) the tensor's own amax is
  used instead. Values above the recorded range saturate, which is what overflow counts.
- current: the tensor's own amax at this step, so with margin >= 1 nothing saturates.
- none: scale 1, the raw range of the format.

The histories live in `TrainState.quant_state`: for every linear layer (whatever the config, so
that checkpoints of every run share one layout) and every operand slot x, w, dy a float32
`amax_history` of `amax_history_len` entries, newest first, zeros before anything is recorded.
It is overwritten by the train step, never optimized.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from altgrad_jax.quant.formats import get_format

DELAYED, CURRENT, NONE = "delayed", "current", "none"
SCALINGS = (DELAYED, CURRENT, NONE)
SLOTS = ("x", "w", "dy")


def scale_for_range(amax: jax.Array, fallback, inverse_max_finite, margin: float) -> jax.Array:
    """amax * margin * (1 / max_finite) in float32, or `fallback` when that is 0 or not finite.
    The reciprocal is a float32 constant or array, so a traced range (what-if) rounds alike."""
    scale = amax * np.float32(margin) * inverse_max_finite
    return jnp.where(jnp.isfinite(scale) & (scale > 0), scale, fallback).astype(jnp.float32)


def scale_from_amax(amax: jax.Array, fallback, fmt, margin: float) -> jax.Array:
    """The scale that maps amax * margin onto the format's max finite value (see scale_for_range)."""
    return scale_for_range(amax, fallback, np.float32(1.0 / get_format(fmt).max_finite), margin)


def delayed_scale(amax_history: jax.Array, fmt, margin: float) -> jax.Array:
    """The scale from the largest finite amax of the history; 0 (meaning: not known yet) when it
    holds no positive finite amax."""
    finite_max = jnp.max(jnp.where(jnp.isfinite(amax_history), amax_history, 0.0))
    return scale_from_amax(finite_max, 0.0, fmt, margin)


def resolve_scale(scaling: str, given: jax.Array, tensor: jax.Array, fmt, margin: float) -> jax.Array:
    """The scale a slot uses for `tensor`: 1 (none), from amax(tensor) (current), or `given`
    (delayed; the current scale while `given` is not a positive finite number)."""
    if scaling == NONE:
        return jnp.float32(1.0)
    current = scale_from_amax(jnp.max(jnp.abs(tensor)), 1.0, fmt, margin)
    if scaling == CURRENT:
        return current
    if scaling != DELAYED:
        raise ValueError(f"unknown scaling {scaling!r}; valid: {', '.join(SCALINGS)}")
    given = jnp.asarray(given, jnp.float32)
    return jnp.where(jnp.isfinite(given) & (given > 0), given, current)


def push_amax(amax_history: jax.Array, amax: jax.Array) -> jax.Array:
    """The history with `amax` recorded as the newest entry (the oldest drops out)."""
    return jnp.roll(amax_history, 1).at[0].set(jnp.asarray(amax, jnp.float32))


def init_quant_state(layer_paths, history_len: int) -> dict:
    """Zero histories for every slot of every layer, nested like the params (key paths)."""
    state: dict = {}
    for path in layer_paths:
        node = state
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = {slot: {"amax_history": jnp.zeros((history_len,), jnp.float32)} for slot in SLOTS}
    return state
