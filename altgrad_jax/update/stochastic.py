"""Stochastic rounding of float32 values to an 8-bit format grid or to bfloat16, from given random bits.

`stochastic_round(x, grid, scale, random_bits)` rounds |x / scale| down or up to its two grid
neighbours with P(up) = (|x/scale| - down) / (up - down), so E[result] = x exactly while x is
inside the grid's range (|x/scale| <= max_finite; beyond, it saturates like the nearest rounding).
The sign is put back afterwards, so rounding is symmetric. Only integer and power-of-two
arithmetic is used, so the result is a pure function of the inputs, bitwise, on every backend.
- Normal range (and all of bfloat16): the `23 - M` dropped mantissa bits of the float32 pattern
  are a fixed-point fraction of the grid gap; adding that many uniform random bits and truncating
  carries into the kept bits with exactly that probability (a carry into the exponent is the
  correct step up to the next binade).
- Below the format's min_normal (E0M7: everywhere): floor(|x| / min_subnormal) plus one when
  24 random bits, read as u in [0, 1), fall below the fractional part. The fraction is exact;
  u has 24 bits, so P(up) is exact whenever the fraction has at most 24 bits (its bias is below
  2**-24 of a gap otherwise).
`leaf_random_bits` draws the bits for a pytree: per leaf from fold_in(fold_in(key, step), id),
where id is the CRC-32 of the leaf's key path (`h/0/mlp/c_fc/kernel`): a pure function of (key,
step, parameter) that does not change when other parameters are added or removed.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from altgrad_jax.tree_names import key_path_name
from altgrad_jax.update._quant import FloatFormat

BFLOAT16 = "bfloat16"
BFLOAT16_MAX = np.float32(jnp.finfo(jnp.bfloat16).max)
_SIGN = np.uint32(0x80000000)


def _with_sign(magnitude: jax.Array, sign_bits: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(lax.bitcast_convert_type(magnitude, jnp.uint32) | sign_bits, jnp.float32)


def _carry_round(magnitude: jax.Array, dropped: int, random_bits: jax.Array) -> jax.Array:
    """Adds `dropped` random bits below the kept mantissa and truncates them (see module note)."""
    bits = lax.bitcast_convert_type(magnitude, jnp.uint32)
    noise = random_bits >> np.uint32(32 - dropped)
    kept = np.uint32((0xFFFFFFFF << dropped) & 0xFFFFFFFF)
    return lax.bitcast_convert_type((bits + noise) & kept, jnp.float32)


def _round_bfloat16(x: jax.Array, random_bits: jax.Array) -> jax.Array:
    sign = lax.bitcast_convert_type(x, jnp.uint32) & _SIGN
    rounded = jnp.minimum(_carry_round(jnp.abs(x), 16, random_bits), BFLOAT16_MAX)
    return jnp.where(jnp.isnan(x), x, _with_sign(rounded, sign))


def _round_format(y: jax.Array, fmt: FloatFormat, random_bits: jax.Array) -> jax.Array:
    sign = lax.bitcast_convert_type(y, jnp.uint32) & _SIGN
    magnitude = jnp.minimum(jnp.abs(y), np.float32(fmt.max_finite))
    steps = magnitude * np.float32(1.0 / fmt.min_subnormal)
    down = jnp.floor(steps)
    u = (random_bits >> np.uint32(8)).astype(jnp.float32) * np.float32(2.0**-24)
    low = (down + jnp.where(u < steps - down, np.float32(1), np.float32(0))) * np.float32(fmt.min_subnormal)
    if fmt.min_normal <= fmt.max_finite:  # E0M7 has no normal range
        normal = _carry_round(magnitude, 23 - fmt.mantissa_bits, random_bits)
        low = jnp.where(magnitude >= np.float32(fmt.min_normal), normal, low)  # NaN stays in `low`
    return _with_sign(low, sign)


def stochastic_round(x, grid: "FloatFormat | str", scale, random_bits: jax.Array) -> jax.Array:
    """float32 `scale * SR(x / scale)` on `grid` (a FloatFormat, or "bfloat16" with scale 1).

    `random_bits`: uint32, same shape as x, uniform. `scale` should be a power of two (then the
    scaling is exact); x / scale is computed as x * (1 / scale), as in the nearest quantizer.
    """
    x = jnp.asarray(x, jnp.float32)
    random_bits = jnp.asarray(random_bits, jnp.uint32)
    if random_bits.shape != x.shape:
        raise ValueError(f"random_bits shape {random_bits.shape} != value shape {x.shape}")
    if isinstance(grid, str):
        if grid != BFLOAT16:
            raise ValueError(f"grid must be a FloatFormat or {BFLOAT16!r}, got {grid!r}")
        return _round_bfloat16(x, random_bits)
    scale = jnp.asarray(scale, jnp.float32)
    return _round_format(x * (np.float32(1.0) / scale), grid, random_bits) * scale


def leaf_id(path_name: str) -> int:
    """The stable 32-bit id folded into the key for the leaf with this key-path name."""
    return zlib.crc32(path_name.encode())


def leaf_random_bits(key: jax.Array, step, tree):
    """uint32 random bits shaped like each leaf of `tree`, from fold_in(fold_in(key, step), leaf_id)."""
    step_key = jax.random.fold_in(key, step)

    def draw(path, leaf):
        leaf_key = jax.random.fold_in(step_key, leaf_id(key_path_name(path)))
        return jax.random.bits(leaf_key, jnp.shape(leaf), jnp.uint32)

    return jax.tree_util.tree_map_with_path(draw, tree)
