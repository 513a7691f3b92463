"""Stochastic rounding (unbiased, reproducible, a pure function of its key) and the ml_dtypes
cast path, which must give the bit arithmetic's bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altgrad_jax.quant import FORMATS, round_to_format
from tests._reference import assert_bitwise_equal, layout_code_values, ml_dtypes_round

ML_DTYPE_NAMES = [name for name, fmt in FORMATS.items() if fmt.dtype is not None]


@pytest.mark.parametrize("name", ML_DTYPE_NAMES)
def test_dtype_cast_path_gives_the_same_bits_as_the_bit_arithmetic(name):
    fmt = FORMATS[name]
    rng = np.random.default_rng(3)
    magnitudes = np.concatenate([
        np.exp2(rng.uniform(np.log2(fmt.min_subnormal) - 3, np.log2(fmt.max_finite) + 3, 20000)),
        layout_code_values(fmt), [0.0, np.inf, 1e30, fmt.max_finite * 1.01],
    ]).astype(np.float32)
    x = np.concatenate([magnitudes, -magnitudes, [np.nan]]).astype(np.float32)
    by_bits = jax.jit(lambda v: round_to_format(v, name, method="bits"))(x)
    by_dtype = jax.jit(lambda v: round_to_format(v, name, method="dtype"))(x)
    assert_bitwise_equal(by_dtype, by_bits, x)
    assert_bitwise_equal(by_bits, ml_dtypes_round(x, fmt), x)


def _neighbours(value, fmt):
    codes = layout_code_values(fmt)
    below = codes[codes <= value].max()
    above = codes[codes >= value].min()
    return below, above


@pytest.mark.parametrize("name,value", [("E5M2", 1.3), ("E4M3", 0.0123), ("E3M4", 7.77), ("E2M5", 0.05),
                                        ("E7M0", 3.0e-5), ("E0M7", 0.3337), ("E4M3", 0.00071)])
def test_stochastic_rounding_is_unbiased_and_lands_on_the_two_neighbours(name, value):
    fmt = FORMATS[name]
    n = 200_000
    x = jnp.full((n,), np.float32(value))
    rounded = np.asarray(round_to_format(x, name, "stochastic", jax.random.key(0)), np.float64)
    below, above = _neighbours(np.float32(value), fmt)
    assert below < np.float32(value) < above
    assert set(np.unique(rounded)) <= {below, above}
    p_up = (np.float64(np.float32(value)) - below) / (above - below)
    sigma = (above - below) * np.sqrt(p_up * (1 - p_up) / n)
    assert abs(rounded.mean() - np.float32(value)) < 3 * sigma
    negative = np.asarray(round_to_format(-x, name, "stochastic", jax.random.key(0)), np.float64)
    np.testing.assert_array_equal(negative, -rounded)  # the sign is kept, same draws


def test_stochastic_rounding_is_a_pure_function_of_its_key():
    x = jax.random.normal(jax.random.key(1), (4096,)) * 3
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(9), 5), 2)  # step 5, layer 2
    first = round_to_format(x, "E4M3", "stochastic", key)
    again = jax.jit(lambda v, k: round_to_format(v, "E4M3", "stochastic", k))(x, key)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    other_step = round_to_format(x, "E4M3", "stochastic", jax.random.fold_in(jax.random.fold_in(jax.random.key(9), 6), 2))
    other_layer = round_to_format(x, "E4M3", "stochastic", jax.random.fold_in(jax.random.fold_in(jax.random.key(9), 5), 3))
    assert np.mean(np.asarray(first) != np.asarray(other_step)) > 0.1
    assert np.mean(np.asarray(first) != np.asarray(other_layer)) > 0.1


def test_stochastic_rounding_keeps_grid_values_and_saturates():
    fmt = FORMATS["E4M3"]
    grid = layout_code_values(fmt).astype(np.float32)
    out = round_to_format(jnp.asarray(grid), "E4M3", "stochastic", jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(out), grid)
    big = round_to_format(jnp.asarray([1e6, -np.inf, np.nan], jnp.float32), "E4M3", "stochastic", jax.random.key(2))
    assert list(np.asarray(big)[:2]) == [448.0, -448.0] and np.isnan(np.asarray(big)[2])


def test_bad_rounding_arguments_are_refused():
    with pytest.raises(ValueError, match="needs a PRNG key"):
        round_to_format(jnp.ones(3), "E4M3", "stochastic")
    with pytest.raises(ValueError, match="unknown rounding"):
        round_to_format(jnp.ones(3), "E4M3", "upward")
    with pytest.raises(ValueError, match="no ml_dtypes dtype"):
        round_to_format(jnp.ones(3), "E2M5", method="dtype")
