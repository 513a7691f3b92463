"""Fake quantization to the 8-bit formats: float32 in, float32 out, values on the format's grid.

One code path serves every format, working on the float32 bit pattern:
- normal range: add the round-to-nearest-even bias for the dropped mantissa bits and mask them
  (a carry into the exponent is the correct rounding up to the next binade);
- below `min_normal`: round to a multiple of `min_subnormal` with `round` (ties to even), exact
  because both scalings are by powers of two; so values just below `min_normal` round up to it
  when nearer;
- magnitudes are clipped to `max_finite` first (saturation; ml_dtypes casts overflow to inf or
  NaN), and the sign bit is put back last, so -0 and negative values keep their sign.
On these formats a tie in code space is a tie in value space, so "ties to even" means the even
code; for E7M0 (no mantissa) that is the even exponent field, which the bit arithmetic gives.
For E5M2, E4M3 and E3M4 the result equals ml_dtypes' cast of the clipped value bit for bit; it
is several times cheaper than XLA's float8 round trip on the CPU, and `lax.reduce_precision`
flushes the formats' subnormals on the CPU, so neither is used (see benchmarks/bench_quantize.py).

Special values: NaN stays NaN; +-inf saturates to +-max_finite. float32 subnormal inputs
(below 2**-126) quantize to a zero of their sign in every format.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from altgrad_jax.formats import FloatFormat, get_format

_SIGN_BIT = np.uint32(0x80000000)
_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)


def _as_float32(x) -> jax.Array:
    x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"quantize needs a real float or integer array, got dtype {x.dtype}")
    return x.astype(jnp.float32)


def _round_magnitude(magnitude: jax.Array, fmt: FloatFormat) -> jax.Array:
    """Nearest format value (ties to even) of a nonnegative float32 <= max_finite, or NaN."""
    min_subnormal = np.float32(fmt.min_subnormal)
    subnormal = jnp.round(magnitude * np.float32(1.0 / fmt.min_subnormal)) * min_subnormal
    if fmt.min_normal > fmt.max_finite:  # E0M7: fixed point, every code is "subnormal"
        return subnormal
    dropped = 23 - fmt.mantissa_bits
    bits = lax.bitcast_convert_type(magnitude, jnp.uint32)
    kept_lsb = (bits >> dropped) & np.uint32(1)
    rounded = (bits + np.uint32((1 << (dropped - 1)) - 1) + kept_lsb) & np.uint32(
        (0xFFFFFFFF << dropped) & 0xFFFFFFFF
    )
    normal = lax.bitcast_convert_type(rounded, jnp.float32)
    # NaN fails the test and takes the subnormal branch, which keeps it NaN.
    return jnp.where(magnitude >= np.float32(fmt.min_normal), normal, subnormal)


def _round(x: jax.Array, fmt: FloatFormat) -> jax.Array:
    sign = lax.bitcast_convert_type(x, jnp.uint32) & _SIGN_BIT
    magnitude = jnp.minimum(jnp.abs(x), np.float32(fmt.max_finite))
    rounded = _round_magnitude(magnitude, fmt)
    return lax.bitcast_convert_type(
        lax.bitcast_convert_type(rounded, jnp.uint32) | sign, jnp.float32
    )


def round_to_format(x, fmt: "str | FloatFormat") -> jax.Array:
    """q(x): nearest value of `fmt` as float32, ties to even, saturating; no custom gradient."""
    return _round(_as_float32(x), get_format(fmt))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fake_quantize(x, fmt):
    return _round(x, fmt)


def _fake_quantize_fwd(x, fmt):
    return _round(x, fmt), None


def _fake_quantize_bwd(fmt, _, cotangent):
    return (cotangent,)


_fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def _reciprocal(scale: jax.Array) -> jax.Array:
    return np.float32(1.0) / scale


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fake_quantize_scaled(x, scale, fmt):
    return _round(x * _reciprocal(scale), fmt) * scale


def _fake_quantize_scaled_fwd(x, scale, fmt):
    return _fake_quantize_scaled(x, scale, fmt), jnp.zeros_like(scale)


def _fake_quantize_scaled_bwd(fmt, zero_scale, cotangent):
    return cotangent, zero_scale


_fake_quantize_scaled.defvjp(_fake_quantize_scaled_fwd, _fake_quantize_scaled_bwd)


def quantize(x, fmt: "str | FloatFormat", scale=1.0) -> jax.Array:
    """Fake-quantize: float32 `scale * q(x / scale)` with q = round_to_format.

    `x / scale` is computed as `x * (1 / scale)`, the reciprocal rounded once to float32: that
    is what XLA's CPU backend makes of a division by a scalar anyway (it differs from a true
    division by at most one float32 ulp before rounding to the 8-bit grid); spelling it out keeps
    every backend and quantization_counts in agreement bit for bit. `scale` should be positive
    and finite.

    The gradient is straight-through: identity for `x` (the cotangent itself is not quantized),
    zero for `scale`. `fmt` is static (a name or a FloatFormat); `scale` is a float or a traced
    float32 array broadcastable to `x` (normally a scalar). A Python scale of 1.0 skips the
    scaling altogether.
    """
    fmt = get_format(fmt)
    x = _as_float32(x)
    if isinstance(scale, (int, float)) and scale == 1:
        return _fake_quantize(x, fmt)
    return _fake_quantize_scaled(x, jnp.asarray(scale, jnp.float32), fmt)


# Counting. XLA's CPU backend runs a reduction fast (YNNPACK fusion) only when every fused op is
# plain float arithmetic: a compare, select, clamp, integer op or bitcast in the reduced
# expression makes it run 10-60x slower than a sum of squares, and anything full-size the
# reduction shares with other code (even a broadcast constant or |x|) is materialised as a
# temporary first (measured in benchmarks/bench_quantize.py). So the three counts are packed into
# ONE float sum of exact small integers per row of at most 128 elements, unpacked from the row
# sums afterwards, and computed from an opaque copy of x (optimization_barrier) on |x/scale|/2,
# so that neither the values nor the threshold constants coincide with a quantize of x.
_ROWS = (128, 64, 32, 16, 8, 4, 2, 1)  # each field of a row sum <= 128 < 256; row sum < 2**24
_NONZERO_WEIGHT = 65536 + 256  # nonzero also enters the middle field, minus the "above" count


def _above(magnitude: jax.Array, threshold: float, weight: float) -> jax.Array:
    """weight where magnitude > threshold else 0, from two mins: the difference of
    min(m, t+) and min(m, t) is 0 for m <= t and exactly t+ - t (a power of two) for m >= t+,
    where t+ is the next float32 after t; no float32 lies strictly between them."""
    t = np.float32(threshold)
    t_next = np.nextafter(t, np.float32(np.inf))
    step = jnp.minimum(magnitude, t_next) - jnp.minimum(magnitude, t)
    return step * np.float32(weight / (float(t_next) - float(t)))


def _packed_counts(half_magnitude: jax.Array, fmt: FloatFormat):
    """Per element of |x/scale|/2: overflow + 256 * underflow + 65536 * nonzero, as a float
    (nonzero - above_edge is the underflow); NaN for inf and NaN."""
    underflow_edge = fmt.min_subnormal / 2  # the tie at half the smallest subnormal goes to 0
    nonzero = jnp.minimum(half_magnitude * np.float32(2.0**127), np.float32(1.0))
    return (
        _above(half_magnitude, fmt.max_finite / 2, 1.0)
        + _above(half_magnitude, underflow_edge / 2, -256.0)
        + nonzero * np.float32(_NONZERO_WEIGHT)
        + (half_magnitude - half_magnitude)  # NaN for inf and NaN: they take the exact path
    )


def _counts_fast(x: jax.Array, inverse_scale, fmt: FloatFormat):
    x, inverse_scale = lax.optimization_barrier((x, inverse_scale))
    half_magnitude = _magnitude(x, inverse_scale) * np.float32(0.5)  # exact but below 2**-125
    row = next(r for r in _ROWS if x.size % r == 0)
    row_sums = jnp.sum(_packed_counts(half_magnitude, fmt).reshape(-1, row), axis=1)
    nonzero = jnp.floor(row_sums * np.float32(1 / 65536))
    rest = row_sums - nonzero * np.float32(65536)
    underflow = jnp.floor(rest * np.float32(1 / 256))
    overflow = rest - underflow * np.float32(256)
    return jnp.sum(overflow), jnp.sum(underflow), jnp.sum(nonzero)


def _magnitude(x: jax.Array, inverse_scale) -> jax.Array:
    return jnp.abs(x if inverse_scale is None else x * inverse_scale).reshape(-1)


def _counts_exact(x: jax.Array, inverse_scale, fmt: FloatFormat):
    """Compare-based counts that stay right with inf and NaN; slow on the CPU, so run only then."""

    def count(mask):
        return jnp.sum(jnp.where(mask, np.float32(1.0), np.float32(0.0)))

    magnitude = _magnitude(x, inverse_scale)
    finite_x = jnp.isfinite(x).reshape(-1)
    return (
        count((magnitude > np.float32(fmt.max_finite)) & finite_x),
        count((magnitude > 0) & (magnitude <= np.float32(fmt.min_subnormal / 2))),
        count(magnitude != 0),  # NaN counts as nonzero, as in np.count_nonzero
    )


def quantization_counts(x, fmt: "str | FloatFormat", scale=1.0):
    """(n_overflow, n_underflow, n_nonzero) of fake-quantizing x with `scale`, float32 scalars.

    overflow: finite x with |x/scale| > max_finite (saturated by quantize);
    underflow: x != 0 whose q(x/scale) is 0 (|x/scale| <= min_subnormal / 2);
    nonzero: x != 0 (NaN included). x / scale is x * (1 / scale), exactly as in quantize.
    |x/scale| below 2**-125 counts as zero (XLA's CPU code flushes float32 subnormals).
    Counts are exact up to 2**24 (float32 integers).
    The common path is one float-only pass over x; an exact compare-based recount runs instead
    (lax.cond) only when x / scale holds an inf or NaN.
    """
    fmt = get_format(fmt)
    x = _as_float32(x)
    if x.size == 0:
        zero = jnp.zeros((), jnp.float32)
        return zero, zero, zero
    unit_scale = isinstance(scale, (int, float)) and scale == 1
    inverse_scale = None if unit_scale else _reciprocal(jnp.asarray(scale, jnp.float32))
    fast = _counts_fast(x, inverse_scale, fmt)
    return lax.cond(
        jnp.isnan(fast[2]),
        lambda x, inverse_scale: _counts_exact(x, inverse_scale, fmt),
        lambda x, inverse_scale: fast,
        x,
        inverse_scale,
    )
