"""What-if shadowing: the statistics each real operand WOULD have under every candidate format.

Every `whatif_interval` steps each quantized slot's tensor (x, w or dy, the same array the run
quantizes) is rounded to every candidate of `whatif_formats` in one stacked computation: the
formats become arrays of their parameters (mantissa bits, smallest subnormal and normal, largest
finite value) and `jax.vmap` runs one rounding over them, so the step has one program whatever
the candidates, and a `lax.cond` on the step skips the work between intervals. Each candidate
uses the slot's scaling with its own range: scale = amax * margin / max_finite(candidate), from
the same amax (the history's under delayed scaling, the tensor's under current), and 1 under
none; bfloat16 is never scaled. Rounding is to nearest, as `round_to_format`'s bit arithmetic
(tested equal for the run's own format). Per candidate the result is the STATS vector of
counts.py, so the metrics are defined exactly as the run's own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from altgrad_jax.quant.counts import N_STATS
from altgrad_jax.quant.formats import FORMATS
from altgrad_jax.quant.scaling import DELAYED, NONE, scale_for_range

BFLOAT16 = "bfloat16"
DEFAULT_CANDIDATES = (*FORMATS, BFLOAT16)
_BFLOAT16_LIMITS = dict(mantissa_bits=7, max_finite=float(jnp.finfo(jnp.bfloat16).max),
                        min_normal=2.0**-126, min_subnormal=2.0**-133)


def _limits(name: str) -> dict:
    if name == BFLOAT16:
        return _BFLOAT16_LIMITS
    fmt = FORMATS[name]
    return dict(mantissa_bits=fmt.mantissa_bits, max_finite=fmt.max_finite, min_normal=fmt.min_normal,
                min_subnormal=fmt.min_subnormal)


def _round_nearest(magnitude, mantissa_bits, min_subnormal, min_normal):
    """round_to_format's nearest rounding with the format's constants as traced scalars."""
    subnormal = jnp.round(magnitude * (np.float32(1.0) / min_subnormal)) * min_subnormal
    dropped = (np.uint32(23) - mantissa_bits).astype(jnp.uint32)
    bits = lax.bitcast_convert_type(magnitude, jnp.uint32)
    kept_lsb = (bits >> dropped) & np.uint32(1)
    bias = (np.uint32(1) << (dropped - np.uint32(1))) - np.uint32(1) + kept_lsb
    mask = np.uint32(0xFFFFFFFF) << dropped
    normal = lax.bitcast_convert_type((bits + bias) & mask, jnp.float32)
    return jnp.where(magnitude >= min_normal, normal, subnormal)


def _candidate_stats(t, scale, mantissa_bits, min_subnormal, min_normal, max_finite):
    """The STATS vector (counts.py) of rounding t to one candidate at `scale`."""
    inverse = np.float32(1.0) / scale
    magnitude = jnp.abs(t * inverse)
    clipped = jnp.minimum(magnitude, max_finite)
    rounded = jnp.sign(t) * _round_nearest(clipped, mantissa_bits, min_subnormal, min_normal) * scale
    nonzero = t != 0
    one, zero = np.float32(1), np.float32(0)
    amax = jnp.max(jnp.abs(t))
    usable = jnp.isfinite(amax) & (amax > 0)
    normaliser = jnp.where(usable, jnp.exp2(-jnp.floor(jnp.log2(jnp.where(usable, amax, 1.0)))), 1.0)
    error, normalised = (rounded - t) * normaliser, t * normaliser
    return jnp.stack([
        jnp.sum(jnp.where((magnitude > max_finite) & jnp.isfinite(t), one, zero)),
        jnp.sum(jnp.where(nonzero & (rounded == 0), one, zero)),
        jnp.sum(jnp.where(nonzero, one, zero)),
        jnp.float32(t.size),
        jnp.sum(error * error), jnp.sum(normalised * normalised), amax,
    ])


def whatif_stats(tensor, candidates: tuple[str, ...], scaling: str, given_amax, margin: float) -> jax.Array:
    """float32[len(candidates), N_STATS] for one real operand (any shape).

    given_amax: the delayed history's largest finite amax (0 while empty: the tensor's own amax
    is used then, as the run does).
    """
    t = tensor.reshape(-1).astype(jnp.float32)
    limits = [_limits(name) for name in candidates]
    params = {key: jnp.asarray([lim[key] for lim in limits], jnp.uint32 if key == "mantissa_bits" else jnp.float32)
              for key in limits[0]}
    inverse_max = jnp.asarray([np.float32(1.0 / lim["max_finite"]) for lim in limits], jnp.float32)
    amax = jnp.max(jnp.abs(t))
    if scaling == DELAYED:
        amax = jnp.where(jnp.isfinite(given_amax) & (given_amax > 0), given_amax, amax)
    scalable = jnp.asarray([name != BFLOAT16 for name in candidates])

    def one(mantissa_bits, max_finite, inverse_max_finite, min_normal, min_subnormal, can_scale):
        if scaling == NONE:
            scale = jnp.float32(1.0)
        else:
            scale = jnp.where(can_scale, scale_for_range(amax, 1.0, inverse_max_finite, margin), 1.0)
        return _candidate_stats(t, scale, mantissa_bits, min_subnormal, min_normal, max_finite)

    return jax.vmap(one)(params["mantissa_bits"], params["max_finite"], inverse_max, params["min_normal"],
                         params["min_subnormal"], scalable)


def maybe_whatif_stats(active, tensor, candidates, scaling, given_amax, margin) -> jax.Array:
    """whatif_stats when `active` (a traced bool), zeros otherwise; one program either way."""
    shape = (len(candidates), N_STATS)
    return lax.cond(active, lambda t, a: whatif_stats(t, candidates, scaling, a, margin),
                    lambda t, a: jnp.zeros(shape, jnp.float32), tensor, given_amax)

