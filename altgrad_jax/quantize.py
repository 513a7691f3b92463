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


# Counting. XLA's CPU backend runs a full reduction fast (YNNPACK fusion) only when every fused
# op is plain float arithmetic: a compare, select, clamp, integer op or bitcast in the reduced
# expression makes it 10-60x slower than a sum of squares, so does a partial (row) reduction,
# and anything full-size a reduction shares with other code (|x|, x * (1/scale), even a
# broadcast constant) is first materialised as a temporary (measured in
# benchmarks/bench_quantize.py). So each count is its own full float sum of exact 0/1 values
# (exact up to 2**24 elements), over its own opaque copy of x (optimization_barrier), on |x/scale|
# times its own power of two, so that neither values nor constants coincide with each other or
# with a quantize of the same x.


def _count_above(magnitude: jax.Array, threshold: float) -> jax.Array:
    """How many magnitudes exceed the threshold, from two mins: min(m, t+) - min(m, t) is 0 for
    m <= t and exactly t+ - t (a power of two) for m >= t+, where t+ is the next float32 after
    t (no float32 lies strictly between them); the sum of these is exact, then rescaled."""
    t = np.float32(threshold)
    t_next = np.nextafter(t, np.float32(np.inf))
    steps = jnp.sum(jnp.minimum(magnitude, t_next) - jnp.minimum(magnitude, t))
    return steps * np.float32(1.0 / (float(t_next) - float(t)))


def _counts_fast(x: jax.Array, inverse_scale, fmt: FloatFormat):
    """(overflow, underflow, nonzero) float sums; nonzero is NaN when x holds an inf or NaN."""
    (x_nonzero, _), (x_over, inv_over), (x_above, inv_above) = lax.optimization_barrier(
        ((x, inverse_scale),) * 3
    )
    magnitude = jnp.abs(x_nonzero)  # x != 0 does not depend on the scale
    nonzero = jnp.sum(
        jnp.minimum(magnitude * np.float32(2.0**127), np.float32(1.0))
        + (magnitude - magnitude)  # NaN for inf and NaN: they take the exact path
    )
    # Scaling by 1/2 and 1/4 is exact (it only flushes |x/scale| < 2**-124, far below both).
    overflow = _count_above(_magnitude(x_over, _times(inv_over, 0.5)), fmt.max_finite / 2)
    # Half the smallest subnormal is the tie that rounds to 0, so it still underflows.
    above_edge = _count_above(
        _magnitude(x_above, _times(inv_above, 0.25)), fmt.min_subnormal / 2 / 4
    )
    return overflow, nonzero - above_edge, nonzero


def _times(inverse_scale, factor: float):
    """inverse_scale * factor as one scalar (a power-of-two factor keeps it exact)."""
    if inverse_scale is None:
        return jnp.float32(factor)
    return inverse_scale * np.float32(factor)


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
        count(x.reshape(-1) != 0),  # NaN counts as nonzero, as in np.count_nonzero
    )


def quantization_counts(x, fmt: "str | FloatFormat", scale=1.0):
    """(n_overflow, n_underflow, n_nonzero) of fake-quantizing x with `scale`, float32 scalars.

    overflow: finite x with |x/scale| > max_finite (saturated by quantize);
    underflow: x != 0 whose q(x/scale) is 0 (|x/scale| <= min_subnormal / 2);
    nonzero: x != 0 (NaN included). x / scale is x * (1 / scale), exactly as in quantize.
    float32 subnormals (|x| < 2**-126) count as zero: XLA's CPU code flushes them.
    Counts are exact up to 2**24 elements (float32 integers).
    The common path is three fast float-only sums over x; an exact compare-based recount runs
    instead (lax.cond) only when x holds an inf or NaN (or scale is 0 or not finite).
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
        jnp.isnan(fast[0] + fast[1] + fast[2]),
        lambda x, inverse_scale: _counts_exact(x, inverse_scale, fmt),
        lambda x, inverse_scale: fast,
        x,
        inverse_scale,
    )
