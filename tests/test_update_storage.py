"""altgrad_jax.update storage, stochastic rounding and encoding against NumPy / ml_dtypes tables."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from altgrad_jax.update import decode, encode, get_storage, leaf_random_bits, stochastic_round, store, tensor_scale, ulp
from altgrad_jax.update._quant import FORMATS
from altgrad_jax.update.encoding import decode_codes, encode_codes
from altgrad_jax.update.storage import pow2_scale

RNG = np.random.default_rng(7)
# jitted once per storage: on the CPU, eager dispatch compiles every op per shape (5x slower here)
ulp = jax.jit(ulp, static_argnums=1)
store = jax.jit(store, static_argnums=(1, 2))
stochastic_round = jax.jit(stochastic_round, static_argnums=1)
pow2_scale = jax.jit(pow2_scale, static_argnums=1)
STORAGES = ["bfloat16", *FORMATS]


def grid(name) -> np.ndarray:
    """Every nonnegative finite value of the storage, sorted, from the bit layout (NumPy only)."""
    if name == "bfloat16":
        values = np.arange(0x7F80, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)  # below inf
    else:
        fmt = FORMATS[name]
        codes = np.arange(128)
        exponent, mantissa = codes >> fmt.mantissa_bits, codes & ((1 << fmt.mantissa_bits) - 1)
        if fmt.exponent_bits == 0:
            exponent, mantissa = np.zeros_like(codes), codes
        values = np.where(exponent == 0, mantissa * fmt.min_subnormal,
                          (1 + mantissa / 2.0**fmt.mantissa_bits) * 2.0 ** (exponent - fmt.bias))
        values = values[values <= fmt.max_finite]
    return np.unique(values[np.isfinite(values)])


@pytest.mark.parametrize("name", list(FORMATS))
def test_pow2_scale_is_the_smallest_power_of_two_that_fits(name):
    fmt = FORMATS[name]
    amax = np.float32(2.0 ** RNG.uniform(-100, 120, 300))
    amax = np.concatenate([amax, np.float32([fmt.max_finite, fmt.max_finite * 2, fmt.max_finite * 2.0001])])
    scale = np.asarray(pow2_scale(jnp.asarray(amax), fmt), np.float64)
    assert np.all(np.log2(scale) == np.round(np.log2(scale)))
    inside = (scale > 2.0**-126) & (scale < 2.0**127)
    assert np.all(amax[inside] <= scale[inside] * fmt.max_finite)
    assert np.all(amax[inside] > scale[inside] / 2 * fmt.max_finite)
    assert [float(pow2_scale(v, fmt)) for v in (0.0, np.inf, np.nan)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", STORAGES)
def test_ulp_is_the_gap_to_the_next_grid_value(name):
    values = grid(name)
    expected = np.diff(values)
    if name == "bfloat16":  # below 2**(7 - 126) the ULP underflows (float32 subnormals flush)
        keep = values[:-1] >= 2.0 ** (7 - 126)
        got = np.asarray(ulp(jnp.asarray(values[:-1][keep], jnp.float32), name, 1.0), np.float64)
        np.testing.assert_array_equal(got, expected[keep])
        return
    scale = 2.0**-5
    got = np.asarray(ulp(jnp.asarray(-values[:-1] * scale, jnp.float32), name, scale), np.float64)
    np.testing.assert_array_equal(got, expected * scale)


@pytest.mark.parametrize("name", STORAGES)
def test_nearest_store_is_the_nearest_grid_value(name):
    x = np.float32(RNG.standard_normal(3000) * 10.0 ** RNG.uniform(-3, 1, 3000))
    stored = store(jnp.asarray(x), name)
    assert stored.dtype == get_storage(name).dtype
    if name == "bfloat16":
        np.testing.assert_array_equal(np.asarray(stored), x.astype(ml_dtypes.bfloat16))
        return
    scale = float(tensor_scale(x, name))
    values = grid(name) * scale
    index = np.abs(np.abs(x)[:, None] - values[None, :]).argmin(axis=1)
    distance_got = np.abs(np.abs(np.asarray(stored, np.float64)) - np.abs(x))
    np.testing.assert_array_equal(distance_got, np.abs(values[index] - np.abs(x)))  # ties may go either way
    assert np.all(np.isin(np.abs(np.asarray(stored, np.float64)), values))


@pytest.mark.parametrize("name", STORAGES)
def test_stochastic_round_picks_a_neighbour_and_is_unbiased(name):
    values = grid(name)
    fmt = None if name == "bfloat16" else FORMATS[name]
    scale = 1.0 if fmt is None else 2.0**3
    if fmt is None:
        values = values[values >= 2.0**-126]  # XLA:CPU flushes float32 (so bfloat16) subnormals
    # points between grid neighbours: the smallest gap, a middle binade, the top; both signs
    picks = [1, len(values) // 2, len(values) - 2]
    n = 20000
    for i, pick in enumerate(picks):
        low, high = values[pick], values[pick + 1]
        fraction = (0.3, 0.77, 0.5)[i]
        x = np.float32((low + fraction * (high - low)) * scale * (-1) ** i)
        bits = jax.random.bits(jax.random.key(i), (n,), jnp.uint32)
        out = np.asarray(stochastic_round(jnp.full((n,), x), fmt or name, scale, bits), np.float64)
        assert set(np.unique(np.abs(out))) <= {low * scale, high * scale}
        sigma = (high - low) * scale * np.sqrt(fraction * (1 - fraction) / n)
        assert abs(out.mean() - x) < 3 * sigma, (name, pick, out.mean(), x, sigma)
    on_grid = np.float32(values[len(values) // 3] * scale)  # grid values stay put
    out = stochastic_round(jnp.full((64,), on_grid), fmt or name, scale, jnp.arange(64, dtype=jnp.uint32) * 67108864)
    np.testing.assert_array_equal(np.asarray(out), on_grid)


def test_stochastic_round_saturates_and_keeps_nan():
    fmt = FORMATS["E4M3"]
    x = jnp.array([1e6, -1e6, jnp.inf, jnp.nan], jnp.float32)
    out = np.asarray(stochastic_round(x, fmt, 1.0, jnp.full((4,), 0xFFFFFFFF, jnp.uint32)))
    np.testing.assert_array_equal(out[:3], [448.0, -448.0, 448.0])
    assert np.isnan(out[3])
    out = np.asarray(stochastic_round(jnp.array([3.4e38, np.nan], jnp.float32), "bfloat16", 1.0,
                                      jnp.full((2,), 0xFFFFFFFF, jnp.uint32)))
    assert out[0] == float(jnp.finfo(jnp.bfloat16).max) and np.isnan(out[1])


def test_random_bits_are_a_pure_function_of_key_step_and_parameter():
    tree = {"h": {0: {"kernel": jnp.zeros((4, 8))}, 1: {"kernel": jnp.zeros((4, 8))}}}
    key = jax.random.key(3)
    draw = jax.jit(leaf_random_bits)
    first = draw(key, 5, tree)
    again = leaf_random_bits(key, 5, tree)  # eager and compiled agree
    np.testing.assert_array_equal(first["h"][0]["kernel"], again["h"][0]["kernel"])
    other_step = draw(key, 6, tree)
    assert np.mean(np.asarray(first["h"][0]["kernel"]) == np.asarray(other_step["h"][0]["kernel"])) < 0.1
    assert np.mean(np.asarray(first["h"][0]["kernel"]) == np.asarray(first["h"][1]["kernel"])) < 0.1
    # a parameter's bits do not depend on which other parameters exist
    alone = leaf_random_bits(key, 5, {"h": {1: {"kernel": jnp.zeros((4, 8))}}})
    np.testing.assert_array_equal(alone["h"][1]["kernel"], first["h"][1]["kernel"])


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.dtype is None])
def test_uint8_codes_round_trip_every_code(name):
    codes = jnp.arange(256, dtype=jnp.uint8)
    values, again = jax.jit(lambda c: (decode_codes(c, FORMATS[name]),
                                       encode_codes(decode_codes(c, FORMATS[name]), FORMATS[name])))(codes)
    np.testing.assert_array_equal(np.unique(np.abs(np.asarray(values, np.float64))), grid(name))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(codes))


@pytest.mark.parametrize("name", ["float32", "bfloat16", "E5M2", "E4M3", "E3M4", "E2M5", "E7M0"])
def test_encode_dtype_and_decode(name):
    x = jnp.asarray(RNG.standard_normal(500) * 1e-3, jnp.float32)
    encoded, decoded, stored = jax.jit(lambda x: (encode(x, name), decode(encode(x, name), name), store(x, name)))(x)
    fmt = get_storage(name).format
    expected_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(name) or fmt.dtype or jnp.uint8
    assert encoded.data.dtype == expected_dtype and encoded.scale.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(stored, np.float32))
