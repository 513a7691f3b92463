"""update/* metrics against a NumPy recomputation on a tiny tree, and the copy kept in the state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from altgrad_jax.update import store_tree as _store_tree, stored_weight_update, update_metrics
from altgrad_jax.update._quant import FORMATS

# jitted, one compile per storage: eager dispatch compiles every op per shape on the CPU
store_tree = jax.jit(_store_tree, static_argnums=(1, 2))


def tiny_tree(rng, scale=1.0):
    return {"h": {0: {"mlp": {"c_fc": {"kernel": rng.standard_normal((4, 6)) * scale, "bias": rng.standard_normal(6)}}},
                  1: {"mlp": {"c_fc": {"kernel": rng.standard_normal((6, 3)) * scale}}}},
            "lm_head": {"kernel": rng.standard_normal((3, 5)) * scale}}


def numpy_spacing(w: np.ndarray, storage: str, scale: float) -> np.ndarray:
    """Gap to the next larger grid magnitude: 2**(floor(log2|w/s|) - M) * s, min_subnormal * s below."""
    if storage == "bfloat16":
        exponent = np.floor(np.log2(np.abs(w), where=w != 0, out=np.full(w.shape, -1000.0)))
        return np.where(exponent >= -126 + 7, 2.0 ** (exponent - 7), 0.0)
    fmt = FORMATS[storage]
    magnitude = np.abs(w) / scale
    exponent = np.floor(np.log2(magnitude, where=magnitude > 0, out=np.full(w.shape, -1000.0)))
    return np.where(magnitude >= fmt.min_normal, 2.0 ** (exponent - fmt.mantissa_bits), fmt.min_subnormal) * scale


def numpy_metrics(before, after, intended, storage, names):
    out, totals = {}, np.zeros(5)
    for name, w, a, u in zip(names, before, after, intended):
        w, u = w.astype(np.float64), u.astype(np.float64)
        applied = a.astype(np.float64) - w
        scale = 1.0
        if storage != "bfloat16":
            scale = 2.0 ** np.ceil(np.log2(np.abs(w + u).max() / FORMATS[storage].max_finite))
        sums = np.array([np.sum(np.abs(u) < numpy_spacing(w, storage, scale) / 2), u.size,
                         applied @ u, applied @ applied, u @ u])
        totals += sums
        for key, value in zip(("below_half_ulp", "cos", "norm_ratio"), ratios(sums)):
            out[f"update/{key}/{name}"] = value
    for key, value in zip(("below_half_ulp", "cos", "norm_ratio"), ratios(totals)):
        out[f"update/{key}"] = value
    return out


def ratios(sums):
    below, size, dot, aa, uu = sums
    return below / size, dot / np.sqrt(aa * uu), np.sqrt(aa / uu)


@pytest.mark.parametrize("storage", ["E5M2", "bfloat16"])
def test_update_metrics_equal_a_numpy_recomputation(storage):
    rng = np.random.default_rng(5)
    before = store_tree(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tiny_tree(rng)), storage)
    # mixed sizes: some updates far below half a ULP, some above
    intended = jax.tree.map(lambda x: jnp.asarray(x * 10.0 ** rng.uniform(-4, -0.5, x.shape), jnp.float32),
                            tiny_tree(rng))
    after = store_tree(jax.tree.map(lambda w, u: w.astype(jnp.float32) + u, before, intended), storage)
    got = jax.jit(lambda b, a, u: update_metrics(b, a, u, storage))(before, after, intended)
    names = ["h/0/mlp/c_fc", "h/1/mlp/c_fc", "lm_head"]
    leaves = [("h", 0, "mlp", "c_fc", "kernel"), ("h", 1, "mlp", "c_fc", "kernel"), ("lm_head", "kernel")]

    def pick(tree, path):
        for key in path:
            tree = tree[key]
        return np.asarray(jnp.asarray(tree, jnp.float32), np.float64).ravel()  # bfloat16 -> float32 is exact

    expected = numpy_metrics(*[[pick(t, p) for p in leaves] for t in (before, after, intended)], storage, names)
    assert set(got) == set(expected)  # the bias is not a kernel: not reported
    for name, value in expected.items():
        np.testing.assert_allclose(float(got[name]), value, rtol=1e-5, err_msg=name)
    assert 0.05 < expected["update/below_half_ulp"] < 0.95  # the case is not degenerate
    # pooled values are global, not means of the per-layer ones
    assert abs(expected["update/cos"] - np.mean([expected[f"update/cos/{n}"] for n in names])) > 1e-6


def test_selected_layers_and_zero_updates():
    params = {"a": {"kernel": jnp.ones((3,))}, "w": jnp.ones((2,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    got = jax.jit(lambda p, z: update_metrics(p, p, z, "E4M3", layer_names=["a", "w"]))(params, zeros)
    assert sorted(got) == sorted(f"update/{k}{s}" for k in ("below_half_ulp", "cos", "norm_ratio")
                                 for s in ("", "/a", "/w"))
    assert float(got["update/cos"]) == 0.0 and float(got["update/norm_ratio"]) == 0.0  # 0 where a norm is 0
    assert float(got["update/below_half_ulp"]) == 1.0
    with pytest.raises(ValueError, match="layer 'b'"):
        update_metrics(params, params, zeros, "E4M3", layer_names=["b"])


def test_state_metrics_are_update_metrics_of_the_step():
    rng = np.random.default_rng(9)
    params = store_tree(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tiny_tree(rng)), "E4M3")
    grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tiny_tree(rng))
    inner = optax.sgd(0.02)
    tx = stored_weight_update(inner, "E4M3", metrics=True)

    @jax.jit
    def step_and_reference(grads, params):
        updates, state = tx.update(grads, tx.init(params), params)
        intended, _ = inner.update(grads, inner.init(params))
        return state, update_metrics(params, optax.apply_updates(params, updates), intended, "E4M3")

    state, expected = step_and_reference(grads, params)
    assert set(optax.tree_utils.tree_get(state, "metrics")) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(float(state.metrics[name]), float(value), rtol=1e-6, err_msg=name)
    assert float(state.metrics["update/norm_ratio"]) != 1.0  # the rounding did change the update
