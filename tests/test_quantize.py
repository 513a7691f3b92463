"""quantize / round_to_format / quantization_counts against ml_dtypes and a brute-force NumPy table."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from altgrad_jax.quant.formats import FORMATS
from altgrad_jax.quant import quantization_counts, quantize, round_to_format
from tests._reference import assert_bitwise_equal, brute_force_round, layout_code_values, ml_dtypes_round

ML_DTYPE_NAMES = [name for name, fmt in FORMATS.items() if fmt.dtype is not None]
EXOTIC_NAMES = [name for name, fmt in FORMATS.items() if fmt.dtype is None]
RNG = np.random.default_rng(1234)


def probe_values(grid: np.ndarray, fmt) -> np.ndarray:
    """Grid values, every midpoint (tie) and its float32 neighbours, random values over the whole
    range, subnormals, out of range and the special values, with both signs."""
    grid = np.unique(grid[np.isfinite(grid)].astype(np.float64))
    midpoints = (grid[1:] + grid[:-1]) / 2  # exact in float64, and exact in float32 here
    mid32 = midpoints.astype(np.float32)
    assert np.array_equal(mid32.astype(np.float64), midpoints)
    log_span = np.log2(fmt.min_subnormal) - 4, np.log2(fmt.max_finite) + 4
    magnitudes = np.concatenate([
        grid.astype(np.float32),
        mid32,
        np.nextafter(mid32, np.float32(np.inf)),
        np.nextafter(mid32, np.float32(-np.inf)),
        np.exp2(RNG.uniform(*log_span, 4000)).astype(np.float32),
        (RNG.random(1000) * fmt.min_normal).astype(np.float32),  # subnormal range and its edge
        np.float32(fmt.max_finite) * np.array([1.0001, 1.5, 2, 1e6], np.float32),
        [0.0, 1e30, 3.4e38, np.inf, 1e-30],
    ]).astype(np.float32)
    return np.concatenate([magnitudes, -magnitudes, [np.nan]]).astype(np.float32)


@pytest.mark.parametrize("name", ML_DTYPE_NAMES)
def test_ml_dtypes_formats_equal_ml_dtypes_cast_bit_for_bit(name):
    fmt = FORMATS[name]
    all_codes = np.arange(256, dtype=np.uint8).view(fmt.dtype).astype(np.float32)
    x = probe_values(all_codes, fmt)
    expected = ml_dtypes_round(x, fmt)
    assert_bitwise_equal(jax.jit(round_to_format, static_argnums=1)(x, name), expected, x)
    assert_bitwise_equal(quantize(x, name), expected, x)


@pytest.mark.parametrize("name", ML_DTYPE_NAMES)
def test_brute_force_reference_agrees_with_ml_dtypes(name):
    # Validates the reference used for the exotic formats where ml_dtypes is the truth.
    fmt = FORMATS[name]
    x = probe_values(layout_code_values(fmt), fmt)
    assert_bitwise_equal(brute_force_round(x, fmt), ml_dtypes_round(x, fmt), x)


@pytest.mark.parametrize("name", EXOTIC_NAMES)
def test_exotic_formats_equal_brute_force_nearest(name):
    fmt = FORMATS[name]
    codes = layout_code_values(fmt)
    assert codes[-1] == fmt.max_finite and codes[1] == fmt.min_subnormal
    x = probe_values(np.concatenate([codes, -codes]), fmt)
    expected = brute_force_round(x, fmt)
    assert_bitwise_equal(jax.jit(round_to_format, static_argnums=1)(x, name), expected, x)
    assert_bitwise_equal(quantize(x, name), expected, x)


def test_e7m0_ties_go_to_the_even_exponent_field():
    # 1.5 * 2**k lies halfway between 2**k (code k + 63) and 2**(k+1) (code k + 64); 2**-63 lies
    # halfway between 0 (code 0) and 2**-62 (code 1).
    x = np.array([1.5, 3.0, 6.0, 0.75, 2.0**-63, -12.0], np.float32)
    np.testing.assert_array_equal(round_to_format(x, "E7M0"), [2.0, 2.0, 8.0, 0.5, 0.0, -8.0])


def test_values_just_below_min_normal_round_up_to_it():
    for fmt in FORMATS.values():
        if fmt.min_normal > fmt.max_finite:
            continue
        just_below = np.float32(fmt.min_normal - fmt.min_subnormal / 4)
        assert float(round_to_format(just_below, fmt)) == fmt.min_normal, fmt.name


def test_specials_saturate_and_keep_sign():
    x = jnp.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e38, -1e38], jnp.float32)
    for fmt in FORMATS.values():
        out = np.asarray(quantize(x, fmt))
        np.testing.assert_array_equal(out[[0, 1, 5, 6]], [fmt.max_finite, -fmt.max_finite] * 2)
        assert np.isnan(out[2])
        assert out[3] == 0 and not np.signbit(out[3]) and np.signbit(out[4])


def near_scaled_midpoints(fmt, scale) -> np.ndarray:
    """x within a few ulps of scale * (each midpoint and max_finite): x * (1 / scale) lands on,
    above and below the ties and the overflow threshold."""
    grid = layout_code_values(fmt)
    target = (np.append((grid[1:] + grid[:-1]) / 2, grid[-1]) * scale).astype(np.float32)
    steps = np.arange(-3, 4, dtype=np.int32)
    x = (target.view(np.int32)[:, None] + steps[None, :]).ravel().view(np.float32)
    return np.concatenate([x, -x])


@pytest.mark.parametrize("name", ["E4M3", "E2M5", "E7M0"])
def test_scale_multiplies_by_the_float32_reciprocal_then_by_the_scale(name):
    fmt = FORMATS[name]
    scale = np.float32(0.173)
    inverse = np.float32(1) / scale
    x = np.concatenate([(RNG.standard_normal(2000) * 37).astype(np.float32), near_scaled_midpoints(fmt, scale)])
    expected = brute_force_round(x * inverse, fmt) * scale
    by_division = brute_force_round(x / scale, fmt) * scale
    assert np.any(expected != by_division)  # the probe tells the two definitions apart
    np.testing.assert_array_equal(quantize(x, name, scale), expected)
    np.testing.assert_array_equal(jax.jit(quantize, static_argnums=1)(x, name, jnp.float32(scale)), expected)
    np.testing.assert_array_equal(quantize(x, name, 2.0), brute_force_round(x / 2, fmt) * 2)


def test_jit_equals_eager_and_shapes_are_kept():
    x = jnp.asarray(RNG.standard_normal((3, 5, 7)).astype(np.float32) * 100)
    for fmt in (FORMATS["E5M2"], FORMATS["E0M7"], FORMATS["E7M0"]):  # both branches, no branch
        eager = quantize(x, fmt, 0.5)
        jitted = jax.jit(quantize, static_argnums=1)(x, fmt, 0.5)
        assert eager.shape == x.shape and eager.dtype == jnp.float32
        np.testing.assert_array_equal(eager, jitted)
    assert quantize(jnp.float32(0.3), "E4M3").shape == ()
    assert quantize(jnp.zeros((0, 4)), "E5M2").shape == (0, 4)
    bf16 = jnp.asarray([1.0, 3.3], jnp.bfloat16)
    assert quantize(bf16, "E4M3").dtype == jnp.float32


def test_straight_through_gradient_passes_the_cotangent_unquantized():
    x = jnp.asarray(RNG.standard_normal(64).astype(np.float32) * 1000)  # many saturate in E4M3
    cotangent = jnp.asarray(RNG.standard_normal(64).astype(np.float32) * 1.2345)

    def loss(x, scale):
        return jnp.sum(quantize(x, "E4M3", scale) * cotangent)

    grad_x, grad_scale = jax.grad(loss, argnums=(0, 1))(x, jnp.float32(0.37))
    np.testing.assert_array_equal(grad_x, cotangent)
    assert float(grad_scale) == 0.0
    grad_unscaled = jax.jit(jax.grad(lambda x: jnp.sum(quantize(x, "E7M0") * cotangent)))(x)
    np.testing.assert_array_equal(grad_unscaled, cotangent)


def numpy_counts(x, fmt, scale):
    y = x * (np.float32(1) / np.float32(scale))
    overflow = np.isfinite(x) & (np.abs(y) > fmt.max_finite)
    underflow = (x != 0) & (brute_force_round(y, fmt) == 0)
    return overflow.sum(), underflow.sum(), np.count_nonzero(x)


@pytest.mark.parametrize("with_inf", [False, True], ids=["finite", "inf"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_quantization_counts_match_numpy(name, with_inf):
    # Finite inputs take the one-pass packed path; an inf sends them to the exact recount.
    fmt = FORMATS[name]
    scale = np.float32(0.173)
    x = probe_values(layout_code_values(fmt), fmt) * scale
    x = np.concatenate([x, near_scaled_midpoints(fmt, scale)])
    x = x[~np.isnan(x) & (with_inf | np.isfinite(x))]
    x = x[(np.abs(x) >= 2**-125) | (x == 0)]  # XLA flushes float32 subnormals to zero
    expected = numpy_counts(x, fmt, scale)
    assert min(expected) > 0
    counts = jax.jit(quantization_counts, static_argnums=1)(x, name, scale)
    assert all(c.dtype == jnp.float32 and c.shape == () for c in counts)
    assert [float(c) for c in counts] == [float(e) for e in expected]


def largest_not_overflowing(fmt, scale):
    """The largest float32 x with x * (1 / scale) <= max_finite in float32 arithmetic."""
    inverse = np.float32(1) / np.float32(scale)
    x = np.float32(fmt.max_finite / float(inverse))
    while x * inverse > np.float32(fmt.max_finite):
        x = np.nextafter(x, np.float32(0))
    while np.nextafter(x, np.float32(np.inf)) * inverse <= np.float32(fmt.max_finite):
        x = np.nextafter(x, np.float32(np.inf))
    return x


@pytest.mark.parametrize("scale", [1.0, 0.173], ids=["unit", "scaled"])
@pytest.mark.parametrize("name", ["E5M2", "E4M3", "E0M7", "E7M0"])
def test_overflow_count_at_the_edge_of_the_range(name, scale):
    # The overflow pass is skipped when max|x| shows nothing overflows: check both sides of
    # the edge, with the largest magnitude negative or positive, one float32 apart.
    fmt = FORMATS[name]
    at_edge = largest_not_overflowing(fmt, scale)
    above = np.nextafter(at_edge, np.float32(np.inf))
    small = at_edge / np.float32(4)
    for x, overflowing in (([at_edge, -at_edge, small], 0), ([-above, at_edge, small], 1), ([small, above, -above], 2)):
        x = np.asarray(x, np.float32)
        scale_arg = scale if scale == 1.0 else jnp.float32(scale)
        counts = jax.jit(quantization_counts, static_argnums=1)(x, name, scale_arg)
        assert float(counts[0]) == overflowing == numpy_counts(x, fmt, scale)[0]


@pytest.mark.parametrize("case", ["plain", "zeros", "underflow", "overflow", "nan", "inf", "nan+underflow"])
def test_counts_that_skip_their_pass_on_a_large_tensor(case):
    # 2**20 elements: XLA:CPU hands reductions this large to YNNPACK, whose max and min pass
    # over NaN. Each count skips its pass when max|x| and min|x| settle it; every mix of
    # skipped and counted passes must give NumPy's counts.
    fmt, scale = FORMATS["E4M3"], np.float32(0.02)
    x = (RNG.standard_normal(1 << 20).astype(np.float32) + np.float32(3)) * np.float32(1.5)  # |x| >= 0.3-ish
    x[np.abs(x) < 0.25] = 0.25
    where = RNG.choice(x.size, 5, replace=False)
    if "zeros" == case:
        x[where] = 0
    if "underflow" in case:
        x[where[:3]] = np.float32(1e-7)
    if case == "overflow":
        x[where[:2]] = np.float32(1e4)
    if "nan" in case:
        x[where[3:]] = np.nan
    if case == "inf":
        x[where[3:]] = np.inf
    expected = numpy_counts(x, fmt, scale)
    counts = jax.jit(quantization_counts, static_argnums=1)(x, "E4M3", jnp.float32(scale))
    assert [float(c) for c in counts] == [float(e) for e in expected]


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
def test_quantization_counts_with_nan_or_inf_recount_exactly(special):
    x = np.array([special, 1e9, -1e9, 1e-9, 0.0, 1.0, 448.0, 449.0], np.float32)
    counts = quantization_counts(x, "E4M3", 1.0)
    assert [float(c) for c in counts] == [3.0, 1.0, 7.0]  # inf is not an overflow; NaN != 0


def test_finite_x_overflowing_to_inf_when_scaled_counts_as_overflow():
    x = np.array([3e38, -3e38, 1.0, 0.0], np.float32)
    counts = quantization_counts(x, "E5M2", jnp.float32(1e-3))  # x / scale is +-inf
    assert [float(c) for c in counts] == [2.0, 0.0, 3.0]


@pytest.mark.parametrize("size", [128 * 5, 1001, 1])
def test_quantization_counts_blocks_of_one_kind_and_odd_sizes(size):
    # Long runs of one kind (whole vector lanes of overflow, of zeros, ...) and odd sizes.
    fmt = FORMATS["E5M2"]
    kinds = np.array([1e6, 1e-9, 0.0, -3.0, -1e6], np.float32)  # over, under, zero, normal, over
    x = np.repeat(kinds, -(-size // kinds.size))[:size] if size > 1 else kinds[:1]
    x = RNG.permutation(x) if size == 1001 else x
    expected = numpy_counts(x, fmt, 1.0)
    assert [float(c) for c in quantization_counts(x, fmt)] == [float(e) for e in expected]
    if size == 1:
        empty = quantization_counts(np.zeros((0, 3), np.float32), fmt)
        assert [float(c) for c in empty] == [0.0, 0.0, 0.0]


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown float format 'FP9'"):
        quantize(jnp.ones(3), "FP9")
    with pytest.raises(TypeError, match="complex"):
        quantize(jnp.ones(3, jnp.complex64), "E4M3")
