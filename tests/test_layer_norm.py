"""model.layer_norm: the forward is flax's LayerNorm bit for bit, the closed-form backward equals
a float64 NumPy computation of the same derivative."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from altgrad_jax.model import LAYER_NORM_EPS, LayerNorm, layer_norm


def _inputs(seed=0, shape=(3, 5, 24)):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    scale = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    bias = (0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    return x, scale, bias, dy


def test_forward_is_flax_layer_norm_bitwise_and_init_draws_the_same_keys():
    x, scale, bias, _ = _inputs()
    reference = nnx.LayerNorm(24, epsilon=LAYER_NORM_EPS, rngs=nnx.Rngs(0))
    reference.scale[...], reference.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
    graphdef, params = nnx.split(reference)
    flax_forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    np.testing.assert_array_equal(np.asarray(jax.jit(layer_norm)(x, scale, bias)), np.asarray(flax_forward(params, x)))
    ours, theirs = nnx.Rngs(5), nnx.Rngs(5)
    LayerNorm(24, rngs=ours), nnx.LayerNorm(24, rngs=theirs)
    np.testing.assert_array_equal(jax.random.key_data(ours.params()), jax.random.key_data(theirs.params()))


def test_backward_matches_float64_numpy():
    x, scale, bias, dy = _inputs(1)
    _, vjp = jax.vjp(layer_norm, x, scale, bias)
    dx, dscale, dbias = jax.jit(vjp)(dy)

    x64, s64, dy64 = (a.astype(np.float64) for a in (x, scale, dy))
    mean = x64.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(x64.var(-1, keepdims=True) + LAYER_NORM_EPS)
    xhat = (x64 - mean) * rstd
    g = dy64 * s64
    n = x.shape[-1]
    # d/dx of (x - mean) * rstd, contracted with g: the textbook LayerNorm Jacobian-vector product.
    dx_ref = rstd / n * (n * g - g.sum(-1, keepdims=True) - xhat * (g * xhat).sum(-1, keepdims=True))
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dscale, (dy64 * xhat).sum((0, 1)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dbias, dy64.sum((0, 1)), rtol=1e-6, atol=1e-6)


def test_backward_matches_autodiff_of_flax_layer_norm():
    """An independent derivation: JAX's autodiff through nnx.LayerNorm's own ops."""
    x, scale, bias, dy = _inputs(2)
    reference = nnx.LayerNorm(24, epsilon=LAYER_NORM_EPS, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(reference)
    flax_forward = lambda x, s, b: nnx.merge(graphdef, {"scale": s, "bias": b})(x)  # noqa: E731
    ours = jax.jit(jax.vjp(layer_norm, x, scale, bias)[1])(dy)
    theirs = jax.jit(jax.vjp(flax_forward, x, scale, bias)[1])(dy)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
