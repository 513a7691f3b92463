"""The causal attention's closed-form backward (model.causal_attention) against autodiff of the
textbook formulation, with and without a dropout mask, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altgrad_jax.model import causal_attention


def autodiff_reference(q, k, v, weight_dropout):
    seq = q.shape[2]
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k)
    scores = jnp.where(jnp.tril(jnp.ones((seq, seq), dtype=bool)), scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(scores, axis=-1) * weight_dropout, v)


@pytest.mark.parametrize("with_dropout", [False, True])
def test_forward_and_gradients_match_autodiff_of_the_textbook_formula(with_dropout):
    rng = np.random.default_rng(0)
    q, k, v, d_out = (rng.standard_normal((2, 3, 7, 4)) for _ in range(4))
    weight_dropout = np.asarray(1.0)
    if with_dropout:
        weight_dropout = (rng.random((2, 3, 7, 7)) > 0.3) / 0.7
    with jax.enable_x64():
        args = tuple(jnp.asarray(a, jnp.float64) for a in (q, k, v, weight_dropout))
        out, vjp = jax.vjp(causal_attention, *args)
        ref_out, ref_vjp = jax.vjp(autodiff_reference, *args)
        grads, ref_grads = vjp(jnp.asarray(d_out))[:3], ref_vjp(jnp.asarray(d_out))[:3]
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert np.abs(np.asarray(want)).max() > 1e-3, f"d{name} vanished: nothing compared"
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"d{name}")


def test_a_query_that_sees_one_key_gets_an_exactly_zero_gradient_in_float32():
    """The first position attends only to itself: softmax is 1 there whatever its score, so dq and
    the score's share of dk are 0. The backward must give exact zeros (not rounding residue),
    since dy's quantization counts any nonzero value it flushes as an underflow."""
    rng = np.random.default_rng(1)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal((2, 3, 7, 4)), jnp.float32) for _ in range(4))
    _, vjp = jax.vjp(causal_attention, q, k, v, jnp.ones((), jnp.float32))
    d_q = np.asarray(vjp(d_out)[0])
    assert np.all(d_q[:, :, 0] == 0.0)
    assert np.all(d_q[:, :, 1:] != 0.0), "every later query sees two keys or more"
