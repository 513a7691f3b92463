"""stored_weight_update (Kahan, stochastic, exact landing) and the ULP steps, against NumPy."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from altgrad_jax.update import store_tree as _store_tree, gradient_preconditioned, stored_weight_update, ulp, ulp_scaled
from altgrad_jax.update._quant import FORMATS

KEY = jax.random.key(11)

# jitted, one compile per storage: eager dispatch compiles every op per shape on the CPU
store_tree = jax.jit(_store_tree, static_argnums=(1, 2))


def nested_params(seed=0, scale=1.0):
    """A tree like the model's, with int keys, kernels and a bias."""
    rng = np.random.default_rng(seed)
    return {
        "h": {0: {"mlp": {"c_fc": {"kernel": jnp.asarray(rng.standard_normal((8, 16)) * scale, jnp.float32),
                                   "bias": jnp.asarray(rng.standard_normal(16) * 0.1 * scale, jnp.float32)}}}},
        "lm_head": {"kernel": jnp.asarray(rng.standard_normal((16, 4)) * scale, jnp.float32)},
    }


def run_updates(tx, params, grads, steps):
    """`steps` updates with fixed grads, applied with optax.apply_updates, in one compiled scan."""

    def body(carry, _):
        params, state = carry
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=steps))(params, tx.init(params))
    return params, state


def test_kahan_carries_small_updates_through_a_bfloat16_weight():
    params, grads, n = {"w": jnp.ones((), jnp.bfloat16)}, {"w": jnp.full((), 1e-4, jnp.float32)}, 10_000
    exact = 1.0 + n * np.float64(np.float32(1e-4))
    bf16_ulp = 2.0**-6  # at 2.0
    plain, _ = run_updates(stored_weight_update(optax.identity(), "bfloat16"), params, grads, n)
    assert plain["w"].dtype == jnp.bfloat16 and float(plain["w"]) == 1.0  # every 1e-4 < half a ULP (2**-8)
    kahan, state = run_updates(stored_weight_update(optax.identity(), "bfloat16", kahan=True), params, grads, n)
    assert kahan["w"].dtype == jnp.bfloat16 and state.compensation["w"].dtype == jnp.float32
    assert abs(float(kahan["w"]) - exact) <= bf16_ulp, (float(kahan["w"]), exact)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "E5M2", "E4M3", "E3M4", "E0M7", "E7M0"])
def test_applied_updates_land_bitwise_on_the_nearest_grid_value(storage):
    params = store_tree(nested_params(), storage)
    grads = nested_params(seed=1)
    # plain SGD, so that the reference update below is bitwise the one inside the compiled step
    new_params, _ = run_updates(stored_weight_update(optax.sgd(0.3), storage), params, grads, 1)
    intended = jax.tree.map(lambda g: np.float32(-0.3) * np.asarray(g), grads)
    for path, new in jax.tree_util.tree_leaves_with_path(new_params):
        old = np.asarray(dict(jax.tree_util.tree_leaves_with_path(params))[path], np.float32)
        target = old + np.asarray(dict(jax.tree_util.tree_leaves_with_path(intended))[path])
        assert new.dtype == (jnp.bfloat16 if storage == "bfloat16" else jnp.float32)
        np.testing.assert_array_equal(np.asarray(new), nearest_numpy(target, storage), err_msg=str(path))


def nearest_numpy(x: np.ndarray, storage: str) -> np.ndarray:
    """Independent reference: ml_dtypes casts, or exhaustive search over the grid for the other formats."""
    if storage == "float32":
        return x
    if storage == "bfloat16":
        return x.astype(ml_dtypes.bfloat16)
    fmt = FORMATS[storage]
    amax = np.abs(x).max()
    scale = 2.0 ** np.ceil(np.log2(amax / fmt.max_finite))
    if fmt.dtype is not None:
        return (np.clip(x / scale, -fmt.max_finite, fmt.max_finite).astype(fmt.dtype).astype(np.float64) * scale
                ).astype(np.float32)
    step = fmt.min_subnormal  # E0M7 is fixed point; E7M0 is powers of two
    if fmt.mantissa_bits == 0:
        grid = np.concatenate([[0.0], 2.0 ** np.arange(1 - fmt.bias, 2**fmt.exponent_bits - fmt.bias)])
    else:
        grid = np.arange(0, fmt.max_finite + step / 2, step)
    magnitude = np.abs(x / scale).astype(np.float64)
    distance = np.abs(magnitude.reshape(-1, 1) - grid[None, :])
    best = distance == distance.min(axis=1, keepdims=True)
    index = np.where(best.sum(axis=1) > 1, np.argmax(best & (np.arange(grid.size) % 2 == 0), axis=1),
                     best.argmax(axis=1))
    return (np.sign(x) * grid[index].reshape(x.shape) * scale).astype(np.float32)


def test_stochastic_update_is_reproducible_and_depends_on_step_key_and_parameter():
    params = store_tree({"a": {"kernel": jnp.ones((64, 64))}, "b": {"kernel": jnp.ones((64, 64))}}, "E5M2")
    grads = jax.tree.map(jnp.ones_like, params)
    tx = stored_weight_update(optax.sgd(0.05), "E5M2", "stochastic", key=KEY)

    @jax.jit
    def two_steps(params, state):
        first, state = tx.update(grads, state, params)
        second, state = tx.update(grads, state, params)
        return first, second

    first, second = two_steps(params, tx.init(params))
    again, _ = two_steps(params, tx.init(params))
    np.testing.assert_array_equal(first["a"]["kernel"], again["a"]["kernel"])  # same key, same bits
    a1, a2, b1 = (np.asarray(t) != 0 for t in (first["a"]["kernel"], second["a"]["kernel"], first["b"]["kernel"]))
    assert abs(a1.mean() - 0.4) < 0.03  # 0.05 is 40% of the gap down to 0.875, the grid value below 1.0
    assert np.mean(a1 == a2) < 0.8 and np.mean(a1 == b1) < 0.8  # other step, other parameter: other bits
    other_key = stored_weight_update(optax.sgd(0.05), "E5M2", "stochastic", key=jax.random.key(12))
    third, _ = jax.jit(other_key.update)(grads, other_key.init(params), params)
    assert np.mean(np.asarray(third["a"]["kernel"] != 0) == a1) < 0.8


@pytest.mark.parametrize("storage", ["E5M2", "E4M3", "bfloat16"])
def test_ulp_scaled_moves_every_weight_by_the_requested_ulps(storage):
    ulps = 3.0
    params = store_tree({"h": {0: {"kernel": jax.random.normal(KEY, (4096,))}}}, storage)
    grads = {"h": {0: {"kernel": jax.random.normal(jax.random.key(5), (4096,))}}}
    new, _ = run_updates(stored_weight_update(ulp_scaled(ulps, storage), storage), params, grads, 1)
    w = np.asarray(params["h"][0]["kernel"], np.float64)
    moved = (np.asarray(new["h"][0]["kernel"], np.float64) - w) * -np.sign(np.asarray(grads["h"][0]["kernel"]))
    spacing = np.asarray(jax.jit(ulp, static_argnums=1)(params["h"][0]["kernel"], storage), np.float64)
    in_ulps = moved / spacing
    # exact unless the step goes up into the next binade, where the grid is twice as coarse
    target = w - ulps * spacing * np.sign(np.asarray(grads["h"][0]["kernel"]))
    same_or_lower = np.abs(target) < 2.0 ** (np.floor(np.log2(np.abs(w))) + 1)
    np.testing.assert_array_equal(in_ulps[same_or_lower], ulps)
    assert np.all(np.abs(in_ulps - ulps) <= 1) and same_or_lower.mean() > 0.5


def test_gradient_preconditioned_adamw_is_close_to_plain_adamw():
    """Multiplying the gradient by the local grid spacing before Adam mostly cancels in m/sqrt(v):
    exactly (up to eps) for weights whose spacing did not change, a few percent overall."""
    params = {"w": jax.random.normal(KEY, (4096,))}
    plain, preconditioned = optax.adamw(1e-3), gradient_preconditioned(1e-3, "E5M2")
    spacing = jax.jit(ulp, static_argnums=1)

    @jax.jit
    def step(params, plain_state, pre_state, t):
        grads = {"w": jax.random.normal(jax.random.fold_in(KEY, t), (4096,)) + 0.3}
        plain_updates, plain_state = plain.update(grads, plain_state, params)
        pre_updates, pre_state = preconditioned.update(grads, pre_state, params)
        return optax.apply_updates(params, plain_updates), plain_state, pre_state, plain_updates["w"], pre_updates["w"]

    plain_state, pre_state = plain.init(params), preconditioned.init(params)
    first_spacing = np.asarray(spacing(params["w"], "E5M2"))
    unchanged = np.ones(4096, bool)
    for t in range(30):
        unchanged &= np.asarray(spacing(params["w"], "E5M2")) == first_spacing
        params, plain_state, pre_state, a, b = step(params, plain_state, pre_state, t)
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.08, t
        assert np.linalg.norm((a - b)[unchanged]) / np.linalg.norm(a[unchanged]) < 1e-3, t
    assert unchanged.mean() < 0.97  # some weights did change binade


def test_everything_composes_under_jit_on_nested_int_key_params():
    from altgrad_jax.update import Encoded, low_precision_moments

    params = store_tree(nested_params(), "bfloat16")
    inner = low_precision_moments(optax.adamw(1e-2, weight_decay=0.1), "E4M3", "bfloat16")
    tx = stored_weight_update(inner, "bfloat16", "stochastic", kahan=True, key=KEY, metrics=True)
    new, state = run_updates(tx, params, nested_params(seed=2), 3)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(new))
    mu = state.inner_state[0].mu["h"][0]["mlp"]["c_fc"]["kernel"]
    assert isinstance(mu, Encoded) and mu.data.dtype == ml_dtypes.float8_e4m3fn
    assert int(state.count) == 3 and sorted(state.metrics)[0] == "update/below_half_ulp"
    assert all(np.all(np.isfinite(np.asarray(v))) for v in state.metrics.values())
    assert not np.array_equal(np.asarray(new["lm_head"]["kernel"]), np.asarray(params["lm_head"]["kernel"]))
