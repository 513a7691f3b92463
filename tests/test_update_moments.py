"""low_precision_moments: the state holds the declared dtype, and the update uses the decoded moments."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from altgrad_jax.update import Encoded, decode, low_precision_moments
from altgrad_jax.update._quant import FORMATS
from altgrad_jax.update.encoding import decode_codes

B1, B2, EPS, LR = 0.9, 0.95, 1e-8, 1e-2
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "E5M2": ml_dtypes.float8_e5m2,
          "E4M3": ml_dtypes.float8_e4m3fn, "E3M4": ml_dtypes.float8_e3m4, "E2M5": np.uint8, "E6M1": np.uint8}


def adam_state(state) -> optax.ScaleByAdamState:
    return state[0]  # optax.adamw = chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)


def leaf(tree, path):
    """The leaf (an Encoded counts as one) of `tree` at key path `path`."""
    return dict(jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, Encoded)))[path]


def decoded_numpy(encoded: Encoded, name: str) -> np.ndarray:
    """float64 moments from the stored bytes, decoded without the library's decode for ml_dtypes."""
    data = np.asarray(encoded.data)
    if name in ("float32", "bfloat16"):
        return data.astype(np.float64)
    if FORMATS[name].dtype is not None:
        return data.astype(np.float64) * float(encoded.scale)
    return np.asarray(decode_codes(jnp.asarray(data), FORMATS[name]), np.float64) * float(encoded.scale)


@pytest.mark.parametrize("mu_name,nu_name", [("bfloat16", None), ("E4M3", "E5M2"), ("E3M4", "E2M5")])
def test_moments_round_trip_in_the_declared_dtype_and_are_what_adam_uses(mu_name, nu_name):
    nu_name_or_mu = nu_name or mu_name
    rng = np.random.default_rng(3)
    params = {"h": {0: {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)}},
              "bias": jnp.asarray(rng.standard_normal(5), jnp.float32)}
    tx = low_precision_moments(optax.adamw(LR, B1, B2, EPS, weight_decay=0.0), mu_name, nu_name)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 10.0 ** -step, jnp.float32), params)
        before = adam_state(state)
        updates, state = update(grads, state, params)
        after = adam_state(state)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            mu_before, nu_before, mu_after, nu_after = (
                leaf(tree, path) for tree in (before.mu, before.nu, after.mu, after.nu))
            for encoded, name in ((mu_after, mu_name), (nu_after, nu_name_or_mu)):
                assert isinstance(encoded, Encoded) and encoded.data.dtype == DTYPES[name]
                assert encoded.scale.dtype == jnp.float32 and encoded.scale.shape == ()
            # Adam from the decoded stored moments, in float64
            g = np.asarray(g, np.float64)
            mu = B1 * decoded_numpy(mu_before, mu_name) + (1 - B1) * g
            nu = B2 * decoded_numpy(nu_before, nu_name_or_mu) + (1 - B2) * g * g
            t = step + 1
            expected = -LR * (mu / (1 - B1**t)) / (np.sqrt(nu / (1 - B2**t)) + EPS)
            got = np.asarray(leaf(updates, path), np.float64)
            np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-12)
            # and the new state holds those moments rounded to the grid
            np.testing.assert_array_equal(np.asarray(decode(mu_after, mu_name)), decoded_numpy(mu_after, mu_name))
            assert np.max(np.abs(decoded_numpy(mu_after, mu_name) - mu)) <= relative_gap(mu_name) * np.abs(mu).max()
            assert np.max(np.abs(decoded_numpy(nu_after, nu_name_or_mu) - nu)) <= relative_gap(nu_name_or_mu) * nu.max()
    assert int(adam_state(state).count) == 3


def relative_gap(name: str) -> float:
    """A bound on |rounded - exact| / amax: half the grid spacing at the amax, at most 2**-M * amax / 2
    (the spacing below it, subnormals included, is smaller), doubled for slack."""
    mantissa_bits = {"float32": 23, "bfloat16": 7}.get(name) or FORMATS[name].mantissa_bits
    return 2.0 ** -mantissa_bits
