"""Updates measured in ULPs of the stored weights, and the earlier bench's gradient preconditioning.

`scale_by_ulp(storage, ulps)` multiplies each update element by `ulps * ulp(w)`, the local grid
spacing of the stored weight w (storage.ulp, at the tensor's power-of-two scale from the stored
values). Two placements, so that they can be compared:
- `ulp_scaled(ulps, storage, ...)` = chain(optax.adamw(1.0, ...), scale_by_ulp(storage, ulps)):
  the Adam direction m̂/(sqrt(v̂)+eps) (plus weight_decay * w) is scaled, so the learning rate is
  in ULPs: on the first step |m̂/sqrt(v̂)| is 1 and every weight moves by `ulps` ULPs.
- `gradient_preconditioned(learning_rate, storage, ...)` = chain(scale_by_ulp(storage),
  optax.adamw(learning_rate, ...)): the earlier PyTorch bench multiplied the GRADIENT by
  2**(floor(log2|w|) - M) before the moments. While w stays in its binade that factor is a
  per-element constant, which m̂/sqrt(v̂) cancels (up to eps): the update is nearly plain AdamW's.
Zero weights: their float32/bfloat16 ULP underflows to 0 (storage.py), so neither form moves a
zero float32/bfloat16 weight (a zero gradient gives Adam nothing); under a format their ULP is
min_subnormal * scale. Mask biases out (optax.masked / partition) when they start at 0.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from altgrad_jax.update.storage import storage_leaves, ulp


class ScaleByUlpState(NamedTuple):
    count: jax.Array  # int32, for an `ulps` schedule


def scale_by_ulp(storage="float32", ulps: "float | Callable" = 1.0) -> optax.GradientTransformation:
    """updates * ulps * ulp(params), elementwise; `ulps` a number or a schedule of the step count."""

    def init(params):
        del params
        return ScaleByUlpState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_ulp needs the params")
        factor = ulps(state.count) if callable(ulps) else ulps
        leaves, treedef = jax.tree_util.tree_flatten(params)
        scaled = [
            jnp.asarray(u, jnp.float32) * (jnp.asarray(factor, jnp.float32) * ulp(p, spec))
            for u, p, spec in zip(treedef.flatten_up_to(updates), leaves, storage_leaves(storage, params))
        ]
        return treedef.unflatten(scaled), ScaleByUlpState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def ulp_scaled(ulps, storage="float32", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0, mask=None) -> optax.GradientTransformation:
    """AdamW whose step is `ulps` (a number or schedule) times each stored weight's ULP."""
    return optax.chain(optax.adamw(1.0, b1, b2, eps, weight_decay=weight_decay, mask=mask),
                       scale_by_ulp(storage, ulps))


def gradient_preconditioned(learning_rate, storage="float32", b1: float = 0.9, b2: float = 0.999,
                            eps: float = 1e-8, weight_decay: float = 0.0, mask=None) -> optax.GradientTransformation:
    """AdamW on gradients multiplied by each stored weight's ULP (the earlier bench's form)."""
    return optax.chain(scale_by_ulp(storage, 1.0),
                       optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay, mask=mask))
