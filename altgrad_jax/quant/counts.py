"""What one quantization did to a tensor: overflow, underflow and relative error, as exact sums.

`tensor_stats` is the vector every quantized operand reports (see STATS); `quantization_counts`
the three counts it is built on.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from altgrad_jax.quant.formats import FloatFormat, get_format
from altgrad_jax.quant.rounding import _as_float32, reciprocal


# Counting. XLA's CPU backend runs a full reduction fast (YNNPACK fusion) only when every fused
# op is plain float arithmetic: a compare, select, clamp, integer op or bitcast in the reduced
# expression makes it 10-60x slower than a sum of squares, so does a partial (row) reduction,
# and anything full-size a reduction shares with other code (|x|, x * (1/scale), even a
# broadcast constant) is first materialised as a temporary (measured in
# benchmarks/bench_quantize.py). So each count is its own full float sum of exact 0/1 values
# (exact up to 2**24 elements), over its own opaque copy of x (optimization_barrier), on |x/scale|
# times its own power of two, so that neither values nor constants coincide with each other or
# with a quantize of the same x. A count that max|x| and min|x| settle (two cheap reductions)
# skips its pass under lax.cond, and one cond returns all three when they settle every count:
# with delayed or current scaling most operands have no zero, no overflow and no underflow.
# Small research step, A/B rounds (benchmarks/README.md): about 3% faster for the overflow skip,
# 5% for the other two, 5% for one cond per operand in place of four (conds are not free).


def _count_above(magnitude: jax.Array, threshold: float) -> jax.Array:
    """How many magnitudes exceed the threshold, from two mins: min(m, t+) - min(m, t) is 0 for
    m <= t and exactly t+ - t (a power of two) for m >= t+, where t+ is the next float32 after
    t (no float32 lies strictly between them); the sum of these is exact, then rescaled. NaN
    when a magnitude is inf or NaN (YNNPACK's min passes over NaN, so m - m says it)."""
    t = np.float32(threshold)
    t_next = np.nextafter(t, np.float32(np.inf))
    steps = jnp.sum(jnp.minimum(magnitude, t_next) - jnp.minimum(magnitude, t) + (magnitude - magnitude))
    return steps * np.float32(1.0 / (float(t_next) - float(t)))


def _nothing_overflows(amax, inverse_scale, fmt: FloatFormat):
    """max|x| * |c| within the overflow edge: no |x * c| exceeds it (rounding is monotone)."""
    return amax * jnp.abs(_times(inverse_scale, 0.5)) <= np.float32(fmt.max_finite / 2)


def _nothing_underflows(amax, amin, inverse_scale, fmt: FloatFormat):
    """min|x| * |c| above the underflow edge, so no x is zero or underflows; max|x| finite."""
    return jnp.isfinite(amax) & (amin * jnp.abs(_times(inverse_scale, 0.25)) > np.float32(fmt.min_subnormal / 8))


def _counts_fast(x: jax.Array, inverse_scale, fmt: FloatFormat, amax, amin):
    """(overflow, underflow, nonzero) float sums, each skipping its pass over x when amax = max|x|
    and amin = min|x| already give it: no zero means nonzero = size, no overflow or underflow as
    above. A count that does run is NaN when x holds an inf or NaN, which sends the caller to the
    exact recount. An inf keeps amax from being finite, so nonzero runs. A NaN that every pass
    skips (YNNPACK's max and min pass over NaN) changes no count: it is not zero, nor an
    overflow or underflow (tests/test_quantize.py checks each mix on a tensor that large)."""
    (x_nonzero, _), (x_over, inv_over), (x_above, inv_above) = lax.optimization_barrier(
        ((x, inverse_scale),) * 3
    )
    size = np.float32(x.size)
    nonzero = lax.cond(jnp.isfinite(amax) & (amin > 0), lambda x: size, _count_nonzero, x_nonzero)
    # Scaling by 1/2 and 1/4 is exact (it only flushes |x/scale| < 2**-124, far below both).
    overflow = lax.cond(
        _nothing_overflows(amax, inv_over, fmt), lambda x, c: jnp.zeros((), jnp.float32),
        lambda x, c: _count_above(_magnitude(x, _times(c, 0.5)), fmt.max_finite / 2), x_over, inv_over)
    # Half the smallest subnormal is the tie that rounds to 0, so it still underflows.
    above_edge = lax.cond(
        _nothing_underflows(amax, amin, inv_above, fmt), lambda x, c: size,
        lambda x, c: _count_above(_magnitude(x, _times(c, 0.25)), fmt.min_subnormal / 2 / 4), x_above, inv_above)
    return overflow, nonzero - above_edge, nonzero


def _count_nonzero(x):
    """Elements != 0 as a float sum; NaN when x holds an inf or NaN."""
    magnitude = jnp.abs(x)  # x != 0 does not depend on the scale
    return jnp.sum(
        jnp.minimum(magnitude * np.float32(2.0**127), np.float32(1.0))
        + (magnitude - magnitude)  # NaN for inf and NaN: they take the exact path
    )


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
    The common path is max|x| and min|x|, then a fast float-only sum over x for each count they
    do not settle; an exact compare-based recount runs instead (lax.cond) only when x holds an
    inf or NaN that a sum saw (or scale is 0 or not finite).
    """
    fmt = get_format(fmt)
    x = _as_float32(x)
    if x.size == 0:
        zero = jnp.zeros((), jnp.float32)
        return zero, zero, zero
    unit_scale = isinstance(scale, (int, float)) and scale == 1
    inverse_scale = None if unit_scale else reciprocal(scale)
    amax = jnp.max(jnp.abs(x))  # the amax tensor_stats and current scaling compute (XLA merges them)
    amin = jnp.min(jnp.abs(lax.optimization_barrier(x)))  # its own copy: a shared |x| is materialised
    zero = jnp.zeros((), jnp.float32)

    def count(x, inverse_scale):
        fast = _counts_fast(x, inverse_scale, fmt, amax, amin)
        return lax.cond(jnp.isnan(fast[0] + fast[1] + fast[2]),
                        lambda x, inverse_scale: _counts_exact(x, inverse_scale, fmt),
                        lambda x, inverse_scale: fast, x, inverse_scale)

    # One cond for the common case where max|x| and min|x| settle all three counts.
    settled = _nothing_overflows(amax, inverse_scale, fmt) & _nothing_underflows(amax, amin, inverse_scale, fmt)
    return lax.cond(settled, lambda x, inverse_scale: (zero, zero, np.float32(x.size)), count, x, inverse_scale)


STATS = ("overflow", "underflow", "nonzero", "elements", "err_sq", "norm_sq", "amax")
N_STATS = len(STATS)


def tensor_stats(t: jax.Array, rounded: jax.Array, fmt, scale, stochastic: bool) -> jax.Array:
    """float32[N_STATS] of quantizing `t` to `rounded` (= scale * q(t / scale)), named by STATS.

    overflow: finite elements with |t / scale| > max_finite (saturated);
    underflow: non-zero elements whose rounded value is 0 (for nearest rounding, |t / scale| <=
        min_subnormal / 2; under stochastic rounding counted on `rounded` itself);
    nonzero, elements: counts; err_sq, norm_sq: sum (rounded - t)^2 and sum t^2, both times the
        same factor (about 1 / amax^2, so that neither underflows nor overflows float32):
        err_sq / norm_sq is the squared relative error ||rounded - t||^2 / ||t||^2;
    amax: max |t| (what delayed scaling records).
    """
    t = t.astype(jnp.float32)
    overflow, underflow, nonzero = quantization_counts(t, fmt, scale)
    if stochastic:
        underflow = jnp.sum(jnp.where((rounded == 0) & (t != 0), np.float32(1), np.float32(0)))
    amax = jnp.max(jnp.abs(t))
    usable = jnp.isfinite(amax) & (amax > 0)
    normaliser = jnp.where(usable, jnp.exp2(-jnp.floor(jnp.log2(jnp.where(usable, amax, 1.0)))), 1.0)
    # Two opaque copies of the scalar, so that the two sums do not share (and XLA does not
    # materialise) one full-size broadcast of it.
    error_normaliser, norm_normaliser = lax.optimization_barrier((normaliser, normaliser))
    error = (rounded - t) * error_normaliser
    normalised = t * norm_normaliser
    return jnp.stack([overflow, underflow, nonzero, jnp.float32(t.size),
                      jnp.sum(error * error), jnp.sum(normalised * normalised), amax]).astype(jnp.float32)
