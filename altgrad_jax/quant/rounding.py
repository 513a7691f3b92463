"""Rounding to an 8-bit grid: nearest (ties to even) or stochastic, saturating, float32 in and out.

Two implementations of round-to-nearest give the same bits:
- bit arithmetic on the float32 pattern (every format; the CPU default): in the normal range add
  the round-to-nearest-even bias for the dropped mantissa bits and mask them (a carry into the
  exponent is the correct rounding up to the next binade); below `min_normal` round to a
  multiple of `min_subnormal`. `lax.reduce_precision` flushes the formats' subnormals on the
  CPU, so it is not used.
- the ml_dtypes float8 cast after the saturating clip (E5M2, E4M3, E3M4 on GPU and TPU, where
  the convert is one instruction).
Magnitudes are clipped to `max_finite` first (the float8 casts overflow to inf or NaN instead),
NaN stays NaN, +-inf saturates, and the sign is kept (-0 too). float32 subnormal inputs (below
2**-126) become a zero of their sign.

Stochastic rounding rounds |x| up to the next grid value with probability equal to its distance
from the value below, divided by the gap: random bits are added below the kept mantissa bits
before truncating (normal range), or a uniform [0, 1) before flooring (subnormal range). It is
unbiased up to the 24-bit resolution of the random offset, and a pure function of its key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from altgrad_jax.quant.formats import FloatFormat, get_format

NEAREST, STOCHASTIC = "nearest", "stochastic"
ROUNDINGS = (NEAREST, STOCHASTIC)
_SIGN_BIT = np.uint32(0x80000000)


def _as_float32(x) -> jax.Array:
    x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"quantize needs a real float or integer array, got dtype {x.dtype}")
    return x.astype(jnp.float32)


def _truncate(bits: jax.Array, dropped: int) -> jax.Array:
    return lax.bitcast_convert_type(bits & np.uint32((0xFFFFFFFF << dropped) & 0xFFFFFFFF), jnp.float32)


def _round_magnitude(magnitude: jax.Array, fmt: FloatFormat, random_bits: jax.Array | None) -> jax.Array:
    """Grid value of a nonnegative float32 <= max_finite (NaN stays NaN): nearest when
    `random_bits` is None, else stochastic with those uint32 bits."""
    inverse_step = np.float32(1.0 / fmt.min_subnormal)
    if random_bits is None:
        steps = jnp.round(magnitude * inverse_step)
    else:
        uniform = (random_bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)
        steps = jnp.floor(magnitude * inverse_step + uniform)
    subnormal = steps * np.float32(fmt.min_subnormal)
    if fmt.min_normal > fmt.max_finite:  # E0M7: fixed point, every code is "subnormal"
        return subnormal
    dropped = 23 - fmt.mantissa_bits
    bits = lax.bitcast_convert_type(magnitude, jnp.uint32)
    if random_bits is None:
        kept_lsb = (bits >> dropped) & np.uint32(1)
        normal = _truncate(bits + np.uint32((1 << (dropped - 1)) - 1) + kept_lsb, dropped)
    else:
        normal = _truncate(bits + (random_bits >> (32 - dropped)), dropped)
    # NaN fails the test and takes the subnormal branch, which keeps it NaN.
    return jnp.where(magnitude >= np.float32(fmt.min_normal), normal, subnormal)


def _round_bits(x: jax.Array, fmt: FloatFormat, random_bits: jax.Array | None) -> jax.Array:
    sign = lax.bitcast_convert_type(x, jnp.uint32) & _SIGN_BIT
    magnitude = jnp.minimum(jnp.abs(x), np.float32(fmt.max_finite))
    rounded = _round_magnitude(magnitude, fmt, random_bits)
    return lax.bitcast_convert_type(lax.bitcast_convert_type(rounded, jnp.uint32) | sign, jnp.float32)


def _round_dtype(x: jax.Array, fmt: FloatFormat) -> jax.Array:
    limit = np.float32(fmt.max_finite)
    return jnp.minimum(jnp.maximum(x, -limit), limit).astype(fmt.dtype).astype(jnp.float32)


def default_method(fmt: FloatFormat) -> str:
    """"dtype" on accelerators for the formats ml_dtypes has, "bits" otherwise."""
    return "dtype" if fmt.dtype is not None and jax.default_backend() != "cpu" else "bits"


def round_to_format(x, fmt: "str | FloatFormat", rounding: str = NEAREST, key: jax.Array | None = None,
                    *, method: str | None = None) -> jax.Array:
    """q(x): a value of `fmt` as float32, saturating; no custom gradient.

    rounding: "nearest" (ties to even) or "stochastic" (needs `key`, a jax.random key).
    method: "bits" or "dtype" (the ml_dtypes cast; nearest only); None picks `default_method`.
    """
    fmt, x = get_format(fmt), _as_float32(x)
    if rounding == STOCHASTIC:
        if key is None:
            raise ValueError("stochastic rounding needs a PRNG key")
        return _round_bits(x, fmt, jax.random.bits(key, x.shape, jnp.uint32))
    if rounding != NEAREST:
        raise ValueError(f"unknown rounding {rounding!r}; valid: {', '.join(ROUNDINGS)}")
    method = method or default_method(fmt)
    if method == "dtype":
        if fmt.dtype is None:
            raise ValueError(f"{fmt.name} has no ml_dtypes dtype; use method='bits'")
        return _round_dtype(x, fmt)
    if method != "bits":
        raise ValueError(f"unknown rounding method {method!r}; valid: bits, dtype")
    return _round_bits(x, fmt, None)


def reciprocal(scale) -> jax.Array:
    """1 / scale in float32: x / scale is computed as x * (1 / scale) everywhere, which is what
    XLA's CPU backend makes of a division by a scalar anyway, so every path rounds alike."""
    return np.float32(1.0) / jnp.asarray(scale, jnp.float32)


def scaled_round(x, fmt, scale, rounding: str = NEAREST, key=None) -> jax.Array:
    """scale * q(x * (1 / scale)) without a custom gradient; a Python scale of 1 skips the scaling."""
    x = _as_float32(x)
    if isinstance(scale, (int, float)) and scale == 1:
        return round_to_format(x, fmt, rounding, key)
    scale = jnp.asarray(scale, jnp.float32)
    return round_to_format(x * reciprocal(scale), fmt, rounding, key) * scale


@jax.custom_vjp
def straight_through(x: jax.Array, rounded: jax.Array) -> jax.Array:
    """`rounded` in the forward pass; the cotangent goes to `x` unchanged (not quantized)."""
    return rounded


def _straight_through_fwd(x, rounded):
    return rounded, None


def _straight_through_bwd(_, cotangent):
    return cotangent, jnp.zeros_like(cotangent)


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def quantize(x, fmt: "str | FloatFormat", scale=1.0, rounding: str = NEAREST, key=None) -> jax.Array:
    """Fake-quantize: float32 `scale * q(x / scale)` with a straight-through gradient.

    The gradient is the identity for `x` (the cotangent itself is not quantized) and zero for
    `scale`. `scale` should be positive and finite (a float or a float32 array broadcastable to
    x, normally a scalar).
    """
    x = _as_float32(x)
    if not isinstance(scale, (int, float)):
        scale = lax.stop_gradient(jnp.asarray(scale, jnp.float32))
    return straight_through(x, scaled_round(lax.stop_gradient(x), fmt, scale, rounding, key))
